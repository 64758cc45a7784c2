"""Mixed and low-bit precision of a UNet graph's Conv2d / Linear sites: INT4 weights (w4a16, w4a8), GPTQ-style
rounding and the SVD low-rank branch, a precision per layer (`LayerPlan`), beside conv_quant's uniform W8A8.

A convolution's weight [O, I, kh, kw] is handled as the matrix W [K = kh*kw*I, N = O] in *tap-major* order
(row k = (u*kw + v) * I + c: tap (u, v), input channel c). conv(x, W) is then im2col(x) @ W, so everything
written for a Linear's [K, N] weight holds for it: GPTQ needs E[p p^T] over the im2col'd patches p, in the same
order (`engines.calibrate.unet_moments`), and an INT4 block of B rows is B input channels of one tap, which is
exactly ONNX's blocked DequantizeLinear on axis 1 of [O, I, kh, kw] (scale [O, I/B, kh, kw]) when B divides I.

Where each form runs (facts, cited):
- INT4 weight-only on TensorRT is a GEMM path only: "WoQ is available only for INT4 block quantization with
  GEMM layers" (TensorRT developer guide, "Working with Quantized Types", weight-only quantization;
  docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html). So on the TensorRT
  target (the FP16 base graph) a 4-bit Conv2d is refused by `plan_layers` and stays FP16; its Linears (MatMul)
  take INT4 blocks of 64 or 128 (`recipe.TRT_INT4_BLOCKS`). W4A8 does not exist in TensorRT outside
  TensorRT-LLM (ARCHITECTURE.md section 3): refused there.
- ONNX Runtime runs a blocked INT4 DequantizeLinear (opset 21) feeding Conv or MatMul (block any power of
  two >= 16; ORT fuses DQ + MatMul into MatMulNBits itself). Measured here: a blocked INT4 DQ on a 4-D Conv
  weight runs in onnxruntime 1.31 and matches the dequantized weight's convolution within FP32 rounding.
- w4a8 = the W8A8 activation path (smoothing, per-bucket pre-scale, INT8 Q/DQ) with INT4 weights.

Low-rank branch: W_s = L1 L2 + R (lowrank.svd_split in float64, so the split is exact up to float64 rounding),
R quantized, x_s L1 L2 kept with FP16 factors. For a convolution L1 [K, r] is r filters [r, I, kh, kw] with
the layer's own pads/strides/dilations, L2 [r, N] a 1x1 convolution [O, r, 1, 1]:
conv(x, W) = conv(conv(x, L1), L2) + conv(x, R), exactly, since a conv is linear in its weight and the 1x1 mixes
the r intermediate channels per position. In the FP32 graph the FP16 factors are cast to FP32 at load (ORT's
CPU has no FP16 convolution); in the FP16 graph they are used as they are.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx import graph_edit
from exporter.passes import names, qdq
from exporter.passes.conv_quant import (
    WeightedSite,
    activation_rank,
    add_constant,
    broadcast_along,
    initializer,
    per_channel_view,
    smoothing_factors,
)
from exporter.passes.gptq import WeightQuant, output_error, quantize_weight
from exporter.passes.lowrank import svd_split
from exporter.passes.quantize import PRESCALE_MAX, bucket_index, gathered, static_qdq
from exporter.passes.recipe import ORT_INT4_BLOCKS, TRT_INT4_BLOCKS

log = logging.getLogger(__name__)
FLOAT = "float"
PRECISIONS = ("w8a8", "w4a16", "w4a8", FLOAT)
ACT_QUANT = ("w8a8", "w4a8")
BITS = {"w8a8": 8, "w4a16": 4, "w4a8": 4}


@dataclass(frozen=True)
class LayerPlan:
    """One layer's precision: `scheme` w8a8 | w4a16 | w4a8 | float, low-rank `rank` (0: none), INT4 `block`."""

    scheme: str = "w8a8"
    rank: int = 0
    block: int = 64

    def __post_init__(self) -> None:
        if self.scheme not in PRECISIONS:
            raise ValueError(f"unknown precision {self.scheme!r} (choose from: {', '.join(PRECISIONS)})")
        if self.rank < 0:
            raise ValueError(f"low-rank rank must be >= 0, got {self.rank}")


def weight_kn(w: np.ndarray, site: WeightedSite) -> np.ndarray:
    """The site's weight as [K, N] float64 (a Conv's rows tap-major, see the module docstring)."""
    w = np.asarray(w, np.float64)
    if site.op_type == "Conv":
        o, i, kh, kw = w.shape
        return w.transpose(2, 3, 1, 0).reshape(kh * kw * i, o)
    return w if site.k_axis == 0 else w.T


