"""Model families and weight layouts, behind one small interface (see `family.py`).

- `family.py`: the interface export, calibration and the runtime use (`family_of(config)`);
- `stable_audio.py`: the Stable Audio Open family (SAO 1.0: v objective; SAO Small: rf_denoiser);
- `presets.py`: named stable-audio-tools configs (stable-audio-open, stable-audio-open-small, sao-mini);
- `checkpoint.py`: the stable-audio-tools layout (model.safetensors / model.ckpt + model_config.json);
- `diffusers_layout.py`: a diffusers StableAudioPipeline directory (model_index.json, transformer/, vae/ ...);
- `hf_cache.py`: offline look-ups in the Hugging Face cache;
- `loader.py`: `load_model(ModelSpec)` -> `LoadedModel`, and the rebuild from an export's identity;
- `cli_args.py`: the model arguments every command takes, and the `ModelSpec` they name;
- `t5.py`, `synthetic.py`: the T5 encoder and tokenizer; seeded synthetic weights shaped like a trained model;
- `layers.py`: which Linears a quantization recipe may touch;
- `diffusers_standin.py`: a small diffusers StableAudioPipeline directory built from the real classes.

A new family goes here: a `ModelFamily` implementation, its presets and its layouts.
May import: `exporter.errors`, `calibration`. Never another `exporter` room or `engines`.
"""
from exporter.models.checkpoint import CKPT_NAMES, WeightSource, is_safetensors
from exporter.models.family import ModelFamily, family_of
from exporter.models.loader import (
                                    SAO_REPO,
                                    LoadedModel,
                                    ModelSpec,
                                    build,
                                    config_hash,
                                    load_model,
                                    reload_from_identity,
                                    resolve_checkpoint,
                                    resolve_source,
)

__all__ = ["CKPT_NAMES", "SAO_REPO", "LoadedModel", "ModelFamily", "ModelSpec", "WeightSource", "build",
           "config_hash", "family_of", "is_safetensors", "load_model", "reload_from_identity",
           "resolve_checkpoint", "resolve_source"]
