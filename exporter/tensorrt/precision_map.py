"""What TensorRT will run each compute layer of an ONNX graph in, and that layer's share of the step's FLOPs.

This reads the graph the way a strongly typed TensorRT build does, not the way the exporter meant it:

- Strong typing: TensorRT infers every tensor's type from the network inputs and the operator type
  rules and runs each layer in those types; the FP16/INT8 builder flags do not apply (TensorRT developer
  guide, "Strongly Typed Networks"; the flags were deprecated in 10.12). So a layer's precision is its
  input types, which ONNX's own type rules give (ORT's symbolic shape inference computes them here).
- DequantizeLinear outputs the type of its scale (ONNX DequantizeLinear-21, type constraint T2 on
  x_scale and y; onnx-tensorrt imports DQ with that output type). An FP32 scale makes an FP32 tensor.
- Explicit quantization: a MatMul/Conv whose activation and weight inputs both come from INT8 (or both
  from FP8 E4M3) DequantizeLinear runs as an INT8 (FP8) GEMM and writes the DQ's float type (developer guide, "Explicit
  Quantization" / "Q/DQ Fusion"); a MatMul whose weight comes from an INT4 block DQ is a weight-only INT4
  GEMM computing in the activation's type, which must be FP16 or BF16 ("Working with Quantized Types";
  NVIDIA's ONNX INT4 path, modelopt/onnx/quantization/int4.py, writes FP16 scales).
- An FP32 layer runs as TF32 on tensor cores when the TF32 flag is set (it is, see engines/runtime/tensorrt.py).

`violations` lists what makes a quantized TensorRT engine no faster than the FP16 one: a quantized GEMM,
an attention MatMul or a Softmax in FP32, an INT4 DQ that outputs FP32, and a Cast inside an attention core
(Q.K^T -> Softmax -> .V), which stops TensorRT's fused multi-head attention (ARCHITECTURE.md section 3).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.onnx import graph_edit
from exporter.tensorrt import fp4_rules

COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "Softmax", "LayerNormalization")
_FLOAT_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}
_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT8: 1,
          TensorProto.UINT8: 1, TensorProto.INT64: 8, TensorProto.INT32: 4, TensorProto.BOOL: 1,
          TensorProto.INT4: 0.5, TensorProto.UINT4: 0.5, TensorProto.FLOAT8E4M3FN: 1,
          # NVFP4: 4 bits plus one E4M3 block scale per 16 values
          TensorProto.FLOAT4E2M1: 0.5625}
# ops between the two attention MatMuls that TensorRT's MHA fusion accepts (scale, mask, softmax)
_ATTENTION_INNER = ("Mul", "Div", "Add", "Softmax")


@dataclass(frozen=True)
class Layer:
    node: str
    op: str
    kind: str          # weight GEMM, attention MatMul, Softmax, LayerNorm, Conv
    precision: str     # INT8, INT4 (weight-only, FP16 compute), FP16, FP32 (TF32), ...
    compute: str       # the float type the math or its output runs in: FP16, FP32
    flops: float
    bytes: float       # activations in and out plus weights, at their stored types
    weight_bytes: float
    quantized: bool

    @property
    def group(self) -> str:
        return self.precision.split(" ")[0]


@dataclass
class PrecisionMap:
    latents: int
    batch: int
    layers: list[Layer]
    violations: list[str] = field(default_factory=list)
    attention_cores: int = 0
    fusable_attention_cores: int = 0
    # fusable cores with FP8 Q/DQ on Q, Kᵀ, the softmax output and V: TensorRT's fused FP8 MHA
    fp8_attention_cores: int = 0
    # Q, K, V and output bytes per attention core (what a fused MHA kernel moves), by Softmax node
    attention_io_bytes: dict[str, float] = field(default_factory=dict)
    # read + write bytes of the float elementwise/data-movement ops between the compute layers
    pointwise_bytes: float = 0.0
    # Adds fused into the quantized Conv before them with an INT8 residual input (exporter/tensorrt/residual_rules.py)
    residual_adds_int8: int = 0

    def flop_share(self) -> dict[str, float]:
        total = sum(layer.flops for layer in self.layers) or 1.0
        share: dict[str, float] = defaultdict(float)
        for layer in self.layers:
            share[layer.group] += layer.flops / total
        return dict(sorted(share.items()))

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for layer in self.layers:
            kinds[layer.kind][layer.precision] += 1
        return {"latents": self.latents, "batch": self.batch, "gflops": sum(x.flops for x in self.layers) / 1e9,
                "flop_share": self.flop_share(), "layers": {k: dict(v) for k, v in kinds.items()},
                "attention_cores": self.attention_cores, "fusable_attention_cores": self.fusable_attention_cores,
                "fp8_attention_cores": self.fp8_attention_cores,
                "pointwise_mbytes": self.pointwise_bytes / 1e6,
                "residual_adds_int8": self.residual_adds_int8, "violations": list(self.violations)}

    def table(self) -> str:
        rows = ["| node | kind | precision | GFLOP | share |", "|---|---|---|---|---|"]
        total = sum(x.flops for x in self.layers) or 1.0
        rows += [f"| {x.node} | {x.kind} | {x.precision} | {x.flops / 1e9:.3f} | {100 * x.flops / total:.2f}% |"
                 for x in self.layers]
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "per_layer": [asdict(x) for x in self.layers]}


def _light_copy(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    """The graph without weight data (large float initializers become typed inputs), with the dynamic input
    dims fixed, so shape inference is cheap at full size and never touches external data."""
    g = model.graph
    light = helper.make_model(helper.make_graph([], g.name, [], []), opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    lg = light.graph
    lg.node.extend(g.node)
    fp4_rules.inference_stand_in(light)
    lg.output.extend(g.output)
    for inp in g.input:
        v = lg.input.add()
        v.CopyFrom(inp)
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                # a dim torch.export constrained to a multiple is named "<k>*<label>_over_<k>" (GraphSpec.dim_ranges:
                # the UNet's frames): its value is the label's
                multiple = re.fullmatch(r"(\d+)\*(\w+)_over_\1", d.dim_param)
                if multiple and multiple.group(2) in dims and d.dim_param not in dims:
                    dims = {**dims, d.dim_param: dims[multiple.group(2)]}
                if d.dim_param not in dims:
                    raise ValueError(f"input {v.name} has dynamic dim '{d.dim_param}'; give it a value "
                                     f"(known: {', '.join(dims)})")
                value = dims[d.dim_param]
                d.Clear()
                d.dim_value = value
    for t in g.initializer:
        small = t.data_type in (TensorProto.INT64, TensorProto.INT32) or int(np.prod(t.dims, dtype=np.int64)) <= 64
        if small and t.data_location != TensorProto.EXTERNAL:
            lg.initializer.append(t)
        else:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _infer(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, tuple[int, list[int]]]:
    """name -> (elem type, concrete shape) for every tensor of the graph."""
    import logging

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    inferred = SymbolicShapeInference.infer_shapes(_light_copy(model, dims), auto_merge=True)
    out: dict[str, tuple[int, list[int]]] = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])
    for t in inferred.graph.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def _numel(shape: list[int]) -> float:
    return float(np.prod(shape)) if shape and min(shape) >= 0 else float("nan")


class _Graph:
    def __init__(self, model: onnx.ModelProto, info: dict[str, tuple[int, list[int]]]):
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producers = graph_edit.producers(model)
        self.info = info

    def source(self, name: str) -> tuple[str, onnx.NodeProto | None, int]:
        """('const' | 'weight-dq' | 'act-dq' | 'act', node, type) for a MatMul input. Transpose/Reshape between
        a DQ (or a constant) and the MatMul are looked through: TensorRT moves DQ across them (Q/DQ
        propagation) and folds them into constants."""
        if name in self.inits:
            return "const", None, self.inits[name].data_type
        node = self.producers.get(name)
        fp4 = self._fp4_dq(node)
        if fp4 is not None:  # NVFP4's DQ -> (Transpose) -> Cast FP16 fuses into the FP4 GEMM (fp4_rules.py)
            return ("weight-dq" if fp4.input[0] in self.inits else "act-dq"), fp4, TensorProto.FLOAT4E2M1
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
            if node.input[0] in self.inits:
                return "const", None, self.inits[node.input[0]].data_type
            upstream = self.producers.get(node.input[0])
            if upstream is None or upstream.op_type not in ("DequantizeLinear", "Transpose", "Reshape", "Identity"):
                break
            node = upstream
        if node is not None and node.op_type == "DequantizeLinear":
            x = node.input[0]
            if x in self.inits:
                return "weight-dq", node, self.inits[x].data_type
            return "act-dq", node, self.info.get(x, (TensorProto.INT8, []))[0]
        return "act", node, self.ftype(name)

    def _fp4_dq(self, node: onnx.NodeProto | None) -> onnx.NodeProto | None:
        """The FP4 DequantizeLinear behind a chain of Cast/Transpose/Reshape, if the chain ends in one."""
        while node is not None and node.op_type in ("Cast", "Transpose", "Reshape", "Identity"):
            node = self.producers.get(node.input[0])
        return node if node is not None and fp4_rules.is_fp4_dq(node, self.inits, self.producers) else None

    def fp4_chain(self, node: onnx.NodeProto) -> bool:
        """A Cast/Transpose between an FP4 DQ and its GEMM: part of the GEMM's input, moving no data of its own."""
        return node.op_type in ("Cast", "Transpose") and self._fp4_dq(node) is not None

    def ftype(self, name: str) -> int:
        return self.info.get(name, (0, []))[0]

    def shape(self, name: str) -> list[int]:
        if name in self.inits:
            return list(self.inits[name].dims)
        return self.info.get(name, (0, []))[1]

    def nbytes(self, name: str, storage: int | None = None) -> float:
        elem, shape = (self.inits[name].data_type, list(self.inits[name].dims)) if name in self.inits \
            else self.info.get(name, (0, []))
        return _numel(shape) * _BYTES.get(storage if storage is not None else elem, 4)


