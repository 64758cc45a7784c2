"""SmoothQuant as an ONNX graph pass: move activation outliers into the weights, exactly.

For a Linear y = x W^T with per-input-channel activation range a_j and weight range w_j,
s_j = a_j^alpha / w_j^(1 - alpha); x is divided by s and W's input columns multiplied by s, so y is
unchanged in exact arithmetic while x's outlier channels shrink (seed 000's smoothing; `alpha` trades
activation range for weight range). 1/s is folded into the producing LayerNorm's scale and bias when
that LayerNorm feeds only smoothed MatMuls (no extra op, and TensorRT sees a plain LayerNorm), also
through the Cast of an FP16 graph's FP32 LayerNorm island (LayerNorm -> Cast FP16 -> MatMul, with the
FP16 scale and bias cast up to FP32: the folded values become FP32 constants of their own, so folding
adds no FP16 rounding); otherwise an explicit Mul in the tensor's float type is inserted.
Consumers that share one activation tensor share one s, taken
over their combined weight ranges, since one tensor can only be divided once.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx.linear_nodes import LinearSite, weight_out_in
from exporter.passes import names

EPS = 1e-8


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1 - alpha); channels never active (a_j = 0) or with zero weights keep s = 1."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    s = np.power(np.maximum(a, EPS), alpha) / np.power(np.maximum(w, EPS), 1.0 - alpha)
    s = np.where((a <= EPS) | (w <= EPS), 1.0, s)
    return s.astype(np.float32)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    init = _init(model, name)
    init.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(init).dtype), name))


def _layernorm_source(tensor: str, producers: Mapping[str, onnx.NodeProto], uses: Mapping[str, int]
                      ) -> onnx.NodeProto | None:
    """The LayerNormalization whose output is `tensor`, directly or through one Cast that alone reads it."""
    node = producers.get(tensor)
    if node is not None and node.op_type == "Cast" and uses.get(node.input[0], 0) == 1:
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "LayerNormalization" else None


def _constant(model: onnx.ModelProto, name: str, producers: Mapping[str, onnx.NodeProto]) -> np.ndarray | None:
    """Value of an initializer, or of a Cast of one (the FP16 graph's LayerNorm scale and bias)."""
    inits = {i.name: i for i in model.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Cast" and node.input[0] in inits:
        to = next(a.i for a in node.attribute if a.name == "to")
        return numpy_helper.to_array(inits[node.input[0]]).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    return None


def apply_smoothing(model: onnx.ModelProto, sites: Mapping[str, LinearSite], act_absmax: Mapping[str, np.ndarray],
                    alpha: float) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """Smooth every layer in `sites` (in place on `model`); returns (model, per-layer record). Each
    record holds the factors `s` as an array under `factors` (drop it before writing JSON)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    groups: dict[str, list[LinearSite]] = defaultdict(list)
    for site in sites.values():
        groups[site.activation].append(site)
    uses = {name: len(nodes) for name, nodes in consumers.items()}  # one entry per input slot
    record: dict[str, dict] = {}
    for tensor, members in groups.items():
        weights = {m.layer: weight_out_in(model, m) for m in members}
        w_max = np.max([np.abs(w).max(axis=0) for w in weights.values()], axis=0)
        a_max = np.max([np.asarray(act_absmax[m.layer]) for m in members], axis=0)
        s = smoothing_factors(a_max, w_max, alpha)
        for m in members:
            scaled = weights[m.layer] * s[None, :]
            weight_name = m.weight
            if uses[m.weight] > 1:  # a deduplicated constant shared with another node: give this one its own
                weight_name = names.private(m.weight, m.layer)
                dtype = numpy_helper.to_array(_init(model, m.weight)).dtype
                model.graph.initializer.append(numpy_helper.from_array(scaled.astype(dtype), weight_name))
                node = next(n for n in model.graph.node if n.name == m.node)
                node.input[list(node.input).index(m.weight)] = weight_name
            _replace(model, weight_name, scaled.T if m.weight_in_out else scaled)
        producer = _layernorm_source(tensor, producers, uses)
        smoothed_nodes = {m.node for m in members}
        only_smoothed = all(c.name in smoothed_nodes for c in consumers[tensor])
        affine = [_constant(model, producer.input[k], producers) if len(producer.input) > k and producer.input[k]
                  else None for k in (1, 2)] if producer is not None else []
        if producer is not None and only_smoothed and affine[0] is not None and \
                (len(producer.input) < 3 or not producer.input[2] or affine[1] is not None):
            for k, value in zip((1, 2), affine):
                if value is None:
                    continue
                name = producer.input[k]
                folded = value.astype(np.float64) / s
                if name not in {i.name for i in model.graph.initializer} or uses[name] > 1:
                    # a Cast of an FP16 constant, or the exporter's one deduplicated zero bias shared by every
                    # LayerNorm: this LayerNorm gets its own constant, in the type the LayerNorm computes in
                    name = names.private(name, producer.name)
                    model.graph.initializer.append(numpy_helper.from_array(folded.astype(value.dtype), name))
                    producer.input[k] = name
                else:
                    _replace(model, name, folded)
            how = "folded into LayerNorm"
        else:
            scale_name = names.smooth_inv(tensor)
            out_name = names.smoothed(tensor)
            dtype = numpy_helper.to_array(_init(model, members[0].weight)).dtype
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(dtype), scale_name))
            mul = helper.make_node("Mul", [tensor, scale_name], [out_name], name=names.smooth_mul(tensor))
            for m in members:
                node = next(n for n in model.graph.node if n.name == m.node)
                for k, name in enumerate(node.input):
                    if name == tensor:
                        node.input[k] = out_name
            index = next(k for k, n in enumerate(model.graph.node) if n.name in smoothed_nodes)
            model.graph.node.insert(index, mul)
            how = "explicit Mul"
        for m in members:
            record[m.layer] = {"smoothed": True, "how": how, "alpha": alpha, "shared_with": len(members) - 1,
                               "act_range_before": float(a_max.max()), "act_range_after": float((a_max / s).max()),
                               "factors": s}  # an array: the quantizer divides calibrated ranges by it
    return model, record
