"""NVFP4 as ONNX nodes, in the form TensorRT parses (the `nvfp4` scheme, TensorRT target only).

Activation (one per activation tensor, shared by the GEMMs that read it):

    x (FP16) -> trt::TRT_FP4DynamicQuantize(x, g_x; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)
             -> (x_fp4 FLOAT4E2M1, s_fp8 FLOAT8E4M3FN [..., K/16])
    DequantizeLinear(s_fp8, g_x) -> s (FP32);  DequantizeLinear(x_fp4, s; axis=-1, block_size=16) -> Cast FP16

Weight (stored [N, K], so the 16-blocks run along the reduction axis K, the last one):

    DequantizeLinear(s_w FLOAT8E4M3FN [N, K/16], g_w) -> DequantizeLinear(w FLOAT4E2M1 [N, K]; axis=-1,
    block_size=16) -> Transpose -> Cast FP16 -> MatMul

This is the form NVIDIA's exporter writes for TensorRT (ModelOpt: the activation quantizer
`modelopt/torch/quantization/export_onnx.py` `_fp4_dynamic_quantize` / `_fp4_dequantize_2`; the weight's
"2DQ" subgraph, `modelopt/onnx/export/nvfp4_exporter.py` `_replace_fp4qdq_with_2dq`, which also raises the
default opset to 23, the first with FLOAT4E2M1 in DequantizeLinear). TensorRT's DynamicQuantize operator
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/DynamicQuantize.html) takes block size 16 for
FP4, an axis that is the last or second-to-last dimension, and a blocked extent that is a build-time constant
divisible by 16: K of a Linear's input. The global scales are static (calibrated per timestep bucket for
activations, as the INT8 path's pre-scales); the block scales follow every call.

ONNX Runtime runs neither the custom op nor FLOAT4E2M1: `exporter.onnx.fp4_emulation` rewrites this form into
standard ops with the same arithmetic for measuring accuracy on a CPU.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.onnx import graph_edit
from exporter.passes import names, nvfp4, qdq

TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
# ModelOpt's NVFP4 exporter: `default_opset.version = max(default_opset.version, 23)`
NVFP4_OPSET = 23


def prepare(model: onnx.ModelProto) -> None:
    """Opset 23 (FLOAT4E2M1 DequantizeLinear) and the `trt` domain for the custom quantizer."""
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    default.version = max(default.version, NVFP4_OPSET)
    graph_edit.ensure_opset(model, TRT_DOMAIN, 1)


def activation(model: onnx.ModelProto, tensor: str, g: float, dtype: type = np.float16) -> str:
    """The NVFP4 quantize-dequantize chain on an activation (see the module docstring); returns the tensor
    the GEMMs read, in `dtype`."""
    a = lambda part: names.act(tensor, part)  # noqa: E731
    gm = model.graph
    gm.initializer.append(qdq.constant(np.float32(g), a("fp4_global_scale")))
    gm.node.extend([
        helper.make_node(DYNAMIC_QUANTIZE, [tensor, a("fp4_global_scale")], [a("fp4"), a("fp4_block_scale_fp8")],
                         domain=TRT_DOMAIN, axis=-1, block_size=nvfp4.BLOCK, scale_type=TensorProto.FLOAT8E4M3FN,
                         name=names.node(tensor, "fp4_dynamic_quantize")),
        helper.make_node("DequantizeLinear", [a("fp4_block_scale_fp8"), a("fp4_global_scale")],
                         [a("fp4_block_scale")], name=names.node(tensor, "fp4_scale_dq")),
        helper.make_node("DequantizeLinear", [a("fp4"), a("fp4_block_scale")], [a("fp4_dq32")], axis=-1,
                         block_size=nvfp4.BLOCK, name=names.node(tensor, "fp4_dq")),
        helper.make_node("Cast", [a("fp4_dq32")], [a("fp4_dq")], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                         name=names.node(tensor, "fp4_cast"))])
    # the custom op's outputs are typed here: ONNX type inference cannot see into a `trt` function
    gm.value_info.extend([helper.make_tensor_value_info(a("fp4"), TensorProto.FLOAT4E2M1, None),
                          helper.make_tensor_value_info(a("fp4_block_scale_fp8"), TensorProto.FLOAT8E4M3FN, None)])
    return a("fp4_dq")


def weight(model: onnx.ModelProto, layer: str, w_kn: np.ndarray, dtype: type = np.float16) -> tuple[str, float]:
    """FP4 codes [N, K], E4M3 block scales [N, K/16] and the global scale of a [K, N] weight, with the 2-DQ
    chain back to a [K, N] tensor in `dtype`; returns (tensor, global scale)."""
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float64).T)
    g = nvfp4.global_scale(float(np.abs(w_nk).max()))
    codes, sf8 = nvfp4.quantize(w_nk, g)
    w = lambda part: f"{names.weight_q(layer)}.{part}"  # noqa: E731
    gm = model.graph
    gm.initializer.extend([nvfp4.fp4_initializer(w("fp4"), codes), qdq.fp8_initializer(w("block_scale_fp8"), sf8),
                           qdq.constant(np.float32(g), w("global_scale"))])
    gm.node.extend([
        helper.make_node("DequantizeLinear", [w("block_scale_fp8"), w("global_scale")], [w("block_scale")],
                         name=names.node(layer, "fp4_weight_scale_dq")),
        helper.make_node("DequantizeLinear", [w("fp4"), w("block_scale")], [w("nk32")], axis=-1,
                         block_size=nvfp4.BLOCK, name=names.node(layer, "weight_dq")),
        helper.make_node("Transpose", [w("nk32")], [w("kn32")], perm=[1, 0], name=names.node(layer, "weight_transpose")),
        helper.make_node("Cast", [w("kn32")], [names.weight_dq(layer)], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                         name=names.node(layer, "weight_cast"))])
    return names.weight_dq(layer), float(g)
