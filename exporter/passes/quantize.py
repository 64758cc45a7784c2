"""The quantization pass over an exported FP32 DiT graph: smoothing, low-rank branch, Q/DQ or ORT kernels.

Per activation tensor (the Linears that read it share one activation quantizer, as TensorRT wants for
Q/K/V), the pass emits one of these forms, chosen by scheme and activation mode:

- w8a8 static, w4a16 (any target): standard Q->DQ on the activation (INT8 per tensor, constant scale)
  and DQ on the weight (INT8 per output channel, or INT4 block-wise along K), then the original MatMul.
  TensorRT fuses these into INT8 / INT4-weight GEMMs; ORT fuses them to MatMulIntegerToFloat / MatMulNBits.
- w8a8 dynamic (ORT): DynamicQuantizeLinear + MatMulInteger (per-tensor, computed per call) or
  MatMulNBits with 8-bit weights and int8 compute (per-block dynamic activations): `dynamic_kernel`.
- w4a8 (ORT): MatMulNBits, 4-bit weights, accuracy_level 4 (int8 compute, activations quantized per
  block at run time); in static mode the static INT8 Q/DQ sits in front of it.

Timestep awareness, per-bucket-scale policy: TensorRT needs constant Q scales, so the bucket index is
computed from `t` inside the graph, the activation is multiplied by pre[bucket] = R / range[bucket]
(gathered from a constant table; R is the smallest bucket range), quantized with the constant scale R/127,
and the MatMul output is multiplied by 1/pre[bucket]. The MatMul is linear, so this equals quantizing with
the per-bucket scale range/127. The table is normalised to the smallest bucket so that its entries lie in
[1/PRESCALE_MAX, 1]: an FP16 graph cannot hold 1/range (ranges of 1e-5 or 1e5 leave FP16), and with
entries <= 1 neither the pre-scaled activation nor the MatMul output before the post-scale is larger than
in the unscaled graph (normalising to the largest bucket instead makes the MatMul output pre[bucket] times
larger, which overflows FP16 in the noisy buckets: measured 9 dB instead of exact on sao-mini).

Float types: every constant a pass adds is in the float type of the MatMul it serves (the type of the
layer's weight initializer: FP32 in the FP32 graph, FP16 in the FP16 graph the TensorRT target
quantizes). Under TensorRT's strong typing a DequantizeLinear outputs its scale's type and a MatMul runs in
its inputs' type, so FP16 scales are what make the INT8/INT4 GEMMs write FP16 and keep everything around
them FP16 (ARCHITECTURE.md section 3).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from exporter.errors import InputError
from exporter.onnx import graph_edit
from exporter.onnx.linear_nodes import LinearSite
from exporter.passes import names, nvfp4, nvfp4_nodes, ort_kernels, qdq
from exporter.passes.gptq import WeightQuant, quantize_weight
from exporter.passes.lowrank import branch_weight_error, svd_split
from exporter.passes.recipe import ORT_INT4_BLOCKS, TRT_INT4_BLOCKS, WEIGHT_BITS, Recipe, int4_block
from exporter.passes.scale_fold import fold_smoothing_muls
from exporter.passes.smoothing import apply_smoothing

log = logging.getLogger(__name__)
DYNAMIC_KERNELS = ("dql", "nbits")
# range ratio the per-bucket pre-scale table spans (see the module docstring): a bucket whose range is more
# than this far above the smallest one is quantized with a scale clipped to PRESCALE_MAX x the smallest
PRESCALE_MAX = 1024.0
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


_FORMAT_NAMES = {"fp8": "fp8-e4m3 per tensor", "nvfp4": "nvfp4 (e2m1, blocks of 16, e4m3 block scales)"}


def weight_format(scheme: str) -> str:
    """The number format a scheme quantizes in: "fp8", "nvfp4" or "int" (exporter/passes/alpha_search.py)."""
    return scheme if scheme in ("fp8", "nvfp4") else "int"


def float_type(model: onnx.ModelProto, initializer: str) -> type:
    """numpy float type of a layer's weight initializer: the type its MatMul (and its activation) runs in."""
    init = next(i for i in model.graph.initializer if i.name == initializer)
    if init.data_type not in _NP:
        raise InputError(f"weight {initializer} is {TensorProto.DataType.Name(init.data_type)}; "
                         "only FP32 and FP16 graphs are quantized")
    return _NP[init.data_type]


