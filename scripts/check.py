#!/usr/bin/env python
"""`quadit check` as a script: the same parser and code (`engines.cli.check`)."""
from engines.cli import check
from engines.cli.common import run

if __name__ == "__main__":
    run(check.main)
