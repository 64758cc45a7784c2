"""Fused attention for the ONNX Runtime target: the attention core of the exported DiT as one operator.

The dynamo export writes scaled-dot-product attention as plain ONNX ops: Q and Kᵀ each multiplied by
sqrt(scale), MatMul, Softmax, MatMul with V, Transpose and Reshape back to [B, S, H*D]. ONNX Runtime's CPU
provider runs these one by one (the score matrix [B, H, S, S] goes through memory three times), while
its `com.microsoft.MultiHeadAttention` kernel computes the same core fused, tile by tile. TensorRT cannot
parse `com.microsoft` ops, so this pass runs only where the ONNX Runtime target's graph is written; the
TensorRT target keeps the plain ops (its own fused-MHA pattern matcher reads them).

Rules (each site is checked; a site that does not match all of them is left as it is):
- Softmax on the last axis whose input is MatMul(Mul(Q, a), Mul(Kᵀ, b)) with a, b scalar constants;
- Kᵀ is Transpose(K, [0, 1, 3, 2]) or the export's Reshape(Transpose(Reshape(K), [0, 2, 1])) chain;
- Q, K and V are 4-D [B, H, S, D] with the same static H and D (shapes from the graph's value_info);
- the Softmax output feeds only MatMul(·, V), whose output feeds only Transpose([0, 2, 1, 3]) and that
  only a Reshape (to [B, S, H*D]).
The fused op computes softmax(Q·Kᵀ·a·b)·V: equal to the unfused core to FP32 rounding (tested with real
sessions in tests/test_ort_fusion.py). Nodes left without consumers are removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx import graph_edit

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"
# the fused forms this pass can write: com.microsoft MultiHeadAttention (CPU kernel with a flash-style
# path) or ONNX Attention (opset 23), whatever ONNX Runtime does with it on the CPU
ATTENTION_OPS = ("mha", "attention23")


@dataclass(frozen=True)
class AttentionSite:
    """One matched attention core: its 4-D inputs, combined scale, and the tensors it replaces."""

    softmax: str
    q: str
    k: str
    v: str
    scale: float
    heads: int
    head_dim: int
    core_out: str  # [B, H, S, D] output of MatMul(softmax, V)
    merged_out: str  # [B, S, H*D] output of the Reshape after the Transpose


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.producer = graph_edit.producers(model)
        self.consumers = graph_edit.consumers(model)
        self.consts = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and _attr(n, "value") is not None:
                self.consts[n.output[0]] = _attr(n, "value")
        self.shapes = _shapes(model)

    def node(self, tensor: str, op: str) -> onnx.NodeProto | None:
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, tensor: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar(self, tensor: str) -> float | None:
        t = self.consts.get(tensor)
        if t is None:
            return None
        value = numpy_helper.to_array(t)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def scaled(self, tensor: str) -> tuple[str, float]:
        """(x, a) for tensor = Mul(x, a) with a scalar constant a, else (tensor, 1)."""
        mul = self.node(tensor, "Mul")
        if mul is not None:
            for i, j in ((0, 1), (1, 0)):
                a = self.scalar(mul.input[j])
                if a is not None:
                    return mul.input[i], a
        return tensor, 1.0

    def untransposed(self, kt: str) -> str | None:
        """K for Kᵀ = Transpose(K, [0,1,3,2]) or Reshape(Transpose(Reshape(K), [0,2,1]))."""
        t = self.node(kt, "Transpose")
        if t is not None and list(_attr(t, "perm", [])) == [0, 1, 3, 2]:
            return t.input[0]
        r = self.node(kt, "Reshape")
        t = self.node(r.input[0], "Transpose") if r is not None else None
        r0 = self.node(t.input[0], "Reshape") if t is not None and list(_attr(t, "perm", [])) == [0, 2, 1] else None
        return r0.input[0] if r0 is not None else None

    def bhsd(self, tensor: str) -> tuple[int, int] | None:
        """(H, D) of a 4-D [B, H, S, D] tensor with static H and D."""
        shape = self.shapes.get(tensor)
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1::2]):
            return None
        return shape[1], shape[3]


def find_attention(model: onnx.ModelProto) -> list[AttentionSite]:
    """Every attention core that matches the rules of this module's docstring."""
    g = _Graph(model)
    sites = []
    for sm in model.graph.node:
        if sm.op_type != "Softmax" or _attr(sm, "axis", -1) not in (-1, 3):
            continue
        scores = g.node(sm.input[0], "MatMul")
        pv = g.only_consumer(sm.output[0], "MatMul")
        if scores is None or pv is None or pv.input[0] != sm.output[0]:
            continue
        q, a = g.scaled(scores.input[0])
        kt, b = g.scaled(scores.input[1])
        k = g.untransposed(kt)
        tr = g.only_consumer(pv.output[0], "Transpose")
        merge = g.only_consumer(tr.output[0], "Reshape") if tr is not None else None
        if k is None or merge is None or list(_attr(tr, "perm", [])) != [0, 2, 1, 3]:
            continue
        hd = {g.bhsd(x) for x in (q, k, pv.input[1])}
        if len(hd) != 1 or None in hd:
            log.info("attention at %s left unfused: Q/K/V shapes are not one static [B, H, S, D]", sm.name)
            continue
        heads, head_dim = hd.pop()
        merged = g.shapes.get(merge.output[0])
        if merged is None or len(merged) != 3 or merged[2] not in (heads * head_dim, None):
            continue
        sites.append(AttentionSite(sm.name, q, k, pv.input[1], a * b, heads, head_dim, pv.output[0], merge.output[0]))
    return sites


