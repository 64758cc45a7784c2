"""TensorRT's residual-Add rule: Q/DQ on the other input of the Add that follows a quantized convolution.

TensorRT developer guide, "Working with Quantized Types" -> "Q/DQ Layer-Placement Recommendations":
"Quantize the residual input in skip-connections". TensorRT fuses an element-wise addition that follows a
weighted layer into it; the precision of the Add's other input decides the precision of the fused layer's
output: a float residual limits the fused convolution to a float output (and a Q after the Add cannot fuse
into it), an INT8 residual lets it write INT8 (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
work-quantized-types.html; NVIDIA's TensorFlow quantization toolkit applies the same rule to ResNets,
"Add Custom QDQ Insertion Case").

Which Adds (`residual_adds`): the skip connections of diffusers' UNet blocks, i.e. an Add whose one input is
the output of a quantized `conv2` (ResnetBlock2D: input + conv2(...)) or `proj_out` (Transformer2DModel:
proj_out(...) + residual), a Conv whose weight comes from a DequantizeLinear, reached only through the pointwise
ops conv_quant adds after it (the per-bucket post-scale Mul and the split-out bias Add), and whose other input
is an activation that no DQ produces yet (the block's input, or its conv_shortcut's output). Other Adds after a
convolution are not skip connections: a ResNet's conv1 output plus the broadcast timestep embedding is left
alone. The INT8 output only pays where the
Add's result is read by a quantizer; `feeds_quantizer` says for which Adds that holds, and the rest still pay
the extra rounding of the residual: the report measures what it costs.

The residual's scale is constant (TensorRT needs build-time scales) from its abs-max over the calibration
feeds, in the graph's float type (FP16 on the TensorRT target's base graph).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from exporter.onnx import graph_edit
from exporter.passes.quantize import static_qdq

log = logging.getLogger(__name__)
_CHAIN = ("Mul", "Add")  # the pointwise ops conv_quant puts between a Conv and its output tensor
_PASS_THROUGH = ("Mul", "Div", "Cast")  # ops between an Add and a quantizer that keep the fusion question open
RESIDUAL_LAYERS = ("conv2", "proj_out")  # the convolutions a diffusers UNet block adds its skip connection to


def quantized_conv(model: onnx.ModelProto, tensor: str, producers: dict[str, onnx.NodeProto],
                    inits: set[str], depth: int = 3) -> onnx.NodeProto | None:
    node = producers.get(tensor)
    for _ in range(depth):
        if node is None:
            return None
        if node.op_type == "Conv":
            dq = producers.get(node.input[1])
            return node if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits else None
        if node.op_type not in _CHAIN:
            return None
        node = producers.get(node.input[0])
    return None


def residual_adds(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Each residual Add after a quantized Conv: {add, conv, residual (the tensor to quantize), index}."""
    from exporter.onnx.linear_nodes import node_scope

    producers = graph_edit.producers(model)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in inits for i in node.input):
            continue
        convs = [quantized_conv(model, i, producers, inits) for i in node.input]
        skip = [k for k in (0, 1) if convs[k] is not None and
                (node_scope(convs[k], "unet.") or "").rsplit(".", 1)[-1] in RESIDUAL_LAYERS]
        if not skip:
            continue
        fused = skip[-1]
        other = node.input[1 - fused]
        p = producers.get(other)
        if p is not None and p.op_type == "DequantizeLinear":
            continue
        out.append({"add": node.name, "conv": convs[fused].name, "residual": other, "index": 1 - fused})
    return out


def feeds_quantizer(model: onnx.ModelProto, tensor: str, depth: int = 4) -> bool:
    """Whether every reader of `tensor` reaches a QuantizeLinear through pass-through ops only."""
    consumers = graph_edit.consumers(model)
    readers = consumers.get(tensor, [])
    if not readers:
        return False
    for node in readers:
        current, ok = node, False
        for _ in range(depth):
            if current.op_type == "QuantizeLinear":
                ok = True
                break
            nxt = consumers.get(current.output[0], []) if current.op_type in _PASS_THROUGH else []
            if len(nxt) != 1:
                break
            current = nxt[0]
        if not ok:
            return False
    return True


def place_residual_qdq(model: onnx.ModelProto, ranges: Mapping[str, float]) -> dict[str, Any]:
    """Q/DQ (INT8, per tensor, scale = range / 127) on each residual Add's other input, in place; returns a
    record for the manifest. `ranges`: calibrated abs-max per residual tensor (`residual_adds`' "residual")."""
    adds = residual_adds(model)
    nodes = {n.name: n for n in model.graph.node}
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    done: dict[str, str] = {}
    placed = []
    for a in adds:
        conv = nodes[a["conv"]]
        dq = next(n for n in model.graph.node if n.output and n.output[0] == conv.input[1])
        ftype = np.float16 if dtypes.get(dq.input[1]) == TensorProto.FLOAT16 else np.float32
        tensor = a["residual"]
        if tensor not in ranges:
            raise ValueError(f"no calibrated range for residual tensor {tensor}")
        if tensor not in done:
            done[tensor] = static_qdq(model, tensor, max(float(ranges[tensor]), 1e-8) / 127.0, ftype)
        nodes[a["add"]].input[a["index"]] = done[tensor]
        paying = feeds_quantizer(model, nodes[a["add"]].output[0])
        placed.append({**a, "range": float(ranges[tensor]), "output_feeds_quantizer": paying})
    graph_edit.toposort(model)
    paying = sum(p["output_feeds_quantizer"] for p in placed)
    log.info("residual Q/DQ on %d Adds after quantized convolutions (%d of them feed a quantizer)", len(placed), paying)
    return {"adds": len(placed), "adds_feeding_a_quantizer": paying, "per_add": placed}
