#!/usr/bin/env python
"""`quadit compare` as a script: the same parser and code (`engines.cli.compare`)."""
from engines.cli import compare
from engines.cli.common import run

if __name__ == "__main__":
    run(compare.main)
