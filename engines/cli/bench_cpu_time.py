"""`quadit bench-cpu-time`: the arguments of `engines.evaluation.bench_cpu_time`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import bench_cpu_time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit bench-cpu-time", description=bench_cpu_time.__doc__)
    parser.add_argument("--export", required=True, help="FP32 export directory (ORT FP32 and PyTorch rows)")
    parser.add_argument("--graph", action="append", default=[], metavar="NAME=PATH",
                        help="another DiT graph to time (repeatable), e.g. 'w8a8 static=/x/dit.onnx'")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    return bench_cpu_time.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
