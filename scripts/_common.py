"""Shared CLI plumbing: logging set-up, model arguments, and bad input -> one line + exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable

from exporter.errors import InputError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch", "torch.onnx", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sao-mini",
                        help="preset: sao-mini (default), stable-audio-open or stable-audio-open-small")
    parser.add_argument("--model-config", help="a stable-audio-tools model_config.json of the SAO family")
    parser.add_argument("--checkpoint", help="model.safetensors / model.ckpt (model_config.json beside it), a "
                                             "snapshot directory or a diffusers StableAudioPipeline directory; "
                                             "default: the Hugging Face cache, offline")
    parser.add_argument("--t5", help="directory of a saved T5 encoder + tokenizer (default: HF cache, offline)")
    parser.add_argument("--synthetic-weights", action="store_true",
                        help="seeded synthetic weights shaped like a trained model (DiT, T5, VAE); never implicit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (default 0)")


def model_spec(args: argparse.Namespace):
    from exporter.models import ModelSpec

    return ModelSpec(model=args.model, model_config=args.model_config, checkpoint=args.checkpoint, t5=args.t5,
                     synthetic_weights=args.synthetic_weights, seed=args.seed)


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI main: InputError -> `error: <one line>` on stderr and exit code 2."""
    from calibration.artifact import ArtifactError

    try:
        code = main()
    except (InputError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
