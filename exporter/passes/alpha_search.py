"""Timestep-aware choice of the smoothing strength: per activation tensor, the alpha whose factors minimise
a quantization-noise model summed over the timestep buckets.

SmoothQuant's fixed alpha balances the activation range against the weight range for one range per
channel. Across denoising steps the activation ranges move (seed 000, Fig. 2), and with per-bucket
scales every bucket is quantized on its own grid, so the best balance depends on all buckets at once.
For factors s (from the channel maxima, as in SmoothQuant) the model charges, per bucket k:
- activation noise: step (r_k / 127) where r_k = max_j a_kj / s_j (one range per bucket with per-bucket
  scales, the overall maximum without), spread through the smoothed weight: (r_k/127)^2 / 12 * sum_j s_j^2 |W_j|^2;
- weight noise: per output channel step max_j |s_j W_ij| / qmax, spread through the smoothed activation:
  sum_i d_i^2 / 12 * sum_j (a_kj / s_j)^2.
Channel maxima stand in for magnitudes, which is the same proxy SmoothQuant's formula uses. The search is
over a fixed alpha grid, so it is deterministic.

`best_alpha_loss` replaces the model by the measured output error on the artifact's reservoir of input
rows (AWQ's search): the noise model treats every channel's error as independent and uniform, which
misjudges channels whose typical values are far below their maxima.
"""
from __future__ import annotations

import numpy as np

from exporter.passes import nvfp4
from exporter.passes.qdq import FP8_MAX, fake_quantize_fp8, fake_quantize_fp8_weight, fake_quantize_weight
from exporter.passes.smoothing import smoothing_factors

ALPHAS = tuple(round(0.05 * i, 2) for i in range(19))  # 0.00 (all range to the activations) .. 0.90


def noise_model(ch_absmax: np.ndarray, w_kn: np.ndarray, s: np.ndarray, per_bucket_scale: bool,
                weight_qmax: int, quantize_activations: bool) -> float:
    a = np.asarray(ch_absmax, np.float64)                 # [K, C]
    w = np.asarray(w_kn, np.float64) * s[:, None]         # smoothed weight [C, N]
    x = a / s[None, :]                                    # smoothed activation maxima [K, C]
    weight_step = np.abs(w).max(axis=0) / weight_qmax     # [N]
    weight_noise = (weight_step ** 2).sum() / 12 * (x ** 2).sum(axis=1)   # [K]
    if not quantize_activations:
        return float(weight_noise.sum())
    ranges = x.max(axis=1)
    if not per_bucket_scale:
        ranges = np.full_like(ranges, ranges.max())
    act_noise = (ranges / 127) ** 2 / 12 * (w ** 2).sum()                 # [K]
    return float((weight_noise + act_noise).sum())


def best_alpha(ch_absmax: np.ndarray, w_kn: np.ndarray, per_bucket_scale: bool, weight_bits: int,
               quantize_activations: bool) -> tuple[float, dict[float, float]]:
    """(alpha, {alpha: modelled noise}) for one activation tensor and the weights that read it."""
    a_max = np.asarray(ch_absmax, np.float64).max(axis=0)
    w_max = np.abs(np.asarray(w_kn, np.float64)).max(axis=1)
    qmax = 127 if weight_bits == 8 else 7
    costs = {alpha: noise_model(ch_absmax, w_kn, smoothing_factors(a_max, w_max, alpha).astype(np.float64),
                                per_bucket_scale, qmax, quantize_activations) for alpha in ALPHAS}
    return min(costs, key=costs.get), costs


def _fake_act(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -127, 127) * scale


def fake_weight(w_kn: np.ndarray, fmt: str, bits: int, block: int) -> np.ndarray:
    """A [K, N] weight through the deployed weight quantizer of `fmt` (see `loss`), dequantized."""
    if fmt == "fp8":
        return fake_quantize_fp8_weight(w_kn)
    if fmt == "nvfp4":
        return nvfp4.fake_quantize_weight_kn(w_kn)
    return fake_quantize_weight(w_kn, bits, block)


