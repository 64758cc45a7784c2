"""Searched static activation scales: the clip of each activation tensor's INT8 range (per timestep bucket
with per-bucket scales) that minimises the measured output error of the Linears reading it.

Abs-max ranges spend the INT8 grid on the rarest values: with 1% of channels at 20x the median (the
artifact's outlier figures), most values of a per-tensor grid fall in a few codes. A smaller clip c
trades clipping error on the values above c for a finer step on all others. The error that matters is
the Linear's output error, sum ||(Q_c(x) - x) W||^2 over the artifact's reservoir of input rows (taken
after smoothing, through the deployed weights of every Linear that reads the tensor), so a clip that
hurts a channel the weights amplify is not chosen. The grid is fixed (ratios of the calibrated abs-max,
in steps of 0.04 down to 0.52, then down to 1/16), so the search is deterministic; ratio 1 (abs-max) is always a candidate, so the
measured error never rises above abs-max's on the sample.
"""
from __future__ import annotations

import numpy as np

# fine near abs-max (an INT8 grid gains little from clipping unless ranges are heavy-tailed), coarse below
RATIOS = tuple(round(1.0 - 0.04 * i, 2) for i in range(13)) + tuple(float(2.0 ** (-i / 2)) for i in range(3, 9))


def _error(x: np.ndarray, w: np.ndarray, scale: float) -> float:
    e = np.clip(np.rint(x / scale), -127, 127) * scale - x
    return float(((e @ w) ** 2).sum())


def search_clip(rows: np.ndarray, ranges: np.ndarray, w_kn: np.ndarray, shared: bool) -> tuple[np.ndarray, dict]:
    """Clip ratios for the (smoothed) rows [K, R, C] with calibrated ranges [K] and the weights [C, N] that
    read them: one ratio per bucket, or one for all buckets when the tensor has one shared scale (then
    applied to the overall range). Returns (ratios [K] (all equal when shared), record for the manifest)."""
    x = np.asarray(rows, np.float64)
    w = np.asarray(w_kn, np.float64)
    ranges = np.maximum(np.asarray(ranges, np.float64), 1e-12)
    k = x.shape[0]
    if shared:
        top = float(ranges.max())
        errs = [sum(_error(x[b], w, top * r / 127) for b in range(k)) for r in RATIOS]
        best = int(np.argmin(errs))
        ratios = np.full(k, RATIOS[best])
        gain = errs[0] / max(errs[best], 1e-300)
    else:
        ratios, gains = np.ones(k), []
        for b in range(k):
            errs = [_error(x[b], w, ranges[b] * r / 127) for r in RATIOS]
            best = int(np.argmin(errs))
            ratios[b] = RATIOS[best]
            gains.append(errs[0] / max(errs[best], 1e-300))
        gain = float(np.mean(gains))
    return ratios, {"clip_ratios": [round(float(r), 4) for r in ratios],
                    "act_error_gain_db": round(10 * float(np.log10(max(gain, 1e-300))), 2)}
