"""`quadit <command> [options]`: one entry point for every stage, as `polygraphy` or `optimum-cli` are used.

Each command is a module of `engines.cli` with `build_parser()` and `main(argv)`; `scripts/<name>.py` runs
the same module, so `quadit export --help` and `scripts/export.py --help` print the same text. Modules are
imported only when their command runs: `quadit --help` stays fast and does not load torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from engines.cli.common import run

# command -> (module of engines.cli, one-line summary); the order is the tour of the README
COMMANDS: dict[str, tuple[str, str]] = {
    "calibrate": ("calibrate", "timestep-bucketed activation statistics of a model (calibration artifact)"),
    "export": ("export", "ONNX graphs of a model, FP32/FP16 or quantized (w8a8, w4a16, w4a8), and a manifest"),
    "check": ("check", "a quantized export's DiT (and engines) against FP32 with Polygraphy"),
    "build-engines": ("build_engines", "TensorRT engines for an export (needs TensorRT)"),
    "generate": ("generate", "audio from a prompt with an export (ONNX Runtime, PyTorch or TensorRT)"),
    "serve": ("serve", "quadit_generate on Triton Inference Server (KServe v2, HTTP and gRPC)"),
    "bench": ("bench", "per-step speed of every form side by side (JSON, Markdown, PNG); --predict for GPUs"),
    "compare": ("compare", "quadit against ModelOpt and ONNX Runtime's quantizer at equal bits, on held-out prompts"),
    "triton-repo": ("triton_repo", "a model repository for a stock tritonserver"),
    "load-test": ("load_test", "loopback load test of a running server (JSON, Markdown, PNG)"),
    "unet-study": ("unet_study", "seed 002's Conv2d bit-width and calibration-set experiments on the UNet family"),
    "attention-study": ("attention_study", "cost and accuracy of INT8 attention in ONNX Runtime"),
    "tune-ort-session": ("tune_ort_session", "ONNX Runtime session options timed on an export's DiT"),
    "bench-cpu-time": ("bench_cpu_time", "DiT step cost in CPU seconds, one thread per candidate"),
    "diffusers-standin": ("diffusers_standin", "a small diffusers StableAudioPipeline directory (test material)"),
}


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="quadit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Timestep-aware PTQ compiler for text-to-audio diffusion models.",
        epilog=f"commands:\n{listing}\n\n`quadit <command> --help` shows a command's options.")
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands below")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv[:1] or ["--help"])  # prints the listing (or the usage error)
        return 2
    module = importlib.import_module(f"engines.cli.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:])


def entry() -> None:
    """The `quadit` console script (pyproject.toml `[project.scripts]`)."""
    run(main)


if __name__ == "__main__":
    entry()