def _float_name(elem: int) -> str:
    return _FLOAT_NAMES.get(elem, TensorProto.DataType.Name(elem) if elem else "?")


def _matmul(g: _Graph, n: onnx.NodeProto) -> Layer:
    (ka, na, ta), (kb, nb, tb) = g.source(n.input[0]), g.source(n.input[1])
    out = n.output[0]
    compute = _float_name(g.ftype(out))
    a_shape, out_shape = g.shape(n.input[0]), g.shape(out)
    k = a_shape[-1] if a_shape else -1
    if n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
        k = a_shape[0]
    flops = 2.0 * _numel(out_shape) * k
    weight_side = [(kind, node, t, name) for kind, node, t, name in ((ka, na, ta, n.input[0]), (kb, nb, tb, n.input[1]))
                   if kind in ("const", "weight-dq")]
    act_side = [(kind, t) for kind, _, t, _ in ((ka, na, ta, None), (kb, nb, tb, None)) if kind in ("act", "act-dq")]
    in_bytes = sum(g.nbytes(i, (t if t == TensorProto.FLOAT4E2M1 else TensorProto.INT8) if kind == "act-dq" else None)
                   for i, kind, t in zip(n.input[:2], (ka, kb), (ta, tb)) if kind in ("act", "act-dq")) + g.nbytes(out)
    if weight_side:
        kind_w, dq, t_w, name_w = weight_side[0]
        w_store = dq.input[0] if dq is not None else name_w
        w_bytes = g.nbytes(w_store)
        act_quantized = any(kind == "act-dq" for kind, _ in act_side)
        if kind_w == "weight-dq" and t_w == TensorProto.FLOAT4E2M1 and act_quantized:
            precision, quantized = f"NVFP4 ({compute} out)", True
        elif kind_w == "weight-dq" and t_w in (TensorProto.INT4, TensorProto.UINT4):
            precision, quantized = f"INT4 (weight-only, {compute} compute)", True
        elif kind_w == "weight-dq" and act_quantized:
            kind = "FP8" if t_w == TensorProto.FLOAT8E4M3FN else "INT8"
            precision, quantized = f"{kind} ({compute} out)", True
        else:
            precision, quantized = compute + (" (TF32)" if compute == "FP32" else ""), kind_w == "weight-dq"
        return Layer(n.name, n.op_type, "weight GEMM", precision, compute, flops, in_bytes + w_bytes, w_bytes, quantized)
    both_q = all(kind == "act-dq" for kind, _ in act_side)
    qtype = "FP8" if both_q and all(t == TensorProto.FLOAT8E4M3FN for _, t in act_side) else "INT8"
    precision = f"{qtype} ({compute} out)" if both_q else compute + (" (TF32)" if compute == "FP32" else "")
    return Layer(n.name, n.op_type, "attention MatMul", precision, compute, flops, in_bytes, 0.0, both_q)


