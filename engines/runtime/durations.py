"""Audio durations that fit the model: defaults capped at the model's window, user values checked against it.

A stage's preferred duration (calibration 5 s, accuracy report 3 s, benchmark `generate` 10 s) is a
good choice for Stable Audio Open's 47.55 s window, but longer than a short-window model can sample
(SAO-family configs with `sample_size` 131072 have 2.97 s). When the user passes no duration the stage
takes the preferred one or the window, whichever is shorter, and says so; a duration the user passes is
refused up front, before any work, when the model cannot sample it.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from exporter.errors import InputError

log = logging.getLogger(__name__)


def window_seconds(config: dict[str, Any]) -> float:
    """The longest audio the model samples: `sample_size / sample_rate` of its model config."""
    return float(config.get("sample_size", 0)) / float(config["sample_rate"])


def check_seconds(option: str, seconds: float, config: dict[str, Any]) -> float:
    """`seconds` if the model can sample it; else InputError naming `option` and the window."""
    window = window_seconds(config)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{option} must be a positive number of seconds, got {seconds}")
    if seconds > window + 1e-6:
        raise InputError(f"{option} {seconds} is longer than this model's window of {window:.2f} s "
                         f"(leave {option} out to use the window)")
    return seconds


def pick_seconds(option: str, given: float | None, preferred: float, config: dict[str, Any], what: str) -> float:
    """The duration a stage runs at: `given` (checked against the model), else `preferred` capped at the
    window, rounded down to 10 ms so that its latent count never rounds up past the window's."""
    if given is not None:
        return check_seconds(option, given, config)
    window = window_seconds(config)
    if window < 0.01:
        raise InputError(f"the model config's sample_size ({config.get('sample_size')}) gives no window to sample")
    if preferred <= window:
        log.info("%s at %.2f s of audio (default; %s sets it)", what, preferred, option)
        return preferred
    chosen = math.floor(window * 100) / 100
    log.info("%s at %.2f s of audio: this model's window (the default %.1f s is longer; %s sets it)",
             what, chosen, preferred, option)
    return chosen
