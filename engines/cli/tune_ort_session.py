"""`quadit tune-ort-session`: the arguments of `engines.evaluation.tune_ort_session`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import tune_ort_session


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit tune-ort-session", description=tune_ort_session.__doc__)
    parser.add_argument("--export", required=True, help="an export directory (its DiT graph is timed)")
    parser.add_argument("--length", type=int, default=1024, help="latent length (CFG batch 2)")
    parser.add_argument("--settings", default=",".join(tune_ort_session.SETTINGS), help="settings to time")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    return tune_ort_session.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
