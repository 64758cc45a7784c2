"""Logging for every quadit command: one stderr handler that keeps records off progress-bar lines, and the
known-harmless third-party noise (`engines.runtime.thirdparty`) filtered unless -v."""
from __future__ import annotations

import logging
import sys


class _BarAwareHandler(logging.StreamHandler):
    """Writes log records through `tqdm.write`, which lifts open progress bars off the line first, so a
    record never lands at the end of a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with -v) to stderr. Without -v the known-harmless third-party warnings and prints
    (`engines.runtime.thirdparty`) are filtered where they are raised; every other warning is shown."""
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("onnx_ir", "onnxscript", "torch", "torch.onnx", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings go through the same handler, so they too stay off bar lines
    if not verbose:
        from engines.runtime.thirdparty import quiet_known_noise

        quiet_known_noise()


def close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line), so what is printed next starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