@dataclass(frozen=True)
class LayerStats:
    """Calibrated per-bucket input ranges of one Linear: ch_absmax [K, C], absmax [K]; when the artifact has
    them, the input second moment xtx = E[x x^T] [C, C] and a reservoir of input rows [K, R, C]."""

    ch_absmax: np.ndarray
    absmax: np.ndarray
    xtx: np.ndarray | None = None
    rows: np.ndarray | None = None


def smoothing_ranges(stats: LayerStats, bucket: int | None) -> np.ndarray:
    """Per-input-channel activation range the smoothing factors are computed from: the max over all
    buckets, or one bucket's own ranges when each bucket gets its own graph."""
    ch = np.asarray(stats.ch_absmax, np.float64)
    return ch[bucket] if bucket is not None else ch.max(axis=0)


def _alphas(model: onnx.ModelProto, sites: Mapping[str, LinearSite], stats: Mapping[str, LayerStats],
            active: Mapping[str, dict[str, Any]], recipe: Recipe, bucket: int | None) -> dict[str, float]:
    """Per layer: the recipe's alpha (smoothquant), or the alpha searched per activation tensor over the
    timestep buckets (timestep-smoothquant; see exporter/passes/alpha_search.py)."""
    if recipe.method != "timestep-smoothquant":
        return {n: float(s["alpha"]) for n, s in active.items()}
    from exporter.onnx.linear_nodes import weight_out_in
    from exporter.passes.alpha_search import best_alpha

    groups: dict[str, list[str]] = defaultdict(list)
    for name in active:
        groups[sites[name].activation].append(name)
    out = {}
    # the loss search quantizes each group's weights at every candidate alpha: minutes at full size
    for members in tqdm(groups.values(), desc=f"smoothing[{recipe.alpha_search}]", unit="tensor", leave=False):
        ch = np.asarray(stats[members[0]].ch_absmax, np.float64)
        ch = ch[bucket:bucket + 1] if bucket is not None else ch
        w_kn = np.concatenate([weight_out_in(model, sites[m]).T for m in members], axis=1)
        settings = active[members[0]]
        per_bucket_scale = recipe.bucket_policy == "per-bucket-scale" and bucket is None
        bits, quant_act = WEIGHT_BITS[settings["scheme"]], settings["scheme"] != "w4a16"
        fmt = weight_format(settings["scheme"])
        rows = stats[members[0]].rows
        if recipe.alpha_search == "loss" and rows is not None:
            from exporter.passes.alpha_search import best_alpha_loss

            rows = rows[bucket:bucket + 1] if bucket is not None else rows
            alpha, _ = best_alpha_loss(rows, ch, w_kn, per_bucket_scale, bits, int(settings["block_size"]), quant_act,
                                       fmt)
        else:
            if recipe.alpha_search == "loss":
                _warn_once("alpha_search 'loss' needs the artifact's input rows (calibrate with this quadit); "
                           "using the noise model")
            alpha, _ = best_alpha(ch, w_kn, per_bucket_scale, bits, quant_act)
        out.update({m: alpha for m in members})
    return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _hessian(stats: LayerStats, factors: np.ndarray | None, recipe: Recipe) -> np.ndarray | None:
    """E[x' x'^T] of the MatMul's actual input x' = x / s (smoothing divides channel j by s_j), or None
    when round-to-nearest is asked or the artifact has no second moments."""
    if recipe.weight_rounding != "gptq" and recipe.weight_clip != "mse":
        return None
    if stats.xtx is None:
        if recipe.weight_rounding == "gptq":
            _warn_once("weight_rounding 'gptq' needs the artifact's second moments (calibrate with this quadit, "
                       "without --no-second-moments); those layers round to nearest")
        return None
    h = np.asarray(stats.xtx, np.float64)
    if factors is not None:
        inv = 1.0 / np.asarray(factors, np.float64)
        h = h * inv[:, None] * inv[None, :]
    return h