def _conv(g: _Graph, n: onnx.NodeProto) -> Layer:
    kind_w, dq, t_w = g.source(n.input[1])
    kind_x, _, _ = g.source(n.input[0])
    w_name = dq.input[0] if dq is not None else n.input[1]
    w_shape = g.shape(w_name)
    per_out = float(np.prod(w_shape[1:])) if w_shape else float("nan")  # weight dims hold in_channels / group
    flops = 2.0 * _numel(g.shape(n.output[0])) * per_out
    compute = _float_name(g.ftype(n.output[0]))
    quantized = kind_w == "weight-dq" and kind_x == "act-dq"
    precision = f"INT8 ({compute} out)" if quantized else compute + (" (TF32)" if compute == "FP32" else "")
    w_bytes = g.nbytes(w_name)
    # a quantized Conv reads its activation as INT8 (the Q/DQ fuses into it), as a quantized GEMM does
    x_bytes = g.nbytes(n.input[0], TensorProto.INT8 if kind_x == "act-dq" else None)
    return Layer(n.name, "Conv", "Conv", precision, compute, flops, x_bytes + g.nbytes(n.output[0]) + w_bytes, w_bytes,
                 quantized)


def _pointwise(g: _Graph, n: onnx.NodeProto, kind: str, flops_per_element: float) -> Layer:
    elem = g.ftype(n.input[0])
    compute = _float_name(elem)
    numel = _numel(g.shape(n.input[0]))
    precision = compute + (" (FP32 accumulate)" if kind == "LayerNorm" and compute != "FP32" else "")
    return Layer(n.name, n.op_type, kind, precision, compute, flops_per_element * numel,
                 g.nbytes(n.input[0]) + g.nbytes(n.output[0]), 0.0, False)


