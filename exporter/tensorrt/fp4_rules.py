"""TensorRT's rules for NVFP4 GEMMs (the `nvfp4` scheme), checked on a finished graph, and how the precision map
reads them.

The form (exporter/passes/nvfp4_nodes.py) and the rules, with their sources:
- "FP4 quantizer": an activation is quantized by `trt::TRT_FP4DynamicQuantize` with block_size 16, an axis that is
  the last or second-to-last dimension, FP8 E4M3 block scales (scale_type 17) and a constant scalar double-
  quantization scale (TensorRT operator reference, DynamicQuantize: "block size is currently limited to 16 for FP4",
  "the axis must be the last dimension or the second to last dimension", input 1 "a scalar scale factor used to
  quantize the computed block scales"). Its two outputs feed exactly the NVFP4 2-DQ pattern NVIDIA's exporter
  writes (modelopt/torch/quantization/export_onnx.py `_fp4_dynamic_quantize`, `_fp4_dequantize_2`).
- "FP4 weights": a FLOAT4E2M1 initializer dequantized along its last axis in blocks of 16, by E4M3 block scales that
  are themselves an FP8 initializer dequantized by a constant scalar (ModelOpt's 2-DQ weight,
  modelopt/onnx/export/nvfp4_exporter.py `_replace_fp4qdq_with_2dq`), with an even last dimension divisible by 16.
- "FP4 opset": FLOAT4E2M1 in DequantizeLinear came with opset 23 (ONNX operator changelog; ModelOpt raises the
  opset to 23 for NVFP4).
- "FP4 on both inputs": a GEMM with an FP4 weight reads an FP4-quantized activation and vice versa; TensorRT has no
  FP4 x INT8 / FP4 x FP8 GEMM (the FP8 rule of exporter/tensorrt/checker.py, one quantized type per GEMM).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx import graph_edit

QUANTIZER = "TRT_FP4DynamicQuantize"
BLOCK = 16


def _attr(n: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    return next((a.i for a in n.attribute if a.name == name), default)


def _scalar(inits: dict[str, onnx.TensorProto], name: str) -> float | None:
    t = inits.get(name)
    if t is None or int(np.prod(t.dims, dtype=np.int64)) != 1:
        return None
    return float(numpy_helper.to_array(t).reshape(()))


def is_fp4_dq(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> bool:
    """A DequantizeLinear whose data is FP4 (a FLOAT4E2M1 weight or the dynamic quantizer's output): its scale is
    computed (the block scales' DQ), so the per-tensor-constant rule of the INT8/FP8 path does not apply."""
    if n.op_type != "DequantizeLinear":
        return False
    x = n.input[0]
    if x in inits:
        return inits[x].data_type == TensorProto.FLOAT4E2M1
    p = producers.get(x)
    return p is not None and p.op_type == QUANTIZER


def _through(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(name)
    while node is not None and node.op_type in ("Cast", "Transpose", "Reshape", "Identity"):
        node = producers.get(node.input[0])
    return node


def check_fp4(model: onnx.ModelProto) -> Iterator[tuple[str, str, str]]:
    """(rule, node, detail) for every NVFP4 rule the graph breaks (nothing for a graph without FP4)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers, users = graph_edit.producers(model), graph_edit.consumers(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    has_fp4 = False
    for n in g.node:
        if n.op_type == QUANTIZER:
            has_fp4 = True
            yield from _check_quantizer(n, inits, users)
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.FLOAT4E2M1:
            has_fp4 = True
            yield from _check_weight(n, inits, producers)
        elif n.op_type in ("MatMul", "Gemm"):
            sides = [_through(i, producers) for i in n.input[:2]]
            fp4 = [s is not None and is_fp4_dq(s, inits, producers) for s in sides]
            quantized = [s is not None and s.op_type == "DequantizeLinear" for s in sides]
            if any(fp4) and not all(fp4):
                other = "INT8/FP8 Q/DQ" if all(quantized) else "no quantizer"
                yield ("FP4 on both inputs", n.name, f"one input is NVFP4 and the other has {other}; TensorRT's FP4 "
                       "GEMM takes FP4 on both")
    if has_fp4 and opset < 23:
        yield ("FP4 opset", g.name or "graph", f"FLOAT4E2M1 DequantizeLinear needs opset >= 23, graph has {opset}")


def _check_quantizer(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], users: dict[str, list[onnx.NodeProto]]
                     ) -> Iterator[tuple[str, str, str]]:
    if n.domain != "trt":
        yield ("FP4 quantizer", n.name, f"{QUANTIZER} must be in the 'trt' domain, is in '{n.domain}'")
    if _attr(n, "block_size") != BLOCK:
        yield ("FP4 quantizer", n.name, f"block_size must be {BLOCK}, got {_attr(n, 'block_size')}")
    if _attr(n, "axis", -1) not in (-1, -2):
        yield ("FP4 quantizer", n.name, f"axis must be the last or second-to-last dimension, got {_attr(n, 'axis')}")
    if _attr(n, "scale_type") != TensorProto.FLOAT8E4M3FN:
        yield ("FP4 quantizer", n.name, "block scales must be FLOAT8E4M3FN (scale_type 17)")
    g = _scalar(inits, n.input[1]) if len(n.input) > 1 else None
    if g is None or not (np.isfinite(g) and g > 0):
        yield ("FP4 quantizer", n.name, "the double-quantization scale must be a positive constant scalar")
    data_users = users.get(n.output[0], [])
    scale_users = users.get(n.output[1], []) if len(n.output) > 1 else []
    if not data_users or any(u.op_type != "DequantizeLinear" or _attr(u, "block_size") != BLOCK for u in data_users):
        yield ("FP4 quantizer", n.name, "its FP4 output must feed DequantizeLinear with block_size 16 only")
    if not scale_users or any(u.op_type != "DequantizeLinear" or u.input[1] != n.input[1] for u in scale_users):
        yield ("FP4 quantizer", n.name, "its block scales must feed DequantizeLinear by the same global scale only")


def _check_weight(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
                  ) -> Iterator[tuple[str, str, str]]:
    w = inits[n.input[0]]
    axis = _attr(n, "axis", 1)
    if _attr(n, "block_size") != BLOCK or axis not in (-1, len(w.dims) - 1):
        yield ("FP4 weights", n.name, f"FP4 weight {w.name} must be dequantized in blocks of {BLOCK} along its last "
               f"axis (block_size {_attr(n, 'block_size')}, axis {axis})")
    if not w.dims or w.dims[-1] % BLOCK or w.dims[-1] % 2:
        yield ("FP4 weights", n.name, f"FP4 weight {w.name} {list(w.dims)}: the last dimension must be even and "
               f"divisible by {BLOCK}")
    scale_dq = producers.get(n.input[1])
    ok = (scale_dq is not None and scale_dq.op_type == "DequantizeLinear" and scale_dq.input[0] in inits
          and inits[scale_dq.input[0]].data_type == TensorProto.FLOAT8E4M3FN)
    if not ok:
        yield ("FP4 weights", n.name, f"the block scales of {w.name} must be an FP8 E4M3 initializer dequantized by "
               "a constant scalar (NVFP4's two-level scale)")
        return
    g = _scalar(inits, scale_dq.input[1])
    if g is None or not (np.isfinite(g) and g > 0):
        yield ("FP4 weights", scale_dq.name, "the block scales' scale must be a positive constant scalar")
    expected = list(w.dims[:-1]) + [w.dims[-1] // BLOCK]
    if list(inits[scale_dq.input[0]].dims) != expected:
        yield ("FP4 weights", scale_dq.name, f"block scales {list(inits[scale_dq.input[0]].dims)} != {expected}")


def inference_stand_in(model: onnx.ModelProto) -> None:
    """For shape inference only (the precision map's light copy): each activation quantizer chain becomes a Cast of
    its input to FP32, which is the FP32 tensor of the same shape its 2-DQ computes. ONNX's shape inference cannot
    see into the custom op."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    drop, add = set(), []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and producers.get(n.input[0]) is not None \
                and producers[n.input[0]].op_type == QUANTIZER:
            quant = producers[n.input[0]]
            scale_dq = producers.get(n.input[1])
            drop |= {id(n), id(quant)} | ({id(scale_dq)} if scale_dq is not None else set())
            add.append(helper.make_node("Cast", [quant.input[0]], [n.output[0]], to=TensorProto.FLOAT,
                                        name=f"{n.name}.stand_in"))
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept + add)
