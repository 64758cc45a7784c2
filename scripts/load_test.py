#!/usr/bin/env python
"""`quadit load-test` as a script: the same parser and code (`engines.cli.load_test`)."""
from engines.cli import load_test
from engines.cli.common import run

if __name__ == "__main__":
    run(load_test.main)
