"""The command line: one module per command, shared by `scripts/*.py` and the `quadit` entry point.

- `main.py`: `quadit <command>`; each command is a module here with `build_parser()` and `main(argv)`;
- `common.py`: `run`, bad input -> one line and exit code 2 (logging set-up is `engines.runtime.logs`, the
  model arguments `exporter.models.cli_args`, so that library commands share them).

May import every other room; nothing imports it.
"""
