#!/usr/bin/env python
"""`quadit calibrate` as a script: the same parser and code (`engines.cli.calibrate`)."""
from engines.cli import calibrate
from engines.cli.common import run

if __name__ == "__main__":
    run(calibrate.main)
