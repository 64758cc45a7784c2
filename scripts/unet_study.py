#!/usr/bin/env python
"""`quadit unet-study` as a script: the same parser and code (`engines.cli.unet_study`)."""
from engines.cli import unet_study
from engines.cli.common import run

if __name__ == "__main__":
    run(unet_study.main)
