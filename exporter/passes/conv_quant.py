"""W8A8 of a UNet graph: INT8 Conv2d and Linear, smoothed and timestep-aware, as standard Q/DQ.

Per activation tensor (the layers that read it share one quantizer, e.g. to_q / to_k / to_v, as TensorRT
wants for one INT8 input), in this order:

1. Smoothing (SmoothQuant, generalised to Conv2d): per input channel c, s_c = amax_c^a / wmax_c^(1-a), with
   amax_c the calibrated abs-max over all buckets and wmax_c the weight abs-max over everything that multiplies
   channel c (all output channels, and for a convolution all kh x kw taps: the weight viewed as
   [out, in * kh * kw] has channel c's columns side by side). The activation is multiplied by 1/s_c
   (a Mul on [1, C, 1, 1] for a Conv input, [C] for a Linear) and the weight's channel-c slice by s_c. Zero
   padding commutes with a per-channel scale, so the convolution's output is unchanged in exact arithmetic.
2. Timestep awareness (per-bucket-scale, as for the DiT: `exporter.passes.quantize`): the bucket index comes
   from the graph's `timestep` input, the activation is multiplied by pre[bucket] = R / range[bucket] (R the
   smallest bucket range, so entries <= 1 and FP16 cannot overflow), quantized with the constant scale R/127,
   and each layer's output *before its bias* is multiplied by 1/pre[bucket]. Conv and Gemm carry their bias
   inside the node, so it is split out into an Add after the post-scale (convolution is linear only without
   it). TensorRT needs constant Q scales; this keeps them constant and still gives each bucket its own range.
3. Activation Q -> DQ (INT8, per tensor, zero point 0) and weight DQ (INT8 per output channel: axis 0 of a
   Conv's [O, I, kh, kw] and of a transB Gemm's [N, K], axis 1 of a MatMul's [K, N]): the pattern TensorRT
   fuses into an INT8 convolution / GEMM with the scales folded (TensorRT developer guide, "Working with
   Quantized Types": Q/DQ layer placement, weights quantized per output channel along axis 0 for
   convolution) and ONNX Runtime into QLinearConv / MatMulIntegerToFloat.

Every constant is in the float type of the layer's weight (FP16 in the TensorRT target's FP16 base graph), so
under strong typing the INT8 layers write FP16 (ARCHITECTURE.md section 3).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.onnx import graph_edit
from exporter.onnx.linear_nodes import node_scope
from exporter.passes import names, qdq
from exporter.passes.quantize import PRESCALE_MAX, bucket_index, gathered, static_qdq

log = logging.getLogger(__name__)
METHODS = ("minmax", "smoothquant", "timestep-smoothquant")


@dataclass(frozen=True)
class WeightedSite:
    """One Conv / MatMul / Gemm with a constant weight. `k_axis` is the weight axis along input channels,
    `n_axis` along output channels; `bias` is the node's own bias input (Conv, Gemm), if any."""

    layer: str
    node: str
    op_type: str
    activation: str
    weight: str
    k_axis: int
    n_axis: int
    bias: str | None


