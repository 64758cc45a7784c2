"""Fold smoothing's explicit per-channel Muls into the Linear that produced their input, exactly.

Smoothing divides a Linear's input channel j by s_j. Where that input comes from a LayerNorm, 1/s goes
into its scale and bias (`exporter.passes.smoothing`); elsewhere smoothing writes `x * (1/s)` as a Mul. For
three producers of x the Mul can go too, because x's channel j is a linear function of one output column
of an earlier Linear with a constant weight:

- x = MatMul(h, W) [+ b]: scale column j of W (and b_j). In the DiT: the cross-attention context, read
  by every block's `to_kv`.
- GLU, x = Mul(a, gate(g)) with a = Split(MatMul(h, W) + b)[i]: y_j = a_j * gate_j, so scale the columns
  of W and b that make a_j (the value half of `ff.ff.0.proj`); the gate is left alone.
- attention output, x = Reshape(Transpose(P · V)) with V = Transpose(Reshape(v)), v a Split slice of
  `to_qkv` / `to_kv`, both permutations [0, 2, 1, 3] and the Reshapes splitting and merging the last axis
  as (H, D): output channel h*D + d is sum_k P[h, s, k] V[h, k, d], linear in V's channel h*D + d alone
  (P depends on Q and K only), so scale the V columns of that projection. Grouped-query attention
  (repeat_interleave of K/V heads) does not match: one V channel feeds several output channels.

Each tensor on the way from W to the Mul must have that path as its only consumer, so scaling changes
nothing else. The quantizer's view is unchanged: per-output-channel INT8 scales and INT4 (block, column)
scales scale with their column, so round-to-nearest, the MSE clip and GPTQ (whose H is the input side)
pick the same codes; the calibrated ranges of x are already divided by s. The one exception is an SVD
low-rank branch on the producing layer, whose split depends on column scaling: still an exact float
fold, a slightly different quantization. Why bother: each Mul is a pass over a [B, S, C] tensor that
ONNX Runtime runs as its own kernel, and for TensorRT a pointwise op between a tensor and its Q node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx import graph_edit
from exporter.passes import names

log = logging.getLogger(__name__)
_SMOOTH_MUL_SUFFIX = names.smooth_mul("")  # every smoothing Mul's node name ends with this


@dataclass(frozen=True)
class _Columns:
    """Columns [offset, offset + width) of a MatMul's constant [K, N] weight (and of its bias)."""

    matmul: onnx.NodeProto
    bias: str | None
    offset: int