def _act_clip(stats: Mapping[str, LayerStats], members: Sequence[str], factors: Mapping[str, np.ndarray],
              model: onnx.ModelProto, sites: Mapping[str, LinearSite], per_bucket: np.ndarray, shared: bool,
              bucket: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip ratios of a static activation's per-bucket ranges by exporter/passes/act_scales.py's search, on the
    reservoir rows after smoothing, through the (smoothed, float) weights of every member."""
    from exporter.passes.act_scales import search_clip

    rows = stats[members[0]].rows
    if rows is None:
        _warn_once("act_clip 'mse' needs the artifact's input rows (calibrate with this quadit); using abs-max")
        return np.ones(len(per_bucket)), {}
    rows = np.asarray(rows, np.float64) / factors.get(members[0], np.ones(rows.shape[-1]))[None, None, :]
    w = np.concatenate([_weight_in_out(model, graph_edit.node_by_name(model, sites[m].node), m) for m in members], axis=1)
    if bucket is not None:
        ratios, info = search_clip(rows[bucket:bucket + 1], per_bucket[bucket:bucket + 1], w, True)
        out = np.ones(len(per_bucket))
        out[bucket] = ratios[0]
        return out, info
    return search_clip(rows, per_bucket, w, shared)


def _nvfp4_fallback(model: onnx.ModelProto, sites: Mapping[str, LinearSite], stats: Mapping[str, LayerStats],
                    factors: Mapping[str, np.ndarray], members: Sequence[str], active: Mapping[str, dict[str, Any]],
                    recipe: Recipe, bucket: int | None, k_buckets: int):
    """(Decision, INT4 block) of exporter/passes/nvfp4_fallback.py for one activation's readers, or None when
    the artifact has no input rows to measure on."""
    from exporter.passes.nvfp4_fallback import decide

    rows = stats[members[0]].rows
    if rows is None:
        _warn_once("nvfp4's INT4 fallback needs the artifact's input rows (calibrate with this quadit); all layers "
                   "stay NVFP4")
        return None
    smooth = factors.get(members[0], np.ones(rows.shape[-1]))
    rows = np.asarray(rows, np.float64) / smooth[None, None, :]
    per_bucket = np.max([np.max(np.asarray(stats[m].ch_absmax, np.float64) / factors.get(m, 1.0), axis=1)
                         for m in members], axis=0)
    per_bucket = np.maximum(per_bucket, 1e-8)
    if bucket is not None:
        rows, ranges = rows[bucket:bucket + 1], per_bucket[bucket:bucket + 1]
    elif recipe.bucket_policy == "per-bucket-scale" and k_buckets > 1:
        pre = np.clip(per_bucket.min() / per_bucket, 1.0 / PRESCALE_MAX, 1.0)
        ranges = per_bucket.min() / pre
    else:
        ranges = np.full_like(per_bucket, per_bucket.max())
    weights = [_weight_in_out(model, graph_edit.node_by_name(model, sites[m].node), m) for m in members]
    k, n = weights[0].shape[0], sum(w.shape[1] for w in weights)
    block = int4_block(k, n, 128, TRT_INT4_BLOCKS)
    decision = decide(rows, ranges, weights, int(active[members[0]]["lowrank"]), block, recipe.nvfp4_fallback_db)
    if decision.fallback:
        log.info("nvfp4 -> INT4 weight-only for %s: NVFP4 %.1f dB < INT4 %.1f dB on the calibration rows",
                 ", ".join(members), decision.nvfp4_sqnr_db, decision.int4_sqnr_db)
    return decision, block


def bucket_index(model: onnx.ModelProto, edges: Sequence[float], t_input: str = "t") -> str:
    """bucket = number of interior edges >= t (calibration's BucketSpec rule), as an int64 [B]."""
    if any(n.output and n.output[0] == names.BUCKET for n in model.graph.node):
        return names.BUCKET
    interior = np.asarray(edges[1:-1], np.float32)[None, :]
    g = model.graph
    g.initializer.extend([qdq.constant(interior, names.BUCKET_EDGES),
                          qdq.constant([1], names.bucket("axis1"), np.int64)])
    g.node.extend([
        helper.make_node("Unsqueeze", [t_input, names.bucket("axis1")], [names.bucket("t")], name=names.bucket("unsqueeze")),
        helper.make_node("Less", [names.BUCKET_EDGES, names.bucket("t")], [names.bucket("below")], name=names.bucket("less")),
        helper.make_node("Not", [names.bucket("below")], [names.bucket("at_or_above")], name=names.bucket("not")),
        helper.make_node("Cast", [names.bucket("at_or_above")], [names.bucket("count_f")], to=TensorProto.FLOAT,
                         name=names.bucket("cast_f")),
        helper.make_node("ReduceSum", [names.bucket("count_f"), names.bucket("axis1")], [names.bucket("count")],
                         keepdims=0, name=names.bucket("sum")),
        helper.make_node("Cast", [names.bucket("count")], [names.BUCKET], to=TensorProto.INT64, name=names.bucket("cast_i"))])
    return names.BUCKET


def gathered(model: onnx.ModelProto, tensor: str, part: str, table: np.ndarray, bucket: str, rank: int = 3) -> str:
    """table[bucket] reshaped to [B, 1, ...] (`rank` dims) so it broadcasts over the activation: [B, L, C] for
    the DiT's Linears, [B, C, H, W] for a UNet's Conv2d (`exporter.passes.conv_quant`)."""
    g = model.graph
    g.initializer.extend([qdq.constant(table, names.act(tensor, f"{part}_table"), table.dtype.type),
                          qdq.constant(list(range(1, rank)), names.act(tensor, f"{part}_axes"), np.int64)])
    g.node.extend([
        helper.make_node("Gather", [names.act(tensor, f"{part}_table"), bucket], [names.act(tensor, f"{part}_b")],
                         axis=0, name=names.node(tensor, f"{part}_gather")),
        helper.make_node("Unsqueeze", [names.act(tensor, f"{part}_b"), names.act(tensor, f"{part}_axes")],
                         [names.act(tensor, part)], name=names.node(tensor, f"{part}_unsqueeze"))])
    return names.act(tensor, part)


def static_qdq(model: onnx.ModelProto, tensor: str, scale: float, dtype: type = np.float32, fp8: bool = False) -> str:
    """Per-tensor Q -> DQ of an activation: INT8, or E4M3 (`fp8`: its zero point's type says so)."""
    g = model.graph
    zero = (qdq.fp8_initializer(names.act(tensor, "zero_point"), qdq.to_fp8(np.zeros(())))
            if fp8 else qdq.constant(np.int8(0), names.act(tensor, "zero_point"), np.int8))
    g.initializer.extend([qdq.constant(qdq.positive_scale(scale, dtype), names.act(tensor, "scale"), dtype), zero])
    q_in = [tensor, names.act(tensor, "scale"), names.act(tensor, "zero_point")]
    g.node.extend([helper.make_node("QuantizeLinear", q_in, [names.act(tensor, "q")], name=names.node(tensor, "act_q")),
                   helper.make_node("DequantizeLinear", [names.act(tensor, "q")] + q_in[1:], [names.act(tensor, "dq")],
                                    name=names.node(tensor, "act_dq"))])
    return names.act(tensor, "dq")


def _act_quantizer(model: onnx.ModelProto, tensor: str, scale: float, dtype: type, scheme: str) -> str:
    """The static activation quantizer of a scheme: NVFP4's dynamic-block chain under a static global scale
    (`scale`), else one per-tensor Q/DQ (INT8, or E4M3 for fp8)."""
    if scheme == "nvfp4":
        return nvfp4_nodes.activation(model, tensor, scale, dtype)
    return static_qdq(model, tensor, scale, dtype, scheme == "fp8")


def _weight_dq(model: onnx.ModelProto, layer: str, w_kn: np.ndarray, bits: int, block: int,
               dtype: type = np.float32, how: WeightQuant = WeightQuant(), hessian: np.ndarray | None = None,
               fp8: bool = False) -> tuple[str, np.ndarray]:
    """Weight DQ with its scale in `dtype`: the DQ outputs `dtype` straight into the MatMul's weight input
    (TensorRT's INT4 weight-only GEMM needs exactly that: an FP16 DQ output feeding the MatMul). `fp8`: E4M3
    codes with one scale per tensor, rounded to nearest (GPTQ's error feedback works on integer grids)."""
    g = model.graph
    if fp8:
        q, scale = qdq.quantize_fp8_per_tensor(w_kn, dtype)
        g.initializer.append(qdq.fp8_initializer(names.weight_q(layer), q))
        attrs = {}
    elif bits == 8:
        q, scale = quantize_weight(w_kn, 8, None, dtype, how, hessian)
        g.initializer.append(numpy_helper.from_array(q, names.weight_q(layer)))
        attrs = {"axis": 1}
    else:
        q, scale = quantize_weight(w_kn, 4, block, dtype, how, hessian)
        g.initializer.append(qdq.int4_initializer(names.weight_q(layer), q))
        attrs = {"axis": 0, "block_size": block}
    g.initializer.append(qdq.constant(scale, names.weight_scale(layer), dtype))
    g.node.append(helper.make_node("DequantizeLinear", [names.weight_q(layer), names.weight_scale(layer)],
                                   [names.weight_dq(layer)], name=names.node(layer, "weight_dq"), **attrs))
    return names.weight_dq(layer), scale


def _lowrank_branch(model: onnx.ModelProto, layer: str, x: str, l1: np.ndarray, l2: np.ndarray,
                    dtype: type = np.float32) -> str:
    """FP16 MatMuls x L1 L2. In an FP32 graph: x -> Cast FP16 -> MatMul L1 -> MatMul L2 -> Cast FP32, since a
    strongly typed graph must say where FP16 starts and ends; in an FP16 graph no Cast is needed."""
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(l1.astype(np.float16), names.lowrank(layer, "L1")),
                          numpy_helper.from_array(l2.astype(np.float16), names.lowrank(layer, "L2"))])
    lr = lambda p: names.lowrank(layer, p)  # noqa: E731
    if dtype == np.float16:
        g.node.extend([
            helper.make_node("MatMul", [x, lr("L1")], [lr("h16")], name=names.node(layer, "lowrank_down")),
            helper.make_node("MatMul", [lr("h16"), lr("L2")], [lr("out")], name=names.node(layer, "lowrank_up"))])
        return lr("out")
    g.node.extend([
        helper.make_node("Cast", [x], [lr("in16")], to=TensorProto.FLOAT16, name=names.node(layer, "lowrank_cast_in")),
        helper.make_node("MatMul", [lr("in16"), lr("L1")], [lr("h16")], name=names.node(layer, "lowrank_down")),
        helper.make_node("MatMul", [lr("h16"), lr("L2")], [lr("out16")], name=names.node(layer, "lowrank_up")),
        helper.make_node("Cast", [lr("out16")], [lr("out")], to=TensorProto.FLOAT, name=names.node(layer, "lowrank_cast_out"))])
    return lr("out")


