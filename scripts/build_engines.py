#!/usr/bin/env python
"""`quadit build-engines` as a script: the same parser and code (`engines.cli.build_engines`)."""
from engines.cli import build_engines
from engines.cli.common import run

if __name__ == "__main__":
    run(build_engines.main)
