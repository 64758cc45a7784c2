"""SmoothQuant as an ONNX graph pass: move activation outliers into the weights, exactly.

For a Linear y = x W^T with per-input-channel activation range a_j and weight range w_j,
s_j = a_j^alpha / w_j^(1 - alpha); x is divided by s and W's input columns multiplied by s, so y is
unchanged in exact arithmetic while x's outlier channels shrink (seed 000's smoothing; `alpha` trades
activation range for weight range). 1/s is folded into the producing LayerNorm's scale and bias when
that LayerNorm feeds only smoothed MatMuls (no extra op, and TensorRT sees a plain LayerNorm);
otherwise an explicit Mul is inserted. Consumers that share one activation tensor share one s, taken
over their combined weight ranges, since one tensor can only be divided once.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter import names
from exporter.onnx_layers import LinearSite, weight_out_in

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
                model.graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), weight_name))
                node = next(n for n in model.graph.node if n.name == m.node)
                node.input[list(node.input).index(m.weight)] = weight_name
            _replace(model, weight_name, scaled.T if m.weight_in_out else scaled)
        producer = producers.get(tensor)
        smoothed_nodes = {m.node for m in members}
        only_smoothed = all(c.name in smoothed_nodes for c in consumers[tensor])
        if producer is not None and producer.op_type == "LayerNormalization" and only_smoothed:
            for k in (1, 2):
                name = producer.input[k] if len(producer.input) > k else ""
                if not name:
                    continue
                folded = numpy_helper.to_array(_init(model, name)) / s
                if uses[name] > 1:  # e.g. the exporter's one deduplicated zero bias shared by every LayerNorm
                    name = names.private(name, producer.name)
                    model.graph.initializer.append(numpy_helper.from_array(folded.astype(np.float32), name))
                    producer.input[k] = name
                _replace(model, name, folded)
            how = "folded into LayerNorm"
        else:
            scale_name = names.smooth_inv(tensor)
            out_name = names.smoothed(tensor)
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
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
