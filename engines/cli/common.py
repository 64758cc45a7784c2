"""Shared CLI plumbing: bad input -> one line + exit code 2, progress bars closed before any message."""
from __future__ import annotations

import sys
from typing import Callable

from engines.runtime.logs import close_progress_bars
from exporter.errors import InputError


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI main: InputError -> `error: <one line>` on stderr and exit code 2. Open progress bars are
    closed first, so the error (or a traceback) starts its own line."""
    from calibration.artifact import ArtifactError

    try:
        code = main()
    except (InputError, ArtifactError) as exc:
        close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        close_progress_bars()
        raise
    sys.exit(code or 0)