def _attention_cores(g: _Graph, model: onnx.ModelProto) -> tuple[int, int, list[str], dict[str, float]]:
    """For every Softmax fed (through scale/mask ops) by an activation-activation MatMul and feeding one:
    whether the core has a Cast in it (walks back from Softmax and forward to the .V MatMul)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            users[i].append(n)
    cores = fusable = 0
    problems, io = [], {}
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        casts, node = [], g.producers.get(n.input[0])
        while node is not None and node.op_type in ("Cast", *_ATTENTION_INNER[:-1]):
            if node.op_type == "Cast":
                casts.append(node.name)
            node = g.producers.get(node.input[0])
        if node is None or node.op_type != "MatMul" or any(i in g.inits for i in node.input):
            continue
        nxt = users.get(n.output[0], [])
        while len(nxt) == 1 and nxt[0].op_type in ("Cast", "QuantizeLinear", "DequantizeLinear"):
            if nxt[0].op_type == "Cast":
                casts.append(nxt[0].name)
            nxt = users.get(nxt[0].output[0], [])
        if not (len(nxt) == 1 and nxt[0].op_type == "MatMul"):
            continue
        cores += 1
        bmm1, bmm2 = node, nxt[0]
        io[n.name] = sum(_core_input_bytes(g, t) for t in (bmm1.input[0], bmm1.input[1], bmm2.input[1])) + \
            g.nbytes(bmm2.output[0])
        if casts:
            problems.append(f"{n.name}: attention core has Cast {casts[0]} between its MatMuls "
                            "(TensorRT's fused MHA needs Q.K^T -> Softmax -> .V in one type)")
        else:
            fusable += 1
    return cores, fusable, problems, io


def _core_input_bytes(g: _Graph, tensor: str) -> float:
    """Bytes a fused MHA reads for one of Q, Kᵀ, V: FP8 (one byte) where an FP8 DQ feeds it (its Q fuses into the
    op that produced the tensor), else the tensor's own type."""
    kind, dq, t = g.source(tensor)
    return g.nbytes(tensor, TensorProto.FLOAT8E4M3FN) if kind == "act-dq" and t == TensorProto.FLOAT8E4M3FN \
        else g.nbytes(tensor)


def _inside_core(g: _Graph, n: onnx.NodeProto) -> bool:
    """The softmax output's QuantizeLinear: part of the fused FP8 MHA (the score matrix never leaves the chip)."""
    p = g.producers.get(n.input[0]) if n.op_type == "QuantizeLinear" else None
    return p is not None and p.op_type == "Softmax"