def _remove_dead(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nothing reads (the replaced cores), repeatedly; returns the count."""
    graph, removed = model.graph, 0
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return removed
        removed += len(graph.node) - len(keep)
        del graph.node[:]
        graph.node.extend(keep)


def _as_bsd(model: onnx.ModelProto, g: _Graph, tensor: str, base: str, hidden: int) -> str:
    """`tensor` [B, H, S, D] as [B, S, H*D]: MultiHeadAttention's CPU kernel takes its flash path only for
    3-D key and value (4-D ones go to the unfused path). Where the tensor is Transpose(x, [0, 2, 1, 3]),
    x is reshaped directly (no data movement); otherwise a Transpose is added."""
    tr = g.node(tensor, "Transpose")
    shape = f"{base}_bsd_shape"
    if not any(t.name == shape for t in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, hidden], np.int64), shape))
    if tr is not None and list(_attr(tr, "perm", [])) == [0, 2, 1, 3]:
        source = tr.input[0]
    else:
        source = f"{base}_bshd"
        model.graph.node.append(helper.make_node("Transpose", [tensor], [source], name=f"{base}_transpose",
                                                 perm=[0, 2, 1, 3]))
    model.graph.node.append(helper.make_node("Reshape", [source, shape], [f"{base}_bsd"], name=f"{base}_reshape"))
    return f"{base}_bsd"


def fuse_attention(model: onnx.ModelProto, op: str = "mha") -> tuple[onnx.ModelProto, int]:
    """Replace each matched attention core by one fused op (`op` in ATTENTION_OPS), in place; returns
    (model, number of sites fused). 'mha' writes com.microsoft MultiHeadAttention with the query as
    [B, S, H*D] (one Transpose added) and K/V as [B, H, S, D], its output replacing the merged [B, S, H*D]
    tensor; 'attention23' writes ONNX Attention on the 4-D tensors (raising the default opset to 23)."""
    if op not in ATTENTION_OPS:
        raise ValueError(f"unknown fused attention op '{op}' (choose from: {', '.join(ATTENTION_OPS)})")
    sites = find_attention(model)
    if not sites:
        return model, 0
    graph = model.graph
    for s in sites:
        base = f"{s.softmax}.fused"
        if op == "mha":
            g = _Graph(model)
            q3, k3, v3 = (_as_bsd(model, g, x, f"{base}.{part}", s.heads * s.head_dim)
                          for x, part in ((s.q, "q"), (s.k, "k"), (s.v, "v")))
            graph.node.append(helper.make_node("MultiHeadAttention", [q3, k3, v3], [s.merged_out], name=f"{base}.mha",
                                               domain=MS_DOMAIN, num_heads=s.heads, scale=s.scale))
        else:
            graph.node.append(helper.make_node("Attention", [s.q, s.k, s.v], [f"{base}.out"], name=f"{base}.attention",
                                               scale=s.scale))
            # the core's consumer (the Transpose back) now reads the fused output
            for n in graph.node:
                for i, name in enumerate(n.input):
                    if name == s.core_out:
                        n.input[i] = f"{base}.out"
    # the replaced nodes: make their outputs unread, then drop everything dead
    replaced = {s.merged_out for s in sites} if op == "mha" else set()
    for n in list(graph.node):
        if n.domain != MS_DOMAIN and replaced & set(n.output):
            graph.node.remove(n)
    _remove_dead(model)
    if op == "mha":
        graph_edit.ensure_opset(model, MS_DOMAIN, 1)
    else:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 23:
                o.version = 23
    graph_edit.toposort(model)
    graph_edit.prune_initializers(model)
    graph_edit.drop_stale_value_info(model)
    log.info("fused %d attention core(s) into %s", len(sites), "MultiHeadAttention" if op == "mha" else "Attention-23")
    return model, len(sites)


# ONNX Runtime session options of the ONNX Runtime target's graphs, chosen by measurement on a quiet machine
# (sao-mini DiT, CFG batch 2, 1024 latents, round-robin; scripts/tune_ort_session.py,
# docs/results/ort_session/quiet/tune.md): against ORT's defaults, spinning off 1.09x slower, no CPU arena
# 1.21x, one intra-op thread 1.65x, optimisation level 'extended' 1.07x, no memory pattern 0.95x (within the
# noise of 5 rounds). Spinning off measured 0.975x only at load average 10 (docs/results/ort_session/tune.md),
# where idle spinning takes cores from other processes; a deployment that shares its cores can set it. The
# thread count stays ORT's default so the graph does not pin one machine's core count.
ORT_SESSION_CONFIG: dict[str, str] = {"enable_cpu_mem_arena": "1", "graph_optimization_level": "all"}
