#!/usr/bin/env python
"""`quadit serve` as a script: the same parser and code (`engines.cli.serve`)."""
from engines.cli import serve
from engines.cli.common import run

if __name__ == "__main__":
    run(serve.main)
