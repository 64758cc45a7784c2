"""The ONNX Runtime kernel forms of the quantization pass (exporter/passes/quantize.py), for the FP32 graph of the
ONNX Runtime target only: MatMulNBits (4-bit weights, or 8-bit weights with int8 compute) and
DynamicQuantizeLinear + MatMulInteger (INT8 activations quantized per call). TensorRT parses none of them
(exporter/tensorrt/checker.py refuses them), which is why they live apart from the Q/DQ forms.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx import graph_edit
from exporter.passes import names, qdq
from exporter.passes.gptq import WeightQuant, quantize_weight


def matmul_nbits(model: onnx.ModelProto, layer: str, x: str, w_kn: np.ndarray, bits: int, block: int, out: str,
                 how: WeightQuant = WeightQuant(), hessian: np.ndarray | None = None) -> np.ndarray:
    """MatMulNBits with accuracy_level 4 (int8 compute, activations quantized per block at run time)."""
    codes, scale = qdq.matmulnbits_pack(*quantize_weight(w_kn, bits, block, np.float32, how, hessian), bits)
    k, n = w_kn.shape
    model.graph.initializer.extend([numpy_helper.from_array(codes, names.weight_q(layer)),
                                    qdq.constant(scale, names.weight_scale(layer))])
    model.graph.node.append(helper.make_node(
        "MatMulNBits", [x, names.weight_q(layer), names.weight_scale(layer)], [out], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=4, name=names.node(layer, "matmulnbits")))
    graph_edit.ensure_opset(model, "com.microsoft", 1)
    return scale


def dynamic_quantize(model: onnx.ModelProto, tensor: str) -> tuple[str, str, str]:
    """One DynamicQuantizeLinear per activation tensor (uint8, asymmetric, per tensor per call)."""
    outs = [names.act(tensor, p) for p in ("dyn_q", "dyn_scale", "dyn_zero_point")]
    if not any(n.output and n.output[0] == outs[0] for n in model.graph.node):
        model.graph.node.append(helper.make_node("DynamicQuantizeLinear", [tensor], outs, name=names.node(tensor, "dql")))
    return outs[0], outs[1], outs[2]


def matmul_integer(model: onnx.ModelProto, layer: str, xq: tuple[str, str, str], w_kn: np.ndarray, out: str,
                   how: WeightQuant = WeightQuant(), hessian: np.ndarray | None = None) -> np.ndarray:
    """MatMulInteger on the dynamically quantized activation and INT8 per-channel weights, rescaled to float."""
    q, scale = quantize_weight(w_kn, 8, None, np.float32, how, hessian)
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(q, names.weight_q(layer)), qdq.constant(scale, names.weight_scale(layer))])
    mo = lambda p: names.matmul_out(layer, p)  # noqa: E731
    g.node.extend([
        helper.make_node("MatMulInteger", [xq[0], names.weight_q(layer), xq[2]], [mo("int32")], name=names.node(layer, "mmi")),
        helper.make_node("Cast", [mo("int32")], [mo("float")], to=TensorProto.FLOAT, name=names.node(layer, "mmi_cast")),
        helper.make_node("Mul", [xq[1], names.weight_scale(layer)], [mo("scale")], name=names.node(layer, "mmi_scale")),
        helper.make_node("Mul", [mo("float"), mo("scale")], [out], name=names.node(layer, "mmi_rescale"))])
    return scale
