#!/usr/bin/env python
"""`quadit export` as a script: the same parser and code (`engines.cli.export`)."""
from engines.cli import export
from engines.cli.common import run

if __name__ == "__main__":
    run(export.main)