def _weight_in_out(model: onnx.ModelProto, node: onnx.NodeProto, layer: str) -> np.ndarray:
    if node.op_type != "MatMul":
        raise InputError(f"layer {layer} is a {node.op_type}, not a MatMul; quantize it with a rule 'skip' instead")
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    return numpy_helper.to_array(init).astype(np.float64)


def allowed_int4_blocks(ftype: type) -> tuple[int, ...]:
    """INT4 block sizes for a graph of this float type: the FP16 graph is the TensorRT target's (64 or 128),
    the FP32 graph ONNX Runtime's (any power of two >= 16)."""
    return TRT_INT4_BLOCKS if ftype == np.float16 else ORT_INT4_BLOCKS


def int4_plan(shapes: Mapping[str, tuple[int, int]], settings: Mapping[str, dict[str, Any] | None],
              allowed: tuple[int, ...]) -> dict[str, int | None]:
    """Per 4-bit layer whose block the recipe's does not fit ([K, N] = in, out): the block it gets, or None
    (kept in float); each change is logged once, so a user sees it before the quantized graph exists."""
    plan: dict[str, int | None] = {}
    for name, s in settings.items():
        if s is not None and s["scheme"] == "nvfp4":
            if shapes[name][0] % nvfp4.BLOCK:
                plan[name] = None
                log.warning("layer %s [K=%d]: NVFP4 blocks of %d do not split K; it stays in float", name,
                            shapes[name][0], nvfp4.BLOCK)
            continue
        if s is None or WEIGHT_BITS[s["scheme"]] == 8:
            continue
        k, n = shapes[name]
        block = int4_block(k, n, int(s["block_size"]), allowed)
        if block != int(s["block_size"]):
            plan[name] = block
            if block is None:
                log.warning("layer %s [K=%d, N=%d]: no INT4 block of %s splits it; it stays in float", name, k, n,
                            "/".join(map(str, (b for b in allowed if b <= int(s["block_size"])))))
            else:
                log.warning("layer %s [K=%d]: INT4 block %d does not split K; using block %d", name, k,
                            int(s["block_size"]), block)
    return plan


