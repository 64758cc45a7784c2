"""`quadit compare`: the arguments of `engines.evaluation.compare_methods`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import compare_methods
from exporter.models.cli_args import add_model_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit compare", description=compare_methods.__doc__)
    add_model_args(parser)
    parser.add_argument("--calibration", help="calibration artifact directory")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="only combine finished comparisons (one per test bed) into one table in --out")
    parser.add_argument("--grid", default="full", help=f"candidate rows: {', '.join(compare_methods.GRIDS)} (default full)")
    parser.add_argument("--extra-calibration", action="append", default=[], metavar="NAME=DIR",
                        help="also run w8a8 timestep-smoothquant per-bucket-scale with another artifact "
                             "(e.g. an activation-aware vs a uniform sample selection)")
    parser.add_argument("--recipe-row", action="append", default=[], metavar="NAME=FILE",
                        help="also evaluate a recipe JSON file (e.g. export.py --auto-precision's recipe.auto.json) "
                             "as the row NAME, on the same prompts as the grid")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=None,
                        help="audio length of the trajectories (default: 3, or the model's window if shorter)")
    parser.add_argument("--schemes", default="w8a8,w4a16,w4a8")
    parser.add_argument("--no-modelopt", action="store_true")
    parser.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's own quantizer")
    parser.add_argument("--fused", default="full", choices=("full", "step", "none"),
                        help="static INT8-activation Q/DQ graphs are evaluated with exact Q/DQ arithmetic; also "
                             "measure them with ONNX Runtime's fused integer kernels: all three figures (full), "
                             "the per-step SQNR only (step), or not (none)")
    parser.add_argument("--modelopt-prompts", type=int, default=2,
                        help="calibration prompts ModelOpt and ONNX Runtime's quantize_static calibrate on (all "
                             "their steps; AWQ's search is slow on CPU)")
    parser.add_argument("--cache", help="JSON-lines file of finished rows, reused when rerun with the same settings")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the table from the rows in --cache only; rows not there are listed as not measured")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return compare_methods.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