class _View:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producer = graph_edit.producers(model)
        self.consumers = graph_edit.consumers(model)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                 for d in vi.type.tensor_type.shape.dim]
                       for vi in list(model.graph.value_info) + list(model.graph.output)}

    def sole(self, tensor: str, op: str) -> onnx.NodeProto | None:
        """The producer of `tensor` if it is an `op` and `tensor` has exactly one consumer."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != op or len(self.consumers.get(tensor, [])) != 1:
            return None
        return node

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def last_dim(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return shape[-1] if shape else None

    def perm(self, node: onnx.NodeProto | None) -> list[int] | None:
        if node is None:
            return None
        return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def _linear(view: _View, tensor: str) -> _Columns | None:
    """x = MatMul(h, W) or MatMul(h, W) + b with W a constant [K, N] and b a constant [N]."""
    add = view.sole(tensor, "Add")
    bias = None
    if add is not None:
        for i, j in ((0, 1), (1, 0)):
            b = view.const(add.input[j])
            if b is not None and b.ndim == 1 and view.sole(add.input[i], "MatMul") is not None:
                tensor, bias = add.input[i], add.input[j]
                break
        else:
            return None
    matmul = view.sole(tensor, "MatMul")
    if matmul is None:
        return None
    w = view.const(matmul.input[1])
    if w is None or w.ndim != 2 or (bias is not None and view.const(bias).shape[0] != w.shape[1]):
        return None
    return _Columns(matmul, bias, 0)


def _split_slice(view: _View, tensor: str) -> _Columns | None:
    """x = Split(linear, last axis)[i]: the linear's columns of slice i."""
    split = view.sole(tensor, "Split")
    if split is None:
        return None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    whole = view.last_dim(split.input[0])
    rank = len(view.shapes.get(split.input[0]) or [])
    if not rank or axis not in (-1, rank - 1) or len(view.consumers.get(split.input[0], [])) != 1:
        return None
    if len(split.input) > 1 and split.input[1]:
        sizes = view.const(split.input[1])
        if sizes is None:
            return None
        sizes = [int(v) for v in sizes]
    elif whole:
        sizes = [whole // len(split.output)] * len(split.output)
    else:
        return None
    index = list(split.output).index(tensor)
    source = _linear(view, split.input[0])
    if source is None or view.last_dim(tensor) not in (None, sizes[index]):
        return None
    return _Columns(source.matmul, source.bias, sum(sizes[:index]))


def _glu_value(view: _View, tensor: str) -> _Columns | None:
    mul = view.sole(tensor, "Mul")
    if mul is None:
        return None
    for value in mul.input:
        if view.producer.get(value) is not None and view.producer[value].op_type == "Split":
            found = _split_slice(view, value)
            if found is not None and view.last_dim(value) == view.last_dim(tensor):
                return found
    return None


def _attention_value(view: _View, tensor: str) -> _Columns | None:
    merge = view.sole(tensor, "Reshape")
    back = view.sole(merge.input[0], "Transpose") if merge is not None else None
    core = view.sole(back.input[0], "MatMul") if view.perm(back) == [0, 2, 1, 3] else None
    v4 = core.input[1] if core is not None else None
    heads = view.sole(v4, "Transpose") if v4 is not None else None
    split_heads = view.sole(heads.input[0], "Reshape") if view.perm(heads) == [0, 2, 1, 3] else None
    if split_heads is None:
        return None
    shape = view.shapes.get(v4) or []
    channels = view.last_dim(tensor)
    if len(shape) != 4 or not shape[1] or not shape[3] or channels != shape[1] * shape[3] \
            or view.last_dim(split_heads.input[0]) != channels:
        return None  # not a plain (H, D) split and merge of the same channels, e.g. grouped-query attention
    return _split_slice(view, split_heads.input[0]) or _linear(view, split_heads.input[0])


def _source(view: _View, tensor: str) -> tuple[_Columns, str] | None:
    for kind, find in (("linear", _linear), ("GLU value", _glu_value), ("attention value", _attention_value)):
        found = find(view, tensor)
        if found is not None:
            return found, kind
    return None


def _scale_columns(model: onnx.ModelProto, view: _View, name: str, owner: str, offset: int,
                   factor: np.ndarray, axis: int) -> str:
    """Multiply entries [offset, offset + len(factor)) along `axis` of constant `name` by `factor`, in a
    private copy if other nodes read the constant too; returns the name now to use."""
    value = view.const(name)
    scaled = value.astype(np.float64)
    index = [slice(None)] * value.ndim
    index[axis] = slice(offset, offset + factor.size)
    shape = [1] * value.ndim
    shape[axis] = factor.size
    scaled[tuple(index)] *= factor.reshape(shape)
    array = numpy_helper.from_array(scaled.astype(value.dtype), name)
    if len(view.consumers.get(name, [])) > 1:
        array.name = names.private(name, owner)
        model.graph.initializer.append(array)
        view.inits[array.name] = array
        return array.name
    view.inits[name].CopyFrom(array)
    return name


def fold_smoothing_muls(model: onnx.ModelProto) -> dict[str, str]:
    """Remove every smoothing Mul whose input a producing Linear can absorb (in place). Returns
    {the Mul's output tensor: what it was folded into}; Muls that do not match stay as they are."""
    folded: dict[str, str] = {}
    for mul in [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith(_SMOOTH_MUL_SUFFIX)]:
        view = _View(model)
        x, scale = mul.input
        factor = view.const(scale)
        found = _source(view, x) if factor is not None and factor.ndim == 1 else None
        if found is None:
            continue
        cols, kind = found
        factor = factor.astype(np.float64)
        weight = view.const(cols.matmul.input[1])
        if cols.offset + factor.size > weight.shape[1]:
            continue
        cols.matmul.input[1] = _scale_columns(model, view, cols.matmul.input[1], cols.matmul.name,
                                              cols.offset, factor, axis=1)
        if cols.bias is not None:
            add = view.consumers[cols.matmul.output[0]][0]
            new = _scale_columns(model, view, cols.bias, add.name, cols.offset, factor, axis=0)
            add.input[list(add.input).index(cols.bias)] = new
        for node in view.consumers.get(mul.output[0], []):
            for k, name in enumerate(node.input):
                if name == mul.output[0]:
                    node.input[k] = x
        model.graph.node.remove(mul)
        folded[mul.output[0]] = f"folded into {cols.matmul.name} ({kind})"
    graph_edit.prune_initializers(model)
    if folded:
        log.debug("folded %d smoothing Mul(s) into their producing Linears", len(folded))
    return folded
