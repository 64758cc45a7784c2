"""`quadit diffusers-standin`: the arguments of `exporter.models.diffusers_standin`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.runtime.logs import setup_logging
from exporter.models import diffusers_standin


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit diffusers-standin", description=diffusers_standin.__doc__)
    parser.add_argument("--out", required=True, help="pipeline directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return diffusers_standin.execute(args)


if __name__ == "__main__":
    run(main)
