"""How the TensorRT checker and precision map read a residual Add whose input is quantized.

TensorRT developer guide, "Working with Quantized Types" -> "Q/DQ Layer-Placement Recommendations": "Quantize
the residual input in skip-connections": TensorRT fuses an element-wise Add that follows a weighted layer into
it, and an INT8 residual input lets the fused layer write INT8 (docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/work-quantized-types.html). A Q/DQ on an Add's input pays only in that position: on an Add that
does not follow a quantized convolution nothing fuses it, and the pair stays an INT8 -> float reformat. So:

- checker rule "residual Q/DQ": an Add fed by an activation DequantizeLinear must have a quantized Conv's output
  (through the per-bucket post-scale Mul / split-out bias Add that exporter.passes.conv_quant places) as its
  other input;
- precision map: the number of such fused Conv + INT8-residual Adds (`residual_adds_int8`).
"""
from __future__ import annotations

import onnx

from exporter.passes.residual_qdq import quantized_conv


def _act_dq(tensor: str, producers: dict[str, onnx.NodeProto], inits: set[str]) -> bool:
    p = producers.get(tensor)
    return p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in inits


def residual_adds(model: onnx.ModelProto) -> tuple[int, list[tuple[str, str]]]:
    """(fused Conv + INT8-residual Adds, [(Add, why)] for each Add whose quantized input cannot fuse)."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    fused, bad = 0, []
    for n in g.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        quantized = [k for k in (0, 1) if _act_dq(n.input[k], producers, inits)]
        if not quantized:
            continue
        if len(quantized) == 1 and quantized_conv(model, n.input[1 - quantized[0]], producers, inits) is not None:
            fused += 1
            continue
        bad.append((n.name, "an INT8 residual input fuses only into the quantized convolution the Add follows; "
                            "here the other input is not a quantized Conv's output, so the Q/DQ stays unfused"))
    return fused, bad