def _fp8_cores(model: onnx.ModelProto, layers: list[Layer], pmap: PrecisionMap) -> int:
    """Fusable cores (no Cast, exporter/tensorrt/attention_rules.py for the Q/DQ rules) whose two MatMuls are FP8."""
    if pmap.fusable_attention_cores != pmap.attention_cores:
        return 0
    precision = {x.node: x.precision for x in layers}
    producers, users = graph_edit.producers(model), graph_edit.consumers(model)
    count = 0
    for n in model.graph.node:
        if n.op_type != "Softmax" or n.name not in pmap.attention_io_bytes:
            continue
        nxt = users.get(n.output[0], [])
        while len(nxt) == 1 and nxt[0].op_type in ("QuantizeLinear", "DequantizeLinear"):
            nxt = users.get(nxt[0].output[0], [])
        bmm1 = producers.get(n.input[0])
        if bmm1 is not None and nxt and all(precision.get(m.name, "").startswith("FP8") for m in (bmm1, nxt[0])):
            count += 1
    return count


# ops that move no data in an engine (shape bookkeeping) or that fuse into the GEMM they feed (DQ)
_FREE = ("Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Shape", "Size", "Constant",
         "DequantizeLinear", "Range", "ConstantOfShape")


def _pointwise_bytes(g: _Graph, model: onnx.ModelProto) -> float:
    """Memory traffic of the ops between the compute layers, with TensorRT's pointwise fusion modelled: connected
    elementwise/data-movement ops (QuantizeLinear included, so a pre-scale Mul fuses into the quantizer) form one
    kernel that reads its outside inputs once and writes the tensors used outside it once."""
    pointwise = [n for n in model.graph.node if n.op_type not in COMPUTE_OPS and n.op_type not in _FREE
                 and not _inside_core(g, n) and not g.fp4_chain(n)]
    index = {id(n): i for i, n in enumerate(pointwise)}
    parent = list(range(len(pointwise)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for n in pointwise:
        for i in n.input:
            p = g.producers.get(i)
            if p is not None and id(p) in index:
                parent[find(index[id(p)])] = find(index[id(n)])
    region_of = {o: find(index[id(n)]) for n in pointwise for o in n.output}
    outside_users: set[str] = {o.name for o in model.graph.output}
    for n in model.graph.node:
        here = find(index[id(n)]) if id(n) in index else None
        for i in n.input:
            if i in region_of and region_of[i] != here:
                outside_users.add(i)
    total, seen_inputs = 0.0, set()
    for n in pointwise:
        r = find(index[id(n)])
        for i in n.input:
            if i and i not in g.inits and region_of.get(i) != r and (r, i) not in seen_inputs:
                seen_inputs.add((r, i))
                total += _finite(g.nbytes(i))
    total += sum(_finite(g.nbytes(o)) for o in outside_users if o in region_of)
    return total


def _finite(x: float) -> float:
    return x if x == x else 0.0  # unknown shapes (NaN) count as nothing


def precision_map(model: onnx.ModelProto, latents: int = 1024, batch: int = 2,
                  extra_dims: dict[str, int] | None = None) -> PrecisionMap:
    """The precision map of `model` (weights may be external and unloaded) at `latents` latent frames."""
    dims = {"batch": batch, "length": latents, **(extra_dims or {})}
    g = _Graph(model, _infer(model, dims))
    layers: list[Layer] = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            layers.append(_matmul(g, n))
        elif n.op_type == "Conv":
            layers.append(_conv(g, n))
        elif n.op_type == "Softmax":
            layers.append(_pointwise(g, n, "Softmax", 5.0))
        elif n.op_type == "LayerNormalization":
            layers.append(_pointwise(g, n, "LayerNorm", 8.0))
    pmap = PrecisionMap(latents, batch, layers)
    pmap.attention_cores, pmap.fusable_attention_cores, core_problems, pmap.attention_io_bytes = _attention_cores(g, model)
    pmap.pointwise_bytes = _pointwise_bytes(g, model)
    from exporter.tensorrt.residual_rules import residual_adds

    pmap.residual_adds_int8 = residual_adds(model)[0]
    pmap.fp8_attention_cores = _fp8_cores(model, layers, pmap)
    if any(x.quantized for x in layers):  # the rules below are about quantized (TensorRT-target) graphs
        for x in layers:
            if x.compute == "FP32" and (x.quantized or x.kind in ("attention MatMul", "Softmax")):
                pmap.violations.append(f"{x.node}: {x.kind}{' (quantized)' if x.quantized else ''} would run in FP32")
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in g.inits and \
                    g.inits[n.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4) and \
                    g.ftype(n.output[0]) == TensorProto.FLOAT:
                pmap.violations.append(f"{n.name}: INT4 DequantizeLinear outputs FP32 (TensorRT's INT4 weight-only "
                                       "GEMM takes FP16/BF16)")
        pmap.violations.extend(core_problems)
    return pmap