def from_kn(kn: np.ndarray, site: WeightedSite, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `weight_kn` for an array laid out [K, N] (codes or weights)."""
    if site.op_type == "Conv":
        o, i, kh, kw = shape
        return kn.reshape(kh, kw, i, o).transpose(3, 2, 0, 1)
    return kn if site.k_axis == 0 else kn.T


def conv_channels(site: WeightedSite, shape: Sequence[int]) -> int:
    """Input channels per tap (a Conv's I) or K (a Linear): what an INT4 block must divide."""
    return int(shape[1]) if site.op_type == "Conv" else int(shape[site.k_axis])


def int4_block(channels: int, n: int, wanted: int, allowed: Sequence[int]) -> int | None:
    """The largest allowed block <= `wanted` dividing `channels` (with an even N), else None."""
    if n % 2:
        return None
    fits = [b for b in allowed if b <= wanted and channels % b == 0]
    return max(fits) if fits else None


def plan_layers(model: onnx.ModelProto, sites: Mapping[str, WeightedSite], wanted: Mapping[str, LayerPlan],
                target: str) -> tuple[dict[str, LayerPlan], list[str]]:
    """Each layer's plan as the target can run it (module docstring): a 4-bit Conv2d on TensorRT, or a 4-bit
    layer no allowed block splits, stays float (listed in the notes, logged once each)."""
    if target == "tensorrt" and any(p.scheme == "w4a8" for p in wanted.values()):
        raise ValueError("w4a8 does not run in TensorRT (W4A8 is TensorRT-LLM only); use --target onnxruntime")
    allowed = TRT_INT4_BLOCKS if target == "tensorrt" else ORT_INT4_BLOCKS
    out, notes = {}, []
    for layer, plan in wanted.items():
        site = sites[layer]
        if BITS.get(plan.scheme) != 4:
            out[layer] = plan
            continue
        shape = list(initializer(model, site.weight).dims)
        if target == "tensorrt" and site.op_type == "Conv":
            notes.append(f"{layer}: TensorRT's INT4 weight-only path is GEMM-only; the Conv2d stays FP16")
            out[layer] = LayerPlan(FLOAT)
            continue
        block = int4_block(conv_channels(site, shape), int(shape[site.n_axis]), plan.block, allowed)
        if block is None:
            notes.append(f"{layer} {shape}: no INT4 block of {'/'.join(map(str, allowed))} <= {plan.block} splits "
                         "its input channels; it stays float")
            out[layer] = LayerPlan(FLOAT)
            continue
        out[layer] = LayerPlan(plan.scheme, plan.rank, block)
    for note in notes:
        log.warning("%s", note)
    return out, notes


def _weight_dq(model: onnx.ModelProto, site: WeightedSite, w_kn: np.ndarray, shape: Sequence[int], bits: int,
               block: int, ftype: type, how: WeightQuant, hessian: np.ndarray | None) -> tuple[str, np.ndarray]:
    """Weight DQ in the site's own layout: INT8 per output channel, or INT4 blocks along the input channels
    (Conv: axis 1 of [O, I, kh, kw]; MatMul: axis 0 of [K, N]; transB Gemm: axis 1 of [N, K])."""
    layer = site.layer
    codes, scale = quantize_weight(w_kn, bits, None if bits == 8 else block, ftype, how, hessian)
    deq = qdq.dequantize(codes, scale)
    q = from_kn(codes, site, shape).astype(np.int8)
    g = model.graph
    if bits == 8:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q), names.weight_q(layer)))
        attrs: dict[str, Any] = {"axis": site.n_axis}
    else:
        g.initializer.append(qdq.int4_initializer(names.weight_q(layer), np.ascontiguousarray(q)))
        if site.op_type == "Conv":
            o, i, kh, kw = shape
            scale = scale.reshape(kh, kw, i // block, o).transpose(3, 2, 0, 1)
        elif site.k_axis == 1:
            scale = scale.T
        attrs = {"axis": 1 if site.op_type == "Conv" else site.k_axis, "block_size": block}
    g.initializer.append(qdq.constant(np.ascontiguousarray(scale), names.weight_scale(layer), ftype))
    g.node.append(helper.make_node("DequantizeLinear", [names.weight_q(layer), names.weight_scale(layer)],
                                   [names.weight_dq(layer)], name=names.node(layer, "weight_dq"), **attrs))
    return names.weight_dq(layer), deq


def _lowrank(model: onnx.ModelProto, node: onnx.NodeProto, site: WeightedSite, x: str, l1: np.ndarray,
             l2: np.ndarray, shape: Sequence[int], ftype: type) -> str:
    """The FP16-factor branch x L1 L2 (see the module docstring); returns its output tensor."""
    layer = site.layer
    lr = lambda p: names.lowrank(layer, p)  # noqa: E731
    if site.op_type == "Conv":
        o, i, kh, kw = shape
        w1 = l1.reshape(kh, kw, i, -1).transpose(3, 2, 0, 1)
        w2 = l2.T[:, :, None, None]
    else:
        w1, w2 = l1, l2
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w1).astype(np.float16), lr("L1")),
                          numpy_helper.from_array(np.ascontiguousarray(w2).astype(np.float16), lr("L2"))])
    f1, f2 = lr("L1"), lr("L2")
    if ftype != np.float16:
        g.node.extend([helper.make_node("Cast", [lr("L1")], [lr("L1f")], to=TensorProto.FLOAT, name=names.node(layer, "lr_c1")),
                       helper.make_node("Cast", [lr("L2")], [lr("L2f")], to=TensorProto.FLOAT, name=names.node(layer, "lr_c2"))])
        f1, f2 = lr("L1f"), lr("L2f")
    if site.op_type == "Conv":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
        g.node.extend([helper.make_node("Conv", [x, f1], [lr("h")], name=names.node(layer, "lowrank_down"), **attrs),
                       helper.make_node("Conv", [lr("h"), f2], [lr("out")], name=names.node(layer, "lowrank_up"))])
    else:
        g.node.extend([helper.make_node("MatMul", [x, f1], [lr("h")], name=names.node(layer, "lowrank_down")),
                       helper.make_node("MatMul", [lr("h"), f2], [lr("out")], name=names.node(layer, "lowrank_up"))])
    return lr("out")


