"""`quadit unet-study`: the arguments of `engines.evaluation.unet_study` (seed 002's experiments on the UNet family)."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import unet_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit unet-study", description=unet_study.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="audioldm-mini,tango-mini", help="UNet presets (synthetic weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=None, help="default: the model's default length")
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--calib-steps", type=int, default=10)
    parser.add_argument("--buckets", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16, help="(prompt, step) samples in a calibration set")
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    return unet_study.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
