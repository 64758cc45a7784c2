#!/usr/bin/env python
"""`quadit bench` as a script: the same parser and code (`engines.cli.bench`)."""
from engines.cli import bench
from engines.cli.common import run

if __name__ == "__main__":
    run(bench.main)
