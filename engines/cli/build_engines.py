"""Build TensorRT engines for an export directory: one strongly typed engine per DiT graph (per timestep
bucket where the export has bucket graphs), the text encoder and the VAE decoder, plus engines.json; for a
UNet-family export (AudioLDM, TANGO), the text encoder, UNet, VAE decoder and vocoder. Every graph is checked
against TensorRT's rules and its profiles first.

Without TensorRT or a CUDA GPU it prints the equivalent `polygraphy convert` commands (to build elsewhere)
and exits with code 2, creating nothing."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging

log = logging.getLogger("build_engines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit build-engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="export directory written by scripts/export.py")
    parser.add_argument("--out", required=True, help="engines directory to write (replaced atomically)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="shortest audio the engines run (default 1)")
    parser.add_argument("--opt-seconds", type=float, default=None,
                        help="duration TensorRT tunes its kernels for (default: --max-seconds; UNet family: "
                             "the model's default length)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="longest audio the engines run (default: the model's window; UNet family: its "
                             "max_seconds)")
    parser.add_argument("--timing-cache", default=None, help="TensorRT timing cache file to read and update")
    parser.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="keep FP32 layers in full FP32 (default: TF32 tensor cores, TensorRT's own default)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from engines.runtime.tensorrt import (
        BuildSettings,
        build_engines,
        build_plan,
        check_graphs,
        check_timing_cache,
        polygraphy_convert_command,
        tensorrt_unavailable,
    )
    from exporter.errors import InputError
    from exporter.onnx.artifacts import read_manifest

    settings = BuildSettings(min_seconds=args.min_seconds, opt_seconds=args.opt_seconds,
                             max_seconds=args.max_seconds, opt_level=args.opt_level, timing_cache=args.timing_cache,
                             tf32=not args.no_tf32)
    export, out = Path(args.export), Path(args.out)
    manifest = read_manifest(export)
    items = build_plan(export, manifest)
    check_graphs(export, items, manifest, settings)
    check_timing_cache(args.timing_cache)
    reason = tensorrt_unavailable()
    if reason:
        print("# Equivalent polygraphy commands, to run where TensorRT and a CUDA GPU are available:")
        for item in items:
            print(polygraphy_convert_command(export, item.onnx, out / item.engine, settings, manifest))
        raise InputError(f"{reason}: cannot build engines here; the equivalent polygraphy commands are printed above")
    doc = build_engines(export, out, settings)
    engines = doc["engines"]
    log.info("wrote %d engine(s) to %s (TensorRT %s, %s)", len(engines), out, doc["tensorrt_version"],
             doc["gpu"]["name"])
    print(json.dumps({"out": str(out.resolve()), "engines": {k: e["engine"] for k, e in engines.items()},
                      "build_seconds": sum(e["build_seconds"] for e in engines.values())}))
    return 0


if __name__ == "__main__":
    run(main)
