"""The command-line form of a `ModelSpec`: the model arguments every quadit command takes, and the spec they name."""
from __future__ import annotations

import argparse

from exporter.models.loader import ModelSpec


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="preset: sao-mini (default), stable-audio-open or stable-audio-open-small (DiT family); "
                             "audioldm-mini, tango-mini, make-an-audio-mini (UNet family, --synthetic-weights) or "
                             "audioldm (cvssp/audioldm-s-full-v2 from the HF cache); with --model-config, the model's name in "
                             "manifests (default 'custom')")
    parser.add_argument("--model-config", help="a stable-audio-tools model_config.json of the SAO family")
    parser.add_argument("--checkpoint", help="model.safetensors / model.ckpt (model_config.json beside it), a "
                                             "snapshot directory, a diffusers StableAudioPipeline directory, or "
                                             "a diffusers AudioLDMPipeline / TangoPipeline directory (UNet family), "
                                             "a Make-An-Audio .ckpt/.safetensors (model.diffusion_model.* keys; "
                                             "with --model make-an-audio-mini); "
                                             "default: the Hugging Face cache, offline")
    parser.add_argument("--t5", help="directory of a saved T5 encoder + tokenizer (default: HF cache, offline)")
    parser.add_argument("--synthetic-weights", action="store_true",
                        help="seeded synthetic weights shaped like a trained model (DiT, T5, VAE); never implicit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (default 0)")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    name = args.model or ("custom" if args.model_config else "sao-mini")
    return ModelSpec(model=name, model_config=args.model_config, checkpoint=args.checkpoint, t5=args.t5,
                     synthetic_weights=args.synthetic_weights, seed=args.seed)


def unet_requested(args: argparse.Namespace) -> bool:
    """The arguments name a UNet-family model (a UNet preset, or a diffusers AudioLDM/TANGO directory)."""
    from pathlib import Path

    from exporter.models.unet_audio import is_pipeline_dir
    from exporter.models.unet_presets import is_unet_preset

    if args.model_config:
        return False
    return is_unet_preset(args.model) or bool(args.checkpoint and is_pipeline_dir(Path(args.checkpoint)))


def unet_model_name(args: argparse.Namespace) -> str:
    """The model name a UNet-family command records: the preset, or the pipeline directory's family."""
    from pathlib import Path

    if args.model:
        return args.model
    import json

    from exporter.models.unet_presets import PIPELINE_CLASSES

    cls = json.loads((Path(args.checkpoint) / "model_index.json").read_text()).get("_class_name", "")
    return PIPELINE_CLASSES.get(cls, "custom-unet")
