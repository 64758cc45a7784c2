"""Quantization arithmetic and the ONNX constants it becomes: symmetric INT8 per output channel, INT4
block-wise along K, FP8 E4M3 per tensor, and the packed layout of ONNX Runtime's MatMulNBits.

Everything is symmetric with no zero point other than zero (TensorRT accepts nothing else, and
symmetric weights let ORT's MLAS use its signed kernels). Scales are stored in the type the DequantizeLinear
must output (float32 for an FP32 graph, float16 for the FP16 graphs TensorRT targets: under strong typing a
DQ outputs its scale's type) and are strictly positive in that type: an all-zero channel or block, or a
scale that would underflow (1e-38 is 0 in FP16, and the TensorRT parser rejects a zero scale), gets the
type's smallest positive value. The integers are computed against the scale *as stored*, so rounding the
scale to FP16 costs no extra error beyond a 2^-11 change of step size.
Weights here are laid out [K, N] (in, out), the way the exported MatMuls hold them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TINY = np.float32(np.finfo(np.float32).tiny)
QMAX = {8: 127, 4: 7}
# E4M3FN's largest finite value. TensorRT quantizes FP8 as castToFp8(clip(x / s, -448, 448)), rounding to the
# nearest E4M3 value with ties to even (TensorRT developer guide, "Quantization Schemes"); ONNX's
# QuantizeLinear with a float8e4m3fn zero point and saturate=1 (the default) computes the same.
FP8_MAX = 448.0


def positive_scale(value: np.ndarray | float, dtype: type = np.float32) -> np.ndarray:
    """`value` in `dtype`, floored at the type's smallest positive (subnormal) value after rounding."""
    floor = np.finfo(dtype).smallest_subnormal
    return np.maximum(np.asarray(value, np.float64).astype(dtype), floor).astype(dtype)


def _scale(absmax: np.ndarray, bits: int, dtype: type = np.float32) -> np.ndarray:
    return positive_scale(np.maximum(np.asarray(absmax, np.float64) / QMAX[bits], float(TINY)), dtype)


