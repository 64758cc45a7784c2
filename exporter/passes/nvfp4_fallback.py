"""nvfp4's INT4 fallback: keep 4-bit weights but stop quantizing the activation where FP4 loses too much.

W4A4 costs most where an activation has few, large channels: one block of 16 then spends its 8 E2M1 levels on
the outlier and rounds its neighbours to zero, and the low-rank branch (which works on weights) cannot help
the activation side. Such layers are better as INT4 weight-only (TensorRT's w4a16 GEMM, FP16 activations)
at the same weight size. The rule decides per activation tensor (its readers share one quantizer), on the
calibration reservoir of input rows, after smoothing, with the low-rank branch as deployed:

    fall back  <=>  SQNR(NVFP4) < threshold  and  SQNR(NVFP4) < SQNR(INT4 weight-only)

where SQNR is the output's, summed over the timestep buckets, each bucket's activations quantized under its
own global scale (the per-bucket pre-scale makes that exact in the graph). The threshold is the recipe's
`nvfp4_fallback_db`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from exporter.passes import nvfp4
from exporter.passes.lowrank import svd_split
from exporter.passes.qdq import fake_quantize_weight


@dataclass(frozen=True)
class Decision:
    nvfp4_sqnr_db: float
    int4_sqnr_db: float
    fallback: bool

    def to_json(self) -> dict[str, float | bool]:
        return {"nvfp4_sqnr_db": self.nvfp4_sqnr_db, "int4_weight_only_sqnr_db": self.int4_sqnr_db,
                "int4_fallback": self.fallback}


def _branch_and_residual(w_kn: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    if not rank:
        return np.zeros_like(w_kn), w_kn
    l1, l2, residual = svd_split(w_kn, rank)
    return l1.astype(np.float16).astype(np.float64) @ l2.astype(np.float16).astype(np.float64), residual


def decide(rows: np.ndarray, ranges: np.ndarray, weights_kn: Sequence[np.ndarray], rank: int, int4_block: int | None,
           threshold_db: float) -> Decision:
    """`rows` [K buckets, R, C]: smoothed inputs; `ranges` [K]: each bucket's quantized range (after the pre-scale
    table's clip); `weights_kn`: the smoothed weights of the readers. `int4_block` None: no INT4 block fits
    (then the layers stay NVFP4)."""
    w = np.concatenate([np.asarray(x, np.float64) for x in weights_kn], axis=1)
    branch, residual = _branch_and_residual(w, rank)
    w_fp4 = branch + nvfp4.fake_quantize_weight_kn(residual)
    w_int4 = branch + fake_quantize_weight(residual, 4, int4_block) if int4_block else None
    signal = err_fp4 = err_int4 = 0.0
    # float32 products: the errors compared are 1e-1..1e-3 of the signal, far above FP32 rounding
    w32, res32, branch32 = w.astype(np.float32), (w_fp4 - branch).astype(np.float32), branch.astype(np.float32)
    int4_32 = w_int4.astype(np.float32) if w_int4 is not None else None
    for k in range(rows.shape[0]):
        x = np.asarray(rows[k], np.float32)
        ref = x @ w32
        signal += float(np.square(ref, dtype=np.float64).sum())
        x_fp4 = nvfp4.fake_quantize(x, nvfp4.global_scale(float(ranges[k])))
        # the branch reads the unquantized activation; the residual GEMM the FP4 one
        out = x_fp4 @ res32 + x @ branch32
        err_fp4 += float(np.square(ref - out, dtype=np.float64).sum())
        if int4_32 is not None:
            err_int4 += float(np.square(ref - x @ int4_32, dtype=np.float64).sum())
    db = lambda err: float(10 * np.log10(max(signal, 1e-300) / max(err, 1e-300)))  # noqa: E731
    fp4_db = db(err_fp4)
    int4_db = db(err_int4) if w_int4 is not None else float("-inf")
    return Decision(fp4_db, int4_db, bool(threshold_db > 0 and fp4_db < threshold_db and fp4_db < int4_db))
