#!/usr/bin/env python
"""`quadit diffusers-standin` as a script: the same parser and code (`engines.cli.diffusers_standin`)."""
from engines.cli import diffusers_standin
from engines.cli.common import run

if __name__ == "__main__":
    run(diffusers_standin.main)
