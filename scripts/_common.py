"""Shared CLI plumbing: logging set-up, model arguments, and bad input -> one line + exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from exporter.errors import InputError


class _BarAwareHandler(logging.StreamHandler):
    """Writes log records through `tqdm.write`, which lifts open progress bars off the line first, so a
    record never lands at the end of a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with -v) to stderr. Without -v the known-harmless third-party warnings and prints
    (`exporter.thirdparty`) are filtered where they are raised; every other warning is shown."""
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("onnx_ir", "onnxscript", "torch", "torch.onnx", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings go through the same handler, so they too stay off bar lines
    if not verbose:
        from exporter.thirdparty import quiet_known_noise

        quiet_known_noise()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="preset: sao-mini (default), stable-audio-open or stable-audio-open-small; with "
                             "--model-config, the model's name in manifests (default 'custom')")
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

    name = args.model or ("custom" if args.model_config else "sao-mini")
    return ModelSpec(model=name, model_config=args.model_config, checkpoint=args.checkpoint, t5=args.t5,
                     synthetic_weights=args.synthetic_weights, seed=args.seed)


def close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line), so what is printed next starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI main: InputError -> `error: <one line>` on stderr and exit code 2. Open progress bars are
    closed first, so the error (or a traceback) starts its own line."""
    from calibration.artifact import ArtifactError

    try:
        code = main()
    except (InputError, ArtifactError) as exc:
        close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        close_progress_bars()
        raise
    sys.exit(code or 0)