def locate_sites(model: onnx.ModelProto, layers: Sequence[str], prefix: str = "unet.") -> dict[str, WeightedSite]:
    """Each module path in `layers` -> its node (found by the exporter's name-scope metadata); ValueError
    naming a layer without exactly one weighted node."""
    inits = {i.name for i in model.graph.initializer}
    wanted = set(layers)
    found: dict[str, list[WeightedSite]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        layer = node_scope(node, prefix)
        if layer not in wanted:
            continue
        if node.op_type == "Conv":
            if node.input[1] not in inits or _attr(node, "group", 1) != 1:
                continue
            found[layer].append(WeightedSite(layer, node.name, "Conv", node.input[0], node.input[1], 1, 0,
                                             node.input[2] if len(node.input) > 2 and node.input[2] else None))
            continue
        weights = [i for i in node.input[:2] if i in inits]
        if len(weights) != 1 or node.input[1] != weights[0]:
            continue
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        found[layer].append(WeightedSite(layer, node.name, node.op_type, node.input[0], weights[0],
                                         1 if trans_b else 0, 0 if trans_b else 1, bias))
    for layer in layers:
        if len(found.get(layer, [])) != 1:
            raise ValueError(f"layer {layer} has {len(found.get(layer, []))} weighted Conv/MatMul/Gemm nodes in the "
                             "graph (expected 1)")
    return {layer: found[layer][0] for layer in layers}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def per_channel_view(w: np.ndarray, k_axis: int) -> np.ndarray:
    """[K, rest]: channel k's weights in row k (a Conv's out and kh x kw together)."""
    return np.moveaxis(w, k_axis, 0).reshape(w.shape[k_axis], -1)


def broadcast_along(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def int8_weight(w: np.ndarray, n_axis: int, dtype: type, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output channel on 2^(bits-1) - 1 levels each side (INT8 codes hold any bits <= 8: the
    bit-width studies use that): (codes like `w`, scale [N] in `dtype`)."""
    qmax = float(2 ** (bits - 1) - 1)
    absmax = np.abs(np.moveaxis(w, n_axis, 0).reshape(w.shape[n_axis], -1)).max(axis=1)
    scale = qdq.positive_scale(np.maximum(absmax.astype(np.float64) / qmax, 1e-12), dtype)
    codes = np.clip(np.rint(w / broadcast_along(scale.astype(np.float64), w.ndim, n_axis)), -qmax, qmax).astype(np.int8)
    return codes, scale


def smoothing_factors(amax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """s_c = amax_c^alpha / wmax_c^(1 - alpha), weights given as [C, rest] views; 1 where either is 0."""
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    a = np.asarray(amax, np.float64)
    s = np.where((a > 0) & (wmax > 0), np.power(np.maximum(a, 1e-30), alpha) / np.power(np.maximum(wmax, 1e-30),
                                                                                           1 - alpha), 1.0)
    return np.clip(s, 1e-4, 1e4)


def add_constant(model: onnx.ModelProto, array: np.ndarray, name: str, dtype: type) -> str:
    model.graph.initializer.append(qdq.constant(array, name, dtype))
    return name


def activation_rank(site: WeightedSite) -> int:
    """The rank of the site's activation and output: a Conv2d's [B, C, H, W], a Gemm's [B, K] (the exporter
    writes a Linear on a 2-D input as Gemm), a MatMul's [B, S, K] (the transformer blocks' Linears)."""
    return {"Conv": 4, "Gemm": 2}.get(site.op_type, 3)


def _split_bias(model: onnx.ModelProto, node: onnx.NodeProto, site: WeightedSite, post: str, ftype: type) -> None:
    """node's output y becomes (y_without_bias * post) + bias (see step 2 of the module docstring)."""
    out = node.output[0]
    raw, scaled = names.matmul_out(site.layer, "nobias"), names.matmul_out(site.layer, "post")
    node.output[0] = raw
    nodes = [helper.make_node("Mul", [raw, post], [scaled] if site.bias else [out], name=names.node(site.layer, "post"))]
    if site.bias:
        bias = numpy_helper.to_array(initializer(model, site.bias)).astype(ftype)
        del node.input[2]
        rank = activation_rank(site) if site.op_type == "Conv" else 1
        b = add_constant(model, bias.reshape([1, -1] + [1] * (rank - 2)) if site.op_type == "Conv" else bias,
                   names.private(site.bias, site.layer), ftype)
        nodes.append(helper.make_node("Add", [scaled, b], [out], name=names.node(site.layer, "bias")))
    model.graph.node.extend(nodes)


def quantize_unet(model: onnx.ModelProto, sites: Mapping[str, WeightedSite], ch_absmax: Mapping[str, np.ndarray],
                  edges: Sequence[float], method: str = "timestep-smoothquant", alpha: float = 0.5,
                  t_input: str = "timestep") -> dict[str, dict[str, Any]]:
    """Quantize every site in place (see the module docstring); `ch_absmax[layer]` is [K buckets, C]. Returns
    a record per layer (scales, smoothing, bucket ranges) for the manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
    nodes = {n.name: n for n in model.graph.node}
    groups: dict[str, list[WeightedSite]] = defaultdict(list)
    for site in sites.values():
        groups[site.activation].append(site)
    record: dict[str, dict[str, Any]] = {}
    bucket = None
    for tensor, members in groups.items():
        ftype = {onnx.TensorProto.FLOAT16: np.float16}.get(initializer(model, members[0].weight).data_type, np.float32)
        weights = {s.layer: numpy_helper.to_array(initializer(model, s.weight)).astype(np.float64) for s in members}
        amax = np.max([np.asarray(ch_absmax[s.layer], np.float64) for s in members], axis=0)  # [K, C]
        rank = activation_rank(members[0])
        x = tensor
        factors = np.ones(amax.shape[1])
        if method != "minmax":
            factors = smoothing_factors(amax.max(axis=0), [per_channel_view(weights[s.layer], s.k_axis)
                                                            for s in members], alpha)
            inv = add_constant(model, broadcast_along(1.0 / factors, rank, 1 if rank == 4 else rank - 1),
                         names.smooth_inv(tensor), ftype)
            model.graph.node.append(helper.make_node("Mul", [tensor, inv], [names.smoothed(tensor)],
                                                     name=names.smooth_mul(tensor)))
            x = names.smoothed(tensor)
            for s in members:
                weights[s.layer] = weights[s.layer] * broadcast_along(factors, weights[s.layer].ndim, s.k_axis)
        ranges = np.maximum((amax / factors[None, :]).max(axis=1), 1e-8)  # per bucket
        per_bucket = method == "timestep-smoothquant" and len(ranges) > 1
        if per_bucket:
            if bucket is None:
                bucket = bucket_index(model, edges, t_input)
            smallest = max(float(ranges.min()), float(ranges.max()) / PRESCALE_MAX)
            pre = (smallest / np.maximum(ranges, smallest)).astype(ftype)
            scaled = names.act(tensor, "prescaled")
            model.graph.node.append(helper.make_node("Mul", [x, gathered(model, tensor, "prescale", pre, bucket, rank)],
                                                     [scaled], name=names.node(tensor, "prescale")))
            post = gathered(model, tensor, "postscale", (1.0 / pre.astype(np.float64)).astype(ftype), bucket, rank)
            x_q = static_qdq(model, scaled, smallest / 127.0, ftype)
        else:
            x_q = static_qdq(model, x, float(ranges.max()) / 127.0, ftype)
        for s in members:
            node = nodes[s.node]
            codes, scale = int8_weight(weights[s.layer], s.n_axis, ftype)
            g = model.graph
            g.initializer.extend([numpy_helper.from_array(codes, names.weight_q(s.layer)),
                                  qdq.constant(scale, names.weight_scale(s.layer), ftype)])
            g.node.append(helper.make_node("DequantizeLinear", [names.weight_q(s.layer), names.weight_scale(s.layer)],
                                           [names.weight_dq(s.layer)], axis=s.n_axis,
                                           name=names.node(s.layer, "weight_dq")))
            node.input[0], node.input[1] = x_q, names.weight_dq(s.layer)
            if per_bucket:
                _split_bias(model, node, s, post, ftype)
            record[s.layer] = {"op": s.op_type, "activation": tensor, "shared_with": len(members),
                               "act_scale": float(ranges.min() if per_bucket else ranges.max()) / 127.0,
                               "bucket_ranges": [round(float(r), 6) for r in ranges], "per_bucket": per_bucket,
                               "smoothing": None if method == "minmax" else
                               {"alpha": alpha, "min": float(factors.min()), "max": float(factors.max())}}
    graph_edit.prune_initializers(model)
    graph_edit.toposort(model)
    return record
