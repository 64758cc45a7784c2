#!/usr/bin/env python
"""`quadit generate` as a script: the same parser and code (`engines.cli.generate`)."""
from engines.cli import generate
from engines.cli.common import run

if __name__ == "__main__":
    run(generate.main)
