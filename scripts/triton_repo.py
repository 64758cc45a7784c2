#!/usr/bin/env python
"""`quadit triton-repo` as a script: the same parser and code (`engines.cli.triton_repo`)."""
from engines.cli import triton_repo
from engines.cli.common import run

if __name__ == "__main__":
    run(triton_repo.main)