def fake_activation(x: np.ndarray, amax: float, fmt: str) -> np.ndarray:
    """Activation rows through the deployed activation quantizer of `fmt` for a calibrated range `amax`."""
    if fmt == "fp8":
        return fake_quantize_fp8(x, amax / FP8_MAX)
    if fmt == "nvfp4":
        return nvfp4.fake_quantize(x, nvfp4.global_scale(amax))
    return _fake_act(x, amax / 127)


def loss(rows: np.ndarray, ch_absmax: np.ndarray, w_kn: np.ndarray, s: np.ndarray, per_bucket_scale: bool,
         weight_bits: int, block: int, quantize_activations: bool, ref: list[np.ndarray] | None = None,
         ref_power: list[float] | None = None, fmt: str = "int") -> float:
    """Measured relative output error of the smoothed, quantized Linear(s) on calibration rows, averaged
    over buckets: sum_k ||X_k W - Q(X_k / s) Q(s W)||^2 / ||X_k W||^2. Activations are quantized per
    tensor with the bucket's calibrated range (per-bucket scales) or the overall one, as deployed;
    weights round to nearest (the search ranks smoothing strengths; GPTQ runs afterwards). The products
    run in float32 (the errors measured are 1e-1..1e-4 of the signal, far above its rounding); `ref`, the
    float outputs per bucket, and `ref_power`, their squared norms, can be passed in once for all strengths.
    `fmt`: "int" (INT8 activations, INT8/INT4 weights), "fp8" (E4M3 with per-tensor scales) or "nvfp4" (E2M1 in
    16-blocks under the bucket's global scale, as deployed: exporter/passes/nvfp4.py)."""
    x = np.asarray(rows, np.float32)                              # [K, R, C]
    w = np.asarray(w_kn, np.float64)
    ws = w * s[:, None]
    wq = fake_weight(ws, fmt, weight_bits, block).astype(np.float32)
    ranges = (np.asarray(ch_absmax, np.float64) / s[None, :]).max(axis=1)   # [K]
    if not per_bucket_scale:
        ranges = np.full_like(ranges, ranges.max())
    ref = ref if ref is not None else [x[k] @ w.astype(np.float32) for k in range(x.shape[0])]
    ref_power = ref_power if ref_power is not None else _powers(ref)
    inv = (1.0 / s).astype(np.float32)[None, :]
    total = 0.0
    for k in range(x.shape[0]):
        xs = x[k] * inv
        r = max(float(ranges[k]), 1e-12)
        if quantize_activations:
            xq = fake_activation(xs, r, fmt).astype(np.float32)
        else:
            xq = xs
        diff = ref[k] - xq @ wq
        total += float(np.square(diff, dtype=np.float64).sum() / max(ref_power[k], 1e-300))
    return total / x.shape[0]


def _powers(ref: list[np.ndarray]) -> list[float]:
    return [float(np.square(r, dtype=np.float64).sum()) for r in ref]


def best_alpha_loss(rows: np.ndarray, ch_absmax: np.ndarray, w_kn: np.ndarray, per_bucket_scale: bool,
                    weight_bits: int, block: int, quantize_activations: bool, fmt: str = "int"
                    ) -> tuple[float, dict[float, float]]:
    """(alpha, {alpha: measured error}) by `loss` over the same grid and factors as `best_alpha` (AWQ's
    search, on the artifact's reservoir of input rows instead of a noise model)."""
    a_max = np.asarray(ch_absmax, np.float64).max(axis=0)
    w_max = np.abs(np.asarray(w_kn, np.float64)).max(axis=1)
    x, w32 = np.asarray(rows, np.float32), np.asarray(w_kn, np.float32)
    ref = [x[k] @ w32 for k in range(x.shape[0])]
    power = _powers(ref)
    costs = {alpha: loss(x, ch_absmax, w_kn, smoothing_factors(a_max, w_max, alpha).astype(np.float64),
                         per_bucket_scale, weight_bits, block, quantize_activations, ref, power, fmt)
             for alpha in ALPHAS}
    return min(costs, key=costs.get), costs
