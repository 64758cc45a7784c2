"""The SVD low-rank branch: W^T = L1 L2 + R, with R quantized and x L1 L2 kept in FP16.

The top-r singular directions carry the weight's largest components (and, after smoothing, the
columns that absorbed activation outliers); taking them out before quantization shrinks the
residual's range, so its quantization step and error shrink too. The SVD runs in float64 so the split
itself adds no error beyond the FP16 rounding of L1 and L2; sqrt(S) goes to each factor so both have
similar magnitudes in FP16.
"""
from __future__ import annotations

import numpy as np

from exporter.passes.alpha_search import fake_weight


def _top_singular(w: np.ndarray, rank: int, oversample: int = 16, iterations: int = 4
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-`rank` singular triplets. A full SVD of every full-size weight (1536 x 6144, 168 of them) takes
    minutes; a seeded randomized range finder with power iterations gives the leading directions to
    float64 accuracy for the decaying spectra of trained/smoothed weights at a fraction of the cost.
    Exactness of the split does not depend on it: the residual is defined as W - L1 L2."""
    k, n = w.shape
    if min(k, n) <= 1024 or 4 * (rank + oversample) >= min(k, n):  # small: the exact SVD is cheap
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    rng = np.random.default_rng(0)
    q = np.linalg.qr(w @ rng.standard_normal((n, rank + oversample)))[0]
    for _ in range(iterations):
        q = np.linalg.qr(w @ (w.T @ q))[0]
    u, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def svd_split(w_kn: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] -> (L1 [K, r], L2 [r, N], residual [K, N]) with L1 @ L2 + residual == w (float64)."""
    w = np.asarray(w_kn, dtype=np.float64)
    rank = min(int(rank), *w.shape)
    u, s, vt = _top_singular(w, rank)
    root = np.sqrt(s)
    l1 = u * root[None, :]
    l2 = root[:, None] * vt
    return l1, l2, w - l1 @ l2


def branch_weight_error(l1: np.ndarray, l2: np.ndarray, residual: np.ndarray, bits: int, block: int,
                        fmt: str = "int") -> dict[str, float]:
    """Relative Frobenius error of the deployed weight with and without the branch (FP16 factors,
    quantized residual): the figure the manifest records per layer."""
    def fake(x: np.ndarray) -> np.ndarray:
        return fake_weight(x, fmt, bits, block)

    w = l1 @ l2 + residual
    norm = np.linalg.norm(w)
    plain = np.linalg.norm(w - fake(w)) / norm
    deployed = l1.astype(np.float16).astype(np.float64) @ l2.astype(np.float16).astype(np.float64) + fake(residual)
    return {"weight_rel_error_plain": float(plain), "weight_rel_error_lowrank": float(np.linalg.norm(w - deployed) / norm)}
