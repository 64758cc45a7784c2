#!/usr/bin/env python
"""`quadit attention-study` as a script: the same parser and code (`engines.cli.attention_study`)."""
from engines.cli import attention_study
from engines.cli.common import run

if __name__ == "__main__":
    run(attention_study.main)
