"""`quadit load-test`: the arguments of `engines.serving.load_test`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.serving import load_test


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit load-test", description=load_test.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port of the server (loopback only)")
    parser.add_argument("--grpc-url", help="gRPC host:port (default: the HTTP port + 1)")
    parser.add_argument("--protocol", default="http", choices=("http", "grpc", "both"))
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (with --sweep: ignored)")
    parser.add_argument("--sweep", help="comma-separated concurrencies, e.g. 1,2,4,8 (1 is always run)")
    parser.add_argument("--requests", type=int, default=16, help=f"requests per row (at most {load_test.MAX_REQUESTS})")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    parser.add_argument("--time-budget-s", type=float, default=1200.0, help="stop starting requests after this")
    parser.add_argument("--out", required=True, help="output path without suffix: writes OUT.json, OUT.md, OUT.png")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return load_test.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