def quantize_int8_per_channel(w_kn: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (int8 [K, N], scale [N] in `dtype`); one scale per output channel (DequantizeLinear axis=1)."""
    scale = _scale(np.abs(w_kn).max(axis=0), 8, dtype)
    q = np.clip(np.rint(w_kn / scale.astype(np.float64)[None, :]), -127, 127).astype(np.int8)
    return q, scale


def check_block(k: int, n: int, block: int) -> None:
    """ONNX blocked DequantizeLinear needs K to split into whole blocks for MatMulNBits; INT4 storage
    and TensorRT need an even last dimension."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"INT4 block size must be a power of two >= 16, got {block}")
    if k % block or n % 2:
        raise ValueError(f"weight [{k}, {n}] does not split into INT4 blocks of {block} along K with an even N")


def quantize_int4_blockwise(w_kn: np.ndarray, block: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (int8 holding [-7, 7] [K, N], scale [K / block, N] in `dtype`); blocks run along K (axis 0)."""
    k, n = w_kn.shape
    check_block(k, n, block)
    blocks = w_kn.reshape(k // block, block, n)
    scale = _scale(np.abs(blocks).max(axis=1), 4, dtype)
    q = np.clip(np.rint(blocks / scale.astype(np.float64)[:, None, :]), -7, 7).astype(np.int8)
    return q.reshape(k, n), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of either quantizer (float64), for error measurements."""
    k, n = q.shape
    scale = np.asarray(scale, np.float64)
    if scale.ndim == 1:
        return q.astype(np.float64) * scale[None, :]
    block = k // scale.shape[0]
    return (q.reshape(scale.shape[0], block, n).astype(np.float64) * scale[:, None, :]).reshape(k, n)


def fake_quantize_weight(w_kn: np.ndarray, bits: int, block: int, dtype: type = np.float32) -> np.ndarray:
    q, s = quantize_int8_per_channel(w_kn, dtype) if bits == 8 else quantize_int4_blockwise(w_kn, block, dtype)
    return dequantize(q, s)


def int4_initializer(name: str, q: np.ndarray) -> onnx.TensorProto:
    """INT4 tensor from int8 values in [-8, 7]: two values per byte, element 2i in the low nibble (ONNX's
    layout), packed with numpy; onnx's own list-based packing takes minutes on a full-size DiT."""
    flat = q.reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(q.shape))
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return tensor


def matmulnbits_weight(w_kn: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' constant B for round-to-nearest abs-max codes (see `matmulnbits_pack`)."""
    k, n = w_kn.shape
    check_block(k, n, block)
    blocks = w_kn.reshape(k // block, block, n)
    scale = _scale(np.abs(blocks).max(axis=1), bits)                          # [K/b, N]
    q = np.clip(np.rint(blocks / scale[:, None, :]), -QMAX[bits], QMAX[bits])
    return matmulnbits_pack(q.reshape(k, n), scale, bits)


def matmulnbits_pack(q_kn: np.ndarray, scale: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' constant B from symmetric codes q [K, N] and block scales [K / block, N]: unsigned codes
    with the implicit zero point 2^(bits-1), laid out [N, K / block, block * bits / 8] (4-bit pairs packed
    low nibble first), and scales [N, K / block]. Symmetric codes (|q| <= 2^(bits-1) - 1) sit around that
    zero point, so this is the same symmetric quantization as the Q/DQ form."""
    k, n = q_kn.shape
    block = k // scale.shape[0]
    q = np.asarray(q_kn, np.int32).reshape(k // block, block, n)
    codes = (q + (1 << (bits - 1))).astype(np.uint8).transpose(2, 0, 1)       # [N, K/b, b]
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(codes), np.ascontiguousarray(np.asarray(scale, np.float32).T)


def to_fp8(x: np.ndarray) -> np.ndarray:
    """`x` (already divided by its scale) as E4M3FN codes (ml_dtypes' float8_e4m3fn, round to nearest even),
    saturated at +-448 as TensorRT's and ONNX's quantizers saturate (a plain cast would give NaN)."""
    import ml_dtypes

    return np.clip(np.asarray(x, np.float32), -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def fp8_scale(absmax: np.ndarray | float, dtype: type = np.float32) -> np.ndarray:
    """The per-tensor FP8 scale that maps `absmax` to 448, positive in `dtype`."""
    return positive_scale(np.maximum(np.asarray(absmax, np.float64) / FP8_MAX, float(TINY)), dtype)


def quantize_fp8_per_tensor(w_kn: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> (E4M3FN codes [K, N], scalar scale in `dtype`). Per tensor, as NVIDIA's own FP8 recipe
    (ModelOpt's FP8_DEFAULT_CFG: weight and input quantizers with `axis: None`) exports for TensorRT; FP8's
    exponent already spans the 40-80x outlier channels that INT8 needs per-channel scales for."""
    scale = fp8_scale(np.abs(w_kn).max(), dtype)
    return to_fp8(np.asarray(w_kn, np.float64) / float(scale)), scale


def fake_quantize_fp8(x: np.ndarray, scale: float) -> np.ndarray:
    """Q then DQ in FP8 with a per-tensor scale (float64 result), for error measurements and searches."""
    return to_fp8(np.asarray(x, np.float64) / scale).astype(np.float64) * float(scale)


def fake_quantize_fp8_weight(w: np.ndarray) -> np.ndarray:
    """A weight through `quantize_fp8_per_tensor`'s arithmetic (FP32 scale), dequantized (float64)."""
    return fake_quantize_fp8(w, float(fp8_scale(np.abs(w).max())))


def fp8_initializer(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """A FLOAT8E4M3FN tensor from E4M3FN codes (one byte each, ONNX's raw layout)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT8E4M3FN, dims=list(codes.shape))
    tensor.raw_data = np.ascontiguousarray(codes).view(np.uint8).tobytes()
    return tensor


def constant(array: np.ndarray | float | int, name: str, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)
