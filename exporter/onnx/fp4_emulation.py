"""Run an NVFP4 graph (TensorRT's form) in ONNX Runtime on a CPU: the same arithmetic in standard ONNX ops.

ONNX Runtime 1.31 has no kernel for DequantizeLinear of FLOAT4E2M1 and none for TensorRT's custom
`trt::TRT_FP4DynamicQuantize`. This rewrite replaces, in a copy of the graph:

- every FP4 weight's two DequantizeLinear nodes by the FP32 weight they compute (an E2M1 value times an E4M3
  block scale times the FP32 global scale: exact in FP32), so the Transpose / Cast / MatMul after it are unchanged;
- every dynamic activation quantizer and its two DequantizeLinear nodes by standard ops computing, in FP32,
  per block of 16 along the last axis: s = E4M3(clip(amax / (6 g), 2^-9, 448)) (an FP8 QuantizeLinear /
  DequantizeLinear pair, which ONNX Runtime runs), v = x / (s g), and v rounded to E2M1 with ties to even:
  Round(2|v|)/2 below 2, Round(|v|) below 4, min(2 Round(|v|/2), 6) above (ONNX's Round rounds halves to even,
  and on each of these ranges E2M1's grid is uniform), times sign(v) and s g.

The numbers are the ones `exporter.passes.nvfp4` computes; tests check both against ONNX's reference
QuantizeLinear to FLOAT4E2M1 and the 2-DQ weight chain against ONNX's reference evaluator, element for element.
"""
from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx import graph_edit

log = logging.getLogger(__name__)
MARKER = b"TRT_FP4DynamicQuantize"
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def needs_emulation(path: Path) -> bool:
    """Whether a graph file holds TensorRT's NVFP4 quantizer (a byte search: no protobuf parse of large files)."""
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(MARKER) >= 0


def _fp4_array(t: onnx.TensorProto) -> np.ndarray:
    raw = np.frombuffer(t.raw_data, np.uint8)
    codes = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(t.dims))]
    values = _E2M1[codes & 0x07]
    return np.where(codes & 0x08, -values, values).reshape(list(t.dims))


def _fp8_array(t: onnx.TensorProto) -> np.ndarray:
    import ml_dtypes

    return np.frombuffer(t.raw_data, ml_dtypes.float8_e4m3fn).astype(np.float64).reshape(list(t.dims))


def _const(g: onnx.GraphProto, name: str, value, dtype=np.float32) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name


def _emulate_activation(g: onnx.GraphProto, quant: onnx.NodeProto, scale_dq: onnx.NodeProto, dq: onnx.NodeProto,
                        inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    x, g_name = quant.input[0], quant.input[1]
    gval = np.float32(numpy_helper.to_array(inits[g_name]))
    p = f"{quant.name}.emulated"
    c = lambda part, value, dtype=np.float32: _const(g, f"{p}.{part}", value, dtype)  # noqa: E731
    t = lambda part: f"{p}.{part}"  # noqa: E731
    zero8 = helper.make_tensor(t("zp8"), TensorProto.FLOAT8E4M3FN, [], [0.0])
    g.initializer.append(zero8)
    n = helper.make_node
    return [
        n("Cast", [x], [t("x")], to=TensorProto.FLOAT),
        n("Shape", [t("x")], [t("shape")]),
        n("Reshape", [t("x"), c("blocks_shape", [-1, 16], np.int64)], [t("blocks")]),
        n("Abs", [t("blocks")], [t("abs")]),
        n("ReduceMax", [t("abs"), c("axis1", [1], np.int64)], [t("amax")], keepdims=1),
        n("Div", [t("amax"), c("six_g", np.float32(6.0) * gval)], [t("raw")]),
        # Max/Min rather than Clip: ONNX Runtime's Clip->QuantizeLinear fusion rejects an FP8 zero point
        n("Max", [t("raw"), c("lo", 2.0 ** -9)], [t("floored")]),
        n("Min", [t("floored"), c("hi", 448.0)], [t("clipped")]),
        n("QuantizeLinear", [t("clipped"), c("one", 1.0), t("zp8")], [t("s8")]),
        n("DequantizeLinear", [t("s8"), t("one"), t("zp8")], [t("s")]),
        n("Mul", [t("s"), c("g", gval)], [t("step")]),
        n("Div", [t("blocks"), t("step")], [t("v")]),
        n("Abs", [t("v")], [t("a")]),
        n("Sign", [t("v")], [t("sign")]),
        n("Mul", [t("a"), c("two", 2.0)], [t("a2")]),
        n("Round", [t("a2")], [t("r2")]),
        n("Div", [t("r2"), t("two")], [t("low")]),
        n("Round", [t("a")], [t("mid")]),
        n("Div", [t("a"), t("two")], [t("ah")]),
        n("Round", [t("ah")], [t("rh")]),
        n("Mul", [t("rh"), t("two")], [t("high_raw")]),
        n("Min", [t("high_raw"), c("six", 6.0)], [t("high")]),
        n("Less", [t("a"), t("two")], [t("is_low")]),
        n("Less", [t("a"), c("four", 4.0)], [t("is_mid")]),
        n("Where", [t("is_mid"), t("mid"), t("high")], [t("upper")]),
        n("Where", [t("is_low"), t("low"), t("upper")], [t("mag")]),
        n("Mul", [t("mag"), t("sign")], [t("q")]),
        n("Mul", [t("q"), t("step")], [t("y_blocks")]),
        n("Reshape", [t("y_blocks"), t("shape")], [dq.output[0]]),
    ]


def emulate(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every NVFP4 weight and activation quantizer in standard ops (module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer, users = graph_edit.producers(out), graph_edit.consumers(out)
    drop: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    dropped_inits: set[str] = set()
    activations = weights = 0
    for node in g.node:
        if node.op_type == "TRT_FP4DynamicQuantize":
            scale_dq = next(u for u in users[node.output[1]] if u.op_type == "DequantizeLinear")
            dq = next(u for u in users[node.output[0]] if u.op_type == "DequantizeLinear")
            new_nodes += _emulate_activation(g, node, scale_dq, dq, inits)
            drop |= {id(node), id(scale_dq), id(dq)}
            activations += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and \
                inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1:
            scale_dq = producer[node.input[1]]
            # FP32 products, as DequantizeLinear computes them (x * scale in the scale's type)
            g_w = np.float32(numpy_helper.to_array(inits[scale_dq.input[1]]))
            block_scale = _fp8_array(inits[scale_dq.input[0]]).astype(np.float32) * g_w
            block = next(a.i for a in node.attribute if a.name == "block_size")
            w = _fp4_array(inits[node.input[0]]).astype(np.float32) * np.repeat(block_scale, block, axis=-1)
            g.initializer.append(numpy_helper.from_array(w.astype(np.float32), node.output[0]))
            dropped_inits |= {node.input[0], scale_dq.input[0]}
            drop |= {id(node), id(scale_dq)}
            weights += 1
    kept = [node for node in g.node if id(node) not in drop]
    del g.node[:]
    g.node.extend(kept + new_nodes)
    keep_inits = [t for t in g.initializer if t.name not in dropped_inits]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    graph_edit.prune_initializers(out)
    graph_edit.drop_stale_value_info(out)
    graph_edit.toposort(out)
    log.info("NVFP4 emulated in standard ops for ONNX Runtime: %d activation quantizers, %d weights", activations,
             weights)
    return out
