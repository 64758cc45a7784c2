"""Error-minimising weight quantization: scales by a clipping search, and GPTQ-style rounding.

Round-to-nearest with abs-max scales minimises neither what matters nor anything in particular: a Linear's
output error for a weight change D on inputs x is E||x D||^2 = tr(D^T H D) with H = E[x x^T] (the
calibration artifact's `<layer>.xtx`). Two passes act on that:

- **Clipping search** (cheap): per output channel (INT8) or per block (INT4), the scale's clip ratio
  from a fixed grid that minimises sum_k H_kk (w_k - Q(w_k))^2: a smaller step for the bulk of a channel's
  weights at the cost of clipping its largest ones. Without H the weights count equally (plain MSE).
- **GPTQ** (Frantar et al. 2022): quantize the input rows k = 0..K-1 in turn and spread each row's rounding
  error over the rows not yet quantized through the Cholesky factor of H^-1, so the output error, not the
  weight error, is minimised. Damping adds `damp` x mean(diag H) to the diagonal (H from a few thousand
  tokens is near-singular: inputs never active in calibration have H_kk = 0). Updates are applied lazily
  per block of rows (the O(K^2 N) part becomes matrix products). INT4 block scales are chosen when GPTQ
  reaches the block, from the already-updated weights (the scale must fit what is rounded). With
  per-output-channel INT8 scales the rows are processed in descending H_kk (the "act order" of GPTQ),
  which needs no extra op at run time because the scales do not depend on the row order.

Weights are [K, N] (in, out) as the exported MatMuls hold them, in float64; scales are returned in the
DQ's float type and the integers are rounded against the scale *as stored* (qdq.py's rule). Everything is
deterministic: fixed grids, no random numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.passes.qdq import QMAX, TINY, check_block, positive_scale

CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5
ROUNDINGS = ("nearest", "gptq")
CLIPS = ("absmax", "mse")


@dataclass(frozen=True)
class WeightQuant:
    """How one layer's weights are rounded: `rounding` nearest|gptq, `clip` absmax|mse, GPTQ's damping
    and lazy-update block (rows per batch of updates)."""

    rounding: str = "nearest"
    clip: str = "absmax"
    damp: float = 0.01
    update_block: int = 128

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"weight rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"weight clip must be one of {CLIPS}, got {self.clip!r}")
        if not 0 < self.damp < 1 or self.update_block < 1:
            raise ValueError(f"GPTQ damping must be in (0, 1) and its block >= 1, got {self.damp}, {self.update_block}")


def _scales(w: np.ndarray, qmax: int, dtype: type, clip: str, weight: np.ndarray | None) -> np.ndarray:
    """Scale per column of `w` [R, N] (a channel or a block's rows), the clip ratio searched when asked.
    `weight` [R] are the rows' importances (H_kk) for the search."""
    absmax = np.abs(w).max(axis=0)
    if clip == "absmax":
        return positive_scale(np.maximum(absmax / qmax, float(TINY)), dtype)
    imp = np.ones(w.shape[0]) if weight is None else np.maximum(weight, 0.0) + 1e-12
    best_err, best = np.full(w.shape[1], np.inf), None
    for ratio in CLIP_GRID:
        s = positive_scale(np.maximum(absmax * ratio / qmax, float(TINY)), dtype)
        s64 = s.astype(np.float64)
        err = (imp[:, None] * (w - np.clip(np.rint(w / s64), -qmax, qmax) * s64) ** 2).sum(axis=0)
        if best is None:
            best, best_err = s.copy(), err
            continue
        better = err < best_err
        best[better], best_err[better] = s[better], err[better]
    return best


def _round(w: np.ndarray, scale64: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / scale64), -qmax, qmax)


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so that H^-1 = U^T U."""
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = max(float(np.mean(np.diag(h))), 1e-12)
    from scipy.linalg.lapack import dpotrf, dpotri

    eye = np.eye(h.shape[0])
    for extra in (damp, damp + 0.1, damp + 1.0):
        # H = L L^T, then H^-1 from L (LAPACK potri, a third of a general inverse's work: the O(K^3) steps
        # dominate GPTQ on 2048-wide and wider inputs), then H^-1's upper factor
        lower, info = dpotrf(h + extra * mean * eye, lower=1, clean=1)
        if info:
            continue
        inv, info = dpotri(lower, lower=1)
        if info:
            continue
        inv = np.tril(inv) + np.tril(inv, -1).T
        try:
            return np.linalg.cholesky(inv).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("second-moment matrix is not positive definite even with damping")


def quantize_weight(w_kn: np.ndarray, bits: int, block: int | None, dtype: type = np.float32,
                    how: WeightQuant = WeightQuant(), hessian: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (int8 codes [K, N], scale): `block` None gives one scale per output channel [N] (the INT8
    DequantizeLinear axis=1 layout), else one per block of rows along K [K / block, N]. Without `hessian`
    GPTQ falls back to round-to-nearest (with the clip search, if asked, on unweighted errors)."""
    w = np.array(w_kn, np.float64)
    k, n = w.shape
    qmax = QMAX[bits]
    if block is not None:
        check_block(k, n, block)
    diag = None if hessian is None else np.diag(np.asarray(hessian, np.float64))
    if how.rounding == "nearest" or hessian is None:
        if block is None:
            scale = _scales(w, qmax, dtype, how.clip, diag)
            return _round(w, scale.astype(np.float64)[None, :], qmax).astype(np.int8), scale
        scales = np.stack([_scales(w[b:b + block], qmax, dtype, how.clip, None if diag is None else diag[b:b + block])
                           for b in range(0, k, block)])
        q = _round(w.reshape(k // block, block, n), scales.astype(np.float64)[:, None, :], qmax)
        return q.reshape(k, n).astype(np.int8), scales
    return _gptq(w, np.asarray(hessian, np.float64), qmax, block, dtype, how)


def _gptq(w: np.ndarray, hessian: np.ndarray, qmax: int, block: int | None, dtype: type, how: WeightQuant
          ) -> tuple[np.ndarray, np.ndarray]:
    k, n = w.shape
    diag = np.diag(hessian)
    # act order only where it cannot split a scale group: per-output-channel scales
    order = np.argsort(-diag, kind="stable") if block is None else np.arange(k)
    w, h = w[order], hessian[np.ix_(order, order)]
    u = _inverse_cholesky(h, how.damp)
    q = np.zeros((k, n))
    if block is None:
        scale = _scales(w, qmax, dtype, how.clip, np.diag(h))
        scales = scale.astype(np.float64)
    else:
        scale = np.zeros((k // block, n), dtype=dtype)
    step = how.update_block if block is None else block * max(1, how.update_block // block)
    for start in range(0, k, step):
        end = min(start + step, k)
        wb = w[start:end].copy()
        err = np.zeros_like(wb)
        for i in range(end - start):
            row = start + i
            if block is not None and row % block == 0:
                g = row // block
                # the block's scale from its rows as updated so far (batches align with blocks, and every
                # row of the batch has received the updates of all rows quantized before it)
                scale[g] = _scales(wb[i:i + block], qmax, dtype, how.clip, np.diag(h)[row:row + block])
                scales = scale[g].astype(np.float64)
            q[row] = _round(wb[i], scales, qmax)
            e = (wb[i] - q[row] * scales) / u[row, row]
            wb[i + 1:] -= np.outer(u[row, row + 1:end], e)
            err[i] = e
        w[end:] -= u[start:end, end:].T @ err
    inverse = np.empty_like(order)
    inverse[order] = np.arange(k)
    return q[inverse].astype(np.int8), scale


def output_error(w_kn: np.ndarray, deq_kn: np.ndarray, hessian: np.ndarray) -> float:
    """tr(D^T H D) / tr(W^T H W): the Linear's relative output error power on inputs with second moment H."""
    d = np.asarray(w_kn, np.float64) - np.asarray(deq_kn, np.float64)
    h = np.asarray(hessian, np.float64)
    w = np.asarray(w_kn, np.float64)
    return float(np.sum(d * (h @ d)) / max(float(np.sum(w * (h @ w))), 1e-300))
