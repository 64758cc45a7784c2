"""Time estimates for long stages, from a measured first step.

Calibration and the accuracy report run the DiT hundreds of times; on a CPU one step of the full-size model
takes about 37 s (2 cores), so a stage can take hours. Before the bulk of such a stage the first step is
timed and the stage's total is logged with the options that shorten it, so a user can stop and choose.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """'12 s', '3 min 20 s', '3 h 18 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def log_estimate(stage: str, step_s: float, steps: int, detail: str, shorten: str) -> float:
    """Log `stage`'s estimated total (`steps` DiT steps at `step_s` each); returns the estimate in seconds."""
    total = step_s * steps
    log.info("%s: first step took %.2f s; %d steps (%s) take about %s%s", stage, step_s, steps, detail,
             format_duration(total), f" (shorter: {shorten})" if shorten else "")
    return total

