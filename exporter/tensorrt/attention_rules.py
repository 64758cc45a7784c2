"""TensorRT's rules for a quantized attention core (Q·Kᵀ -> Softmax -> ·V), checked on a finished graph.

A core with Q/DQ on any of its MatMul inputs is meant to run as TensorRT's fused FP8 multi-head attention.
The rules, and where they come from (exporter/passes/fp8_attention.py writes graphs that keep them):
- "FP8 MHA inputs": all four of Q, Kᵀ, the softmax output and V come through FP8 Q/DQ (NVIDIA's FP8 MHA export
  quantizes exactly these four: modelopt/torch/quantization/export_onnx.py `export_fp8_mha`; its ONNX exporter
  adds the softmax one when the others are there, modelopt/onnx/export/fp8_exporter.py). A core with some
  inputs quantized is not the FP8 MHA pattern and runs unfused, with Q/DQ reformats in it.
- "DQ feeds the BMM": each DequantizeLinear feeds its attention MatMul directly: a scale Mul or the Kᵀ
  Transpose between them goes in front of the QuantizeLinear (fp8_exporter.py `_move_mul_before_qdq`,
  `_move_transpose_before_qdq`: "so TRT sees DQ→MatMul"); TensorRT applies the attention scale before BMM1
  (developer guide, "Fused Attention").
- "FP8 attention": the attention Q/DQ are FP8 E4M3. TensorRT fuses INT8 MHA only up to 512 tokens and head size
  64 (developer guide, MHA fusion), below SAO's 1025, and quadit writes no INT8 attention for TensorRT.
- "16-bit MHA": the Q/DQ scales are FP16 or BF16, so the core computes in 16 bits (`export_fp8_mha` refuses
  anything else: "the qdqs must be in 16 bits").
- "softmax scale": the softmax output's scale is 1/448 (its range is [0, 1]; fp8_exporter.py uses 1/448,
  export_fp8_mha amax 1.0).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.onnx import graph_edit

SOFTMAX_SCALE = 1.0 / 448.0
_BETWEEN = ("Mul", "Div", "Transpose", "Reshape", "Cast", "Identity")
_SIXTEEN = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _dq_of(producers: dict[str, onnx.NodeProto], tensor: str, inits: dict[str, Any]
           ) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """(DQ feeding `tensor` directly, DQ reached only through scale/layout ops) for an activation DQ."""
    node = producers.get(tensor)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in inits:
        return node, None
    hops = 0
    while node is not None and node.op_type in _BETWEEN and hops < 3:
        node = producers.get(node.input[0])
        hops += 1
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            return None, node
    return None, None


def check_attention(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(rule, node, detail) for every quantized-attention rule the graph breaks."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = graph_edit.producers(model)
    consumers = graph_edit.consumers(model)
    bad: list[tuple[str, str, str]] = []
    for sm in g.node:
        if sm.op_type != "Softmax":
            continue
        bmm1 = producers.get(sm.input[0])
        if bmm1 is None or bmm1.op_type != "MatMul" or any(i in inits for i in bmm1.input):
            continue
        users = consumers.get(sm.output[0], [])
        p_q = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
        p_dq = consumers.get(p_q.output[0], [None])[0] if p_q is not None else None
        after = consumers.get((p_dq or sm).output[0], [])
        if len(after) != 1 or after[0].op_type != "MatMul":
            continue
        bmm2 = after[0]
        inputs = {"Q": bmm1.input[0], "Kᵀ": bmm1.input[1], "V": bmm2.input[1]}
        found = {k: _dq_of(producers, t, inits) for k, t in inputs.items()}
        direct = {k: d for k, (d, _) in found.items() if d is not None}
        softmax_dq = p_dq if p_dq is not None and p_dq.op_type == "DequantizeLinear" else None
        if softmax_dq is not None:
            direct["softmax"] = softmax_dq
        for k, (_, far) in found.items():
            if far is not None:
                bad.append(("DQ feeds the BMM", far.name, f"{k} of the attention core at {sm.name} passes through "
                            "scale/layout ops after its DQ; put them before the QuantizeLinear"))
        if not direct and not any(far for _, far in found.values()):
            continue  # an FP16 core: TensorRT's plain fused MHA
        missing = [k for k in ("Q", "Kᵀ", "softmax", "V") if k not in direct]
        if missing:
            bad.append(("FP8 MHA inputs", sm.name, f"attention core has Q/DQ on {sorted(direct)} but not on "
                        f"{missing}; TensorRT's fused FP8 attention needs all four"))
        for k, dq in direct.items():
            zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            if zp is None or zp.data_type != TensorProto.FLOAT8E4M3FN:
                bad.append(("FP8 attention", dq.name, f"{k} of the core at {sm.name} is not FP8 E4M3 Q/DQ (INT8 MHA "
                            "fuses only up to 512 tokens)"))
            scale = inits.get(dq.input[1])
            if scale is None:
                continue  # the general checker names non-constant scales
            if scale.data_type not in _SIXTEEN:
                bad.append(("16-bit MHA", dq.name, f"{k} scale {scale.name} is "
                            f"{TensorProto.DataType.Name(scale.data_type)}; the fused FP8 attention takes FP16/BF16"))
            if k == "softmax":
                value = float(numpy_helper.to_array(scale).astype(np.float64).reshape(-1)[0])
                if abs(value / SOFTMAX_SCALE - 1.0) > 2e-3:
                    bad.append(("softmax scale", dq.name, f"softmax output scale {value:.6g} is not 1/448 (its "
                                "range is [0, 1])"))
    return bad
