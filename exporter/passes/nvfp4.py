"""NVFP4 arithmetic: E2M1 values in blocks of 16 along K, one E4M3 scale per block, one FP32 scale per tensor.

The format (Blackwell's FP4 tensor cores; TensorRT's DynamicQuantize operator, docs.nvidia.com/deeplearning/
tensorrt/latest/_static/operators/DynamicQuantize.html: "block size ... limited to 16 for FP4 (NVFP4)", the
second input "a scalar scale factor used to quantize the computed block scales"):

    global  g = amax(tensor) / (6 * 448)                    (FP32; static: calibrated for activations)
    block   s_b = castToFp8(clip(amax(block) / (6 * g), 2^-9, 448))     (E4M3, round to nearest even)
    value   q = castToFp4(clip(x / (s_b * g), -6, 6))                   (E2M1, round to nearest even)
    x ~= q * s_b * g

E2M1 holds {0, 0.5, 1, 1.5, 2, 3, 4, 6}. The clip of the block scale to E4M3's [2^-9, 448] keeps an all-zero
or tiny block from underflowing to a zero scale and an oversized one from becoming NaN; it is what NVIDIA's
own exporter computes (ModelOpt, modelopt/torch/quantization/qtensor/nvfp4_tensor.py
`_cast_per_block_scale_to_fp8`, and modelopt/onnx/quantization/quant_utils.py `get_weights_scaling_factor_2`
for g = amax / (6 * 448)). TensorRT does not publish its kernel's rounding of the dynamic block scale; this
module follows ModelOpt's arithmetic (the peer quadit is compared with) and the tests check every rounding
against ONNX's reference QuantizeLinear for FLOAT4E2M1 and FLOAT8E4M3FN.

All of this runs in numpy here; `exporter.passes.nvfp4_nodes` writes it as ONNX, in TensorRT's form and
in an ONNX-Runtime-runnable emulation.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from exporter.passes.qdq import to_fp8

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
SCALE_MIN = 2.0 ** -9   # E4M3FN's smallest subnormal
# the E2M1 magnitudes, code 0..7 (the sign is bit 3)
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_fp4(x: np.ndarray) -> np.ndarray:
    """`x` (already divided by its scales) as E2M1 codes in uint8 (low nibble: sign bit 3, then E2M1),
    rounded to nearest even and saturated at +-6, as ONNX's QuantizeLinear to FLOAT4E2M1 computes."""
    import ml_dtypes

    clipped = np.clip(np.asarray(x, np.float32), -FP4_MAX, FP4_MAX)
    return clipped.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F


def fp4_values(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes -> float64 values."""
    codes = np.asarray(codes, np.uint8)
    magnitude = E2M1[codes & 0x07]
    return np.where(codes & 0x08, -magnitude, magnitude)


def global_scale(amax: float) -> np.float32:
    """g = amax / (6 * 448) in FP32 (so the largest block's scale lands on E4M3's 448); 1 for an all-zero tensor."""
    g = np.float32(np.float32(amax) / np.float32(FP4_MAX * FP8_MAX))
    return g if g > 0 and np.isfinite(g) else np.float32(1.0)


def block_scales(blocks: np.ndarray, g: float) -> np.ndarray:
    """E4M3 codes of the per-block scales of `blocks` [..., nblocks, 16] (FP32 arithmetic, as deployed)."""
    amax = np.abs(np.asarray(blocks, np.float32)).max(axis=-1)
    raw = amax / (np.float32(FP4_MAX) * np.float32(g))
    return to_fp8(np.clip(raw, SCALE_MIN, FP8_MAX))


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 blocks of {BLOCK} need the last dimension to divide, got {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def quantize(x: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    """[..., K] -> (E2M1 codes [..., K], E4M3 block-scale codes [..., K/16]); blocks run along the last axis."""
    blocks = _blocks(np.asarray(x, np.float32))
    sf8 = block_scales(blocks, g)
    step = sf8.astype(np.float32) * np.float32(g)
    codes = to_fp4(blocks / step[..., None])
    return codes.reshape(x.shape), sf8


def dequantize(codes: np.ndarray, sf8: np.ndarray, g: float) -> np.ndarray:
    """Inverse of `quantize`, in FP32 products as DequantizeLinear computes them (returned as float64)."""
    blocks = _blocks(fp4_values(codes).astype(np.float32))
    step = sf8.astype(np.float32) * np.float32(g)
    return (blocks * step[..., None]).reshape(codes.shape).astype(np.float64)


def fake_quantize(x: np.ndarray, g: float | None = None) -> np.ndarray:
    """Q then DQ along the last axis, `dequantize(*quantize(x, g), g)` without the codes (float32: the searches
    call it on every calibration row); `g` None: the tensor's own amax (weights)."""
    import ml_dtypes

    x = np.asarray(x, np.float32)
    g = global_scale(float(np.abs(x).max())) if g is None else np.float32(g)
    blocks = _blocks(x)
    raw = np.abs(blocks).max(axis=-1) / (np.float32(FP4_MAX) * g)
    step = (to_fp8(np.clip(raw, SCALE_MIN, FP8_MAX)).astype(np.float32) * g)[..., None]
    q = np.clip(blocks / step, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (q * step).reshape(x.shape)


def fake_quantize_weight_kn(w_kn: np.ndarray) -> np.ndarray:
    """A [K, N] weight through the deployed arithmetic (blocks along K: the weight is stored [N, K])."""
    return fake_quantize(np.asarray(w_kn, np.float64).T).T


def fp4_initializer(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """A FLOAT4E2M1 tensor from E2M1 codes: two per byte, element 2i in the low nibble (ONNX's layout, the
    same packing as INT4)."""
    flat = np.asarray(codes, np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT4E2M1, dims=list(codes.shape))
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return tensor