def _smoothed_hessian(h: np.ndarray | None, factors: np.ndarray | None, site: WeightedSite,
                      shape: Sequence[int]) -> np.ndarray | None:
    """E[x' x'^T] of the layer's actual input x' = x / s (channel c of every tap divided by s_c)."""
    if h is None or factors is None:
        return h
    inv = 1.0 / np.asarray(factors, np.float64)
    if site.op_type == "Conv":
        inv = np.tile(inv, int(shape[2]) * int(shape[3]))
    return np.asarray(h, np.float64) * inv[:, None] * inv[None, :]


def quantize_unet_mixed(model: onnx.ModelProto, sites: Mapping[str, WeightedSite], plans: Mapping[str, LayerPlan],
                        ch_absmax: Mapping[str, np.ndarray], edges: Sequence[float], method: str = "timestep-smoothquant",
                        alpha: float = 0.5, rounding: str = "nearest", hessians: Mapping[str, np.ndarray] | None = None,
                        t_input: str = "timestep") -> dict[str, dict[str, Any]]:
    """Quantize every site per its plan, in place (see the module docstring and conv_quant's for the
    activation path). Layers reading one tensor share its activation quantizer, so a tensor's readers must all
    quantize activations (w8a8/w4a8) or none do (w4a16/float). Returns a record per layer."""
    hessians = hessians or {}
    how = WeightQuant(rounding)
    nodes = {n.name: n for n in model.graph.node}
    groups: dict[str, list[WeightedSite]] = defaultdict(list)
    for layer, site in sites.items():
        if plans[layer].scheme != FLOAT:
            groups[site.activation].append(site)
    record: dict[str, dict[str, Any]] = {layer: {"op": s.op_type, "scheme": FLOAT} for layer, s in sites.items()
                                         if plans[layer].scheme == FLOAT}
    bucket = None
    for tensor, members in groups.items():
        acts = {plans[s.layer].scheme in ACT_QUANT for s in members}
        if len(acts) > 1:
            raise ValueError(f"layers {[s.layer for s in members]} read one tensor, but only some quantize it; "
                             "give them all activation-quantized or all weight-only precisions")
        quant_act = acts.pop()
        ftype = {TensorProto.FLOAT16: np.float16}.get(initializer(model, members[0].weight).data_type, np.float32)
        shapes = {s.layer: list(initializer(model, s.weight).dims) for s in members}
        weights = {s.layer: numpy_helper.to_array(initializer(model, s.weight)).astype(np.float64) for s in members}
        rank = activation_rank(members[0])
        x, x_branch, factors, post, per_bucket, act_info = tensor, tensor, None, None, False, {}
        if quant_act:
            amax = np.max([np.asarray(ch_absmax[s.layer], np.float64) for s in members], axis=0)
            factors = np.ones(amax.shape[1])
            if method != "minmax":
                factors = smoothing_factors(amax.max(axis=0), [per_channel_view(weights[s.layer], s.k_axis)
                                                                for s in members], alpha)
                inv = add_constant(model, broadcast_along(1.0 / factors, rank, 1 if rank == 4 else rank - 1),
                             names.smooth_inv(tensor), ftype)
                model.graph.node.append(helper.make_node("Mul", [tensor, inv], [names.smoothed(tensor)],
                                                         name=names.smooth_mul(tensor)))
                x = x_branch = names.smoothed(tensor)
                for s in members:
                    weights[s.layer] = weights[s.layer] * broadcast_along(factors, weights[s.layer].ndim, s.k_axis)
            ranges = np.maximum((amax / factors[None, :]).max(axis=1), 1e-8)
            per_bucket = method == "timestep-smoothquant" and len(ranges) > 1
            if per_bucket:
                if bucket is None:
                    bucket = bucket_index(model, edges, t_input)
                smallest = max(float(ranges.min()), float(ranges.max()) / PRESCALE_MAX)
                pre = (smallest / np.maximum(ranges, smallest)).astype(ftype)
                model.graph.node.append(helper.make_node("Mul", [x, gathered(model, tensor, "prescale", pre, bucket, rank)],
                                                         [names.act(tensor, "prescaled")],
                                                         name=names.node(tensor, "prescale")))
                post = gathered(model, tensor, "postscale", (1.0 / pre.astype(np.float64)).astype(ftype), bucket, rank)
                x = static_qdq(model, names.act(tensor, "prescaled"), smallest / 127.0, ftype)
            else:
                x = static_qdq(model, x, float(ranges.max()) / 127.0, ftype)
            act_info = {"act_scale": float(ranges.min() if per_bucket else ranges.max()) / 127.0,
                        "bucket_ranges": [round(float(r), 6) for r in ranges], "per_bucket": per_bucket,
                        "smoothing": None if method == "minmax" else {"alpha": alpha, "min": float(factors.min()),
                                                                      "max": float(factors.max())}}
        for s in members:
            plan, node, shape = plans[s.layer], nodes[s.node], shapes[s.layer]
            w_kn = weight_kn(weights[s.layer], s)
            h = _smoothed_hessian(hessians.get(s.layer), factors if quant_act else None, s, shape)
            l1 = l2 = None
            if plan.rank:
                l1, l2, w_kn = svd_split(w_kn, plan.rank)
            w_dq, deq = _weight_dq(model, s, w_kn, shape, BITS[plan.scheme], plan.block, ftype,
                                   how if h is not None else WeightQuant(), h)
            rec: dict[str, Any] = {"op": s.op_type, "scheme": plan.scheme, "activation": tensor,
                                   "shared_with": len(members), "rank": plan.rank, "weight_bits": BITS[plan.scheme],
                                   "block_size": plan.block if BITS[plan.scheme] == 4 else None,
                                   "weight_rounding": rounding if h is not None else "nearest", **act_info}
            if h is not None:
                rec["output_nsr"] = output_error(w_kn, deq, h)
            node.input[0], node.input[1] = x, w_dq
            _output_chain(model, node, s, post, _lowrank(model, node, s, x_branch, l1, l2, shape, ftype)
                          if plan.rank else None, ftype)
            record[s.layer] = rec
    graph_edit.prune_initializers(model)
    graph_edit.toposort(model)
    return record


