#!/usr/bin/env python
"""`quadit tune-ort-session` as a script: the same parser and code (`engines.cli.tune_ort_session`)."""
from engines.cli import tune_ort_session
from engines.cli.common import run

if __name__ == "__main__":
    run(tune_ort_session.main)
