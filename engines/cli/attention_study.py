"""`quadit attention-study`: the arguments of `engines.evaluation.attention_study`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import attention_study
from exporter.models.cli_args import add_model_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit attention-study", description=attention_study.__doc__)
    add_model_args(parser)
    parser.add_argument("--calibration", help="calibration artifact: also measure accuracy (slow)")
    parser.add_argument("--lengths", default="256,1024", help="latent lengths of the core timing")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--bucket-policy", default="per-bucket-scale", choices=("per-bucket-scale", "shared"))
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    return attention_study.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