def _output_chain(model: onnx.ModelProto, node: onnx.NodeProto, site: WeightedSite, post: str | None,
                  branch: str | None, ftype: type) -> None:
    """node's output y becomes ((y_without_bias * post) + branch) + bias, each part only where present. The
    bias is split out of the node only when a post-scale must act before it (conv_quant's step 2)."""
    if post is None and branch is None:
        return
    out, g = node.output[0], model.graph
    bias_init = site.bias if post is not None else None
    steps: list[tuple[str, str, str]] = []  # (op, other input, part name)
    if post is not None:
        steps.append(("Mul", post, "post"))
    if branch is not None:
        steps.append(("Add", branch, "lowrank_add"))
    if bias_init:
        bias = numpy_helper.to_array(initializer(model, bias_init)).astype(ftype)
        del node.input[2]
        b = add_constant(model, bias.reshape([1, -1, 1, 1]) if site.op_type == "Conv" else bias,
                   names.private(bias_init, site.layer), ftype)
        steps.append(("Add", b, "bias"))
    current = names.matmul_out(site.layer, "nobias")
    node.output[0] = current
    for k, (op, other, part) in enumerate(steps):
        target = out if k == len(steps) - 1 else names.matmul_out(site.layer, part)
        g.node.append(helper.make_node(op, [current, other], [target], name=names.node(site.layer, part)))
        current = target