def quantize_dit(model: onnx.ModelProto, sites: Mapping[str, LinearSite], stats: Mapping[str, LayerStats],
                 edges: Sequence[float], recipe: Recipe, bucket: int | None = None,
                 dynamic_kernel: str = "dql") -> tuple[onnx.ModelProto, dict[str, dict[str, Any]]]:
    """Quantize every layer the recipe keeps (in place on `model`); returns (model, per-layer record).

    `bucket` set: build the graph for that timestep bucket only (per-bucket-graph policy): its own
    smoothing factors and activation scales, no in-graph bucket logic.
    """
    if dynamic_kernel not in DYNAMIC_KERNELS:
        raise InputError(f"unknown dynamic kernel '{dynamic_kernel}' (choose from: {', '.join(DYNAMIC_KERNELS)})")
    resolved = recipe.resolve(sites)
    ftypes = {n: float_type(model, sites[n].weight) for n, s in resolved.items() if s is not None}
    inits = {i.name: i for i in model.graph.initializer}
    shapes = {n: (lambda d: (d[0], d[1]) if sites[n].weight_in_out else (d[1], d[0]))(list(inits[sites[n].weight].dims))
              for n in ftypes}
    allowed = allowed_int4_blocks(next(iter(ftypes.values()), np.float32))
    for name, block in int4_plan(shapes, resolved, allowed).items():
        resolved[name] = None if block is None else {**resolved[name], "block_size": block}
    active = {n: s for n, s in resolved.items() if s is not None}
    record: dict[str, dict[str, Any]] = {n: {"quantized": False} for n, s in resolved.items() if s is None}
    if any(s["scheme"] == "nvfp4" for s in active.values()):
        nvfp4_nodes.prepare(model)
    factors: dict[str, np.ndarray] = {}
    if recipe.method != "minmax":
        by_alpha: dict[float, dict[str, LinearSite]] = defaultdict(dict)
        for name, alpha in _alphas(model, sites, stats, active, recipe, bucket).items():
            by_alpha[alpha][name] = sites[name]
        for alpha, group in by_alpha.items():
            ranges = {n: smoothing_ranges(stats[n], bucket) for n in group}
            _, smooth_record = apply_smoothing(model, group, ranges, alpha)
            for n, rec in smooth_record.items():
                factors[n] = np.asarray(rec.pop("factors"), np.float64)
                record[n] = rec
        smoothed_inputs = {n: graph_edit.node_by_name(model, sites[n].node).input[0] for n in factors}
        folded = fold_smoothing_muls(model)
        for n, tensor in smoothed_inputs.items():
            if tensor in folded:
                record[n]["how"] = folded[tensor]
    groups: dict[str, list[str]] = defaultdict(list)
    for name in active:
        node = graph_edit.node_by_name(model, sites[name].node)
        groups[node.input[0]].append(name)
    k_buckets = len(edges) - 1
    rounding = "nearest" if recipe.scheme in ("fp8", "nvfp4") else recipe.weight_rounding
    for tensor, members in tqdm(groups.items(), desc=f"quantize[{rounding}]", unit="tensor",
                                leave=False):
        kinds = {(active[m]["scheme"], active[m]["activations"]) for m in members}
        if len(kinds) > 1:
            raise InputError(f"layers {members} read one tensor but have different settings {sorted(kinds)}; "
                             "they share one activation quantizer, so give them the same scheme and activations")
        scheme, activations = kinds.pop()
        ftype = ftypes[members[0]]
        fallback = None
        if scheme == "nvfp4" and recipe.nvfp4_fallback_db > 0:
            fallback = _nvfp4_fallback(model, sites, stats, factors, members, active, recipe, bucket, k_buckets)
            if fallback is not None and fallback[0].fallback:
                scheme = "w4a16"
                for m in members:
                    active[m] = {**active[m], "scheme": "w4a16", "block_size": fallback[1]}
        # calibrated range of the (smoothed) activation per bucket
        per_bucket = np.max([np.max(np.asarray(stats[m].ch_absmax, np.float64) / factors.get(m, 1.0), axis=1)
                             for m in members], axis=0)
        per_bucket = np.maximum(per_bucket, 1e-8)
        static = scheme != "w4a16" and activations == "static"
        fp8, fp4 = scheme == "fp8", scheme == "nvfp4"
        # fp4: the "scale" of an activation is its NVFP4 global scale, range / (6 * 448)
        qmax = qdq.FP8_MAX if fp8 else nvfp4.FP4_MAX * nvfp4.FP8_MAX if fp4 else 127
        clip_info: dict[str, Any] = {}
        if static and recipe.act_clip == "mse" and not (fp8 or fp4):
            shared = bucket is None and not (recipe.bucket_policy == "per-bucket-scale" and k_buckets > 1)
            ratios, clip_info = _act_clip(stats, members, factors, model, sites, per_bucket, shared, bucket)
            per_bucket = per_bucket * ratios
        x_q, inverse, act_scales = tensor, None, None
        if static:
            if bucket is not None:
                act_scales = [float(per_bucket[bucket]) / qmax]
                x_q = _act_quantizer(model, tensor, act_scales[0], ftype, scheme)
            elif recipe.bucket_policy == "per-bucket-scale" and k_buckets > 1:
                index = bucket_index(model, edges)
                shared = float(per_bucket.min())
                pre_table = np.clip(shared / per_bucket, 1.0 / PRESCALE_MAX, 1.0).astype(ftype)
                post_table = (1.0 / pre_table.astype(np.float64)).astype(ftype)
                pre = gathered(model, tensor, "prescale", pre_table, index)
                inverse = gathered(model, tensor, "postscale", post_table, index)
                model.graph.node.append(helper.make_node("Mul", [tensor, pre], [names.act(tensor, "prescaled")],
                                                         name=names.node(tensor, "prescale_mul")))
                x_q = _act_quantizer(model, names.act(tensor, "prescaled"), shared / qmax, ftype, scheme)
                q_scale = float(qdq.positive_scale(shared / qmax, np.float32 if fp4 else ftype))
                act_scales = [q_scale / float(p) for p in pre_table]
            else:
                act_scales = [float(per_bucket.max()) / qmax]
                x_q = _act_quantizer(model, tensor, act_scales[0], ftype, scheme)
        for layer in members:
            settings = active[layer]
            node = graph_edit.node_by_name(model, sites[layer].node)
            w_kn = _weight_in_out(model, node, layer)
            bits, block, rank = WEIGHT_BITS[settings["scheme"]], int(settings["block_size"]), int(settings["lowrank"])
            rec = record.setdefault(layer, {"smoothed": False})
            rec.update({"quantized": True, "scheme": scheme, "activations": activations if scheme != "w4a16" else "none",
                        "weight_bits": bits, "block_size": block if bits == 4 else None, "rank": rank,
                        "weight_format": _FORMAT_NAMES.get(scheme, f"int{bits}"),
                        "act_scales": act_scales, "act_range_per_bucket": [float(r) for r in per_bucket],
                        **clip_info, "weight_rounding": "nearest" if fp8 or fp4 else recipe.weight_rounding,
                        "weight_clip": "absmax" if fp8 or fp4 else recipe.weight_clip})
            if fallback is not None:
                rec["nvfp4_fallback"] = fallback[0].to_json()
            if rank:
                l1, l2, w_kn = svd_split(w_kn, rank)
                rec.update(branch_weight_error(l1, l2, w_kn, bits, block, weight_format(scheme)))
            how = WeightQuant(recipe.weight_rounding, recipe.weight_clip)
            hessian = None if fp8 or fp4 else _hessian(stats[layer], factors.get(layer), recipe)
            final_out = node.output[0]
            raw = names.matmul_out(layer, "raw") if (inverse or rank) else final_out
            dynamic = scheme != "w4a16" and activations == "dynamic"
            if ftype != np.float32 and (scheme == "w4a8" or dynamic):
                raise InputError(f"layer {layer}: {scheme} {activations} runs as ONNX Runtime kernels on the FP32 "
                                 "graph; quantize the FP32 graph for it (--target onnxruntime)")
            if scheme == "w4a8" or (dynamic and dynamic_kernel == "nbits"):
                scale = ort_kernels.matmul_nbits(model, layer, x_q, w_kn, bits, block, raw, how, hessian)
                kernel = f"MatMulNBits(bits={bits}, accuracy_level=4)"
                model.graph.node.remove(node)
            elif dynamic:
                scale = ort_kernels.matmul_integer(model, layer, ort_kernels.dynamic_quantize(model, tensor), w_kn, raw, how,
                                                   hessian)
                kernel = "DynamicQuantizeLinear+MatMulInteger"
                model.graph.node.remove(node)
            else:
                if fp4:
                    w_dq, g_w = nvfp4_nodes.weight(model, layer, w_kn, ftype)
                    scale = np.array([g_w])
                else:
                    w_dq, scale = _weight_dq(model, layer, w_kn, bits, block, ftype, how, hessian, fp8)
                node.input[0], node.input[1] = x_q, w_dq
                node.output[0] = raw
                kernel = "Q/DQ MatMul"
            rec.update({"kernel": kernel, "weight_scale_min": float(scale.min()), "weight_scale_max": float(scale.max()),
                        "float_type": np.dtype(ftype).name})
            out = raw
            if inverse:
                target = final_out if not rank else names.matmul_out(layer, "rescaled")
                model.graph.node.append(helper.make_node("Mul", [raw, inverse], [target],
                                                         name=names.node(layer, "postscale_mul")))
                out = target
            if rank:
                branch = _lowrank_branch(model, layer, tensor, l1, l2, ftype)
                model.graph.node.append(helper.make_node("Add", [out, branch], [final_out],
                                                         name=names.node(layer, "lowrank_add")))
    graph_edit.prune_initializers(model)
    graph_edit.toposort(model)
    return model, record
