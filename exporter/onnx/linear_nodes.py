"""Find each torch Linear's MatMul/Gemm in a dynamo-exported ONNX graph.

The dynamo exporter names nodes `node_linear_N` and bias-less weights `val_N`, so names cannot be
matched to modules. Each node carries `pkg.torch.onnx.name_scopes` metadata, the module path it came
from (e.g. ['', 'dit.transformer', 'dit.transformer.layers.0.self_attn.to_qkv', 'linear_6']); that is
the link graph passes use to place smoothing, low-rank branches and Q/DQ on the right MatMul.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class LinearSite:
    """Where one Linear lives in the graph. `weight_in_out` says the initializer is laid out [in, out]
    (MatMul, or Gemm with transB=0); otherwise it is torch's [out, in] (Gemm with transB=1)."""

    layer: str
    node: str
    op_type: str
    activation: str   # the MatMul/Gemm input carrying the activations
    weight: str       # the initializer name
    weight_in_out: bool
    bias: str | None


def node_scope(node: onnx.NodeProto, prefix: str) -> str | None:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            scopes = [s.strip().strip("'\"") for s in prop.value.strip("[]").split(",")]
            if len(scopes) >= 2 and scopes[-2].startswith(prefix):
                return scopes[-2][len(prefix):]
    return None


def locate_linears(model: onnx.ModelProto, layers: list[str], prefix: str = "dit.") -> dict[str, LinearSite]:
    """Map each name in `layers` (module paths relative to the exported DiT) to its LinearSite.

    Raises ValueError naming the first layer that has no single MatMul/Gemm with a constant weight.
    """
    inits = {i.name for i in model.graph.initializer}
    wanted = set(layers)
    found: dict[str, list[LinearSite]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        layer = node_scope(node, prefix)
        if layer not in wanted:
            continue
        weights = [i for i in node.input[:2] if i in inits]
        if len(weights) != 1:
            continue
        activation = node.input[0] if node.input[1] == weights[0] else node.input[1]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        found.setdefault(layer, []).append(LinearSite(layer, node.name, node.op_type, activation, weights[0],
                                                      not (node.op_type == "Gemm" and trans_b), bias))
    for layer in layers:
        if len(found.get(layer, [])) != 1:
            raise ValueError(f"layer {layer} has {len(found.get(layer, []))} MatMul/Gemm sites with a constant "
                             f"weight in the graph (expected 1)")
    return {layer: found[layer][0] for layer in layers}


def weight_out_in(model: onnx.ModelProto, site: LinearSite) -> np.ndarray:
    """The site's weight as torch lays it out, [out, in]."""
    init = next(i for i in model.graph.initializer if i.name == site.weight)
    array = numpy_helper.to_array(init)
    return array.T if site.weight_in_out else array
