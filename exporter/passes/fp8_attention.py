"""FP8 attention for the TensorRT target (`--attention fp8`): Q, K, V and the softmax output of every attention core
of the DiT in FP8 E4M3 Q/DQ, so that TensorRT runs each core as its fused FP8 multi-head attention.

Where the Q/DQ go (what TensorRT's MHA fusion reads; exporter/tensorrt/attention_rules.py checks every rule):
- BMM1 (Q·Kᵀ): one FP8 Q/DQ on each input, placed *after* the attention-scale Muls and the Kᵀ transpose, so each
  DequantizeLinear feeds the MatMul directly. TensorRT wants the attention scale applied to Q or K (or sqrt of it
  to both) before the first BMM (developer guide, "Fused Attention"); NVIDIA's FP8 ONNX exporter moves the
  scaling Mul and the K Transpose in front of the QuantizeLinear for the same reason (nvidia-modelopt 0.47,
  modelopt/onnx/export/fp8_exporter.py: `_move_mul_before_qdq`, `_move_transpose_before_qdq`). The exported
  graph already scales before BMM1 (Mul(Q, a), Mul(Kᵀ, b)), so the Q/DQ go on those Muls' outputs.
- Softmax output: one FP8 Q/DQ with the constant scale 1/448. The softmax output lies in [0, 1] whatever the
  input, so 1 maps to E4M3's largest finite value (fp8_exporter.py `_insert_qdq_after_softmax`; ModelOpt's
  torch export of FP8 SDPA, modelopt/torch/quantization/export_onnx.py `export_fp8_mha`, hard-codes amax 1.0).
- BMM2's V input: one FP8 Q/DQ. BMM2's output stays unquantized; nothing but the Softmax sits between the two
  MatMuls and no Cast enters the core: `export_fp8_mha` refuses an MHA whose Q/DQ are not 16-bit, so the core
  stays FP16 (the scales are FP16 in the TensorRT target's FP16 graph: a DQ outputs its scale's type).

Scales: per tensor and constant (TensorRT reads FP8 Q/DQ scales as build-time scalars). Q and K take the
calibrated abs-max of Q and K (engines/calibrate/attention_stats.py) times the graph's own scale factors a and
b, V its abs-max, each divided by 448, the maximum over the timestep buckets. The per-bucket pre-scale of the
Linear inputs (exporter/passes/quantize.py) is not used here: it is exact only where the scale can be undone
after a linear op, and undoing a Q or K pre-scale needs a Mul between BMM1 and the Softmax, which the fusion
does not allow (only V's could be undone, after BMM2). It is also not needed: E4M3's normal range spans
2^-6..448 (2^14.8), so with one scale for all buckets a bucket whose range is r times smaller than the largest
loses mantissa bits only on values 28672 / r times below its own maximum; the record lists the ratio r.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.errors import InputError
from exporter.onnx import graph_edit
from exporter.passes import qdq
from exporter.passes.ort_fusion import find_attention

if TYPE_CHECKING:
    from exporter.passes.recipe import Recipe

log = logging.getLogger(__name__)
# the softmax output's Q/DQ scale: [0, 1] onto E4M3's [0, 448]
SOFTMAX_SCALE = 1.0 / qdq.FP8_MAX
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's per-node module path
REFUSED_BESIDE = ("w8a8", "w4a16", "w4a8")


def check_attention_target(recipe: "Recipe", target: str) -> None:
    """`--attention fp8` is TensorRT's and goes with `--scheme fp8` only. ONNX Runtime's CPU has no FP8 kernels.
    Beside INT8 GEMMs (w8a8) it is refused: NVIDIA quantizes fused MHA for FP8 only (ModelOpt's diffusers
    example, examples/diffusers/quantization/README.md: quant level 4, "CNN + Almost all Linear + fMHA", "is
    only for FP8"), and TensorRT's INT8 MHA fusion stops at 512 tokens (exporter/tensorrt/speed_model.py)."""
    if target != "tensorrt":
        raise InputError("--attention fp8 needs --target tensorrt: the fused FP8 attention is TensorRT's "
                         "(Ada, Hopper, Blackwell); ONNX Runtime's CPU would run its Q/DQ as float math")
    if recipe.scheme != "fp8":
        raise InputError(f"--attention fp8 goes with --scheme fp8, not {recipe.scheme}: NVIDIA's recipes quantize "
                         "fused attention for FP8 deployments only (ModelOpt's diffusers example)")


def check_ranges(ranges: Mapping[str, np.ndarray] | None) -> None:
    """Refuse (one line) a calibration artifact without Q/K/V statistics: made before quadit collected them."""
    if ranges is None:
        raise InputError("the calibration artifact has no attention (Q/K/V) statistics: it was made before quadit "
                         "collected them; re-calibrate (quadit calibrate, or export without --calibration) to use "
                         "--attention fp8")


def _scalar(model: onnx.ModelProto, consts: Mapping[str, Any], tensor: str) -> float | None:
    t = consts.get(tensor)
    if t is None:
        return None
    value = numpy_helper.to_array(t)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _constants(model: onnx.ModelProto) -> dict[str, Any]:
    out: dict[str, Any] = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                out[n.output[0]] = value
    return out


def _factor(producer: Mapping[str, onnx.NodeProto], consts: Mapping[str, Any], model: onnx.ModelProto,
            tensor: str) -> float:
    """a for tensor = Mul(x, a) with a scalar constant a, else 1."""
    mul = producer.get(tensor)
    if mul is not None and mul.op_type == "Mul":
        for j in (0, 1):
            a = _scalar(model, consts, mul.input[j])
            if a is not None:
                return a
    return 1.0


def _module_of(softmax: onnx.NodeProto) -> str | None:
    """The DiT module the core came from (`transformer.layers.3.cross_attn`), from the dynamo export's scopes."""
    for prop in softmax.metadata_props:
        if prop.key == NAME_SCOPES:
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            attn = [s for s in scopes if s.endswith(("self_attn", "cross_attn"))]
            if attn:
                return attn[-1].removeprefix("dit.")
    return None


def core_modules(model: onnx.ModelProto, modules: list[str]) -> list[tuple[Any, str]]:
    """(site, module) for every attention core: by the export's name scopes, else in graph order (cores run in
    module order); refused when the cores and the calibrated modules do not pair up one to one."""
    sites = find_attention(model)
    nodes = {n.name: n for n in model.graph.node}
    named = [_module_of(nodes[s.softmax]) for s in sites]
    if any(m is None for m in named):
        named = list(modules)
    if len(named) != len(sites) or sorted(named) != sorted(modules):
        raise InputError(f"the graph has {len(sites)} attention cores but the calibration artifact has Q/K/V "
                         f"ranges for {len(modules)} attention modules; calibrate this model again")
    return list(zip(sites, named))


def quantize_attention_fp8(model: onnx.ModelProto, ranges: Mapping[str, np.ndarray] | None,
                           dtype: type = np.float16, bucket: int | None = None
                           ) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]]]:
    """Put FP8 Q/DQ on Q, Kᵀ, the softmax output and V of every attention core (in place); `ranges`:
    `<module>.q|k|v` -> per-bucket abs-max (Calibration.attention); `bucket`: the graph of one timestep bucket
    (per-bucket-graph policy) takes that bucket's ranges. Returns (model, per-module record)."""
    from exporter.passes.quantize import static_qdq

    check_ranges(ranges)
    modules = sorted({k.rsplit(".", 1)[0] for k in ranges})
    pairs = core_modules(model, modules)
    producer = graph_edit.producers(model)
    consts = _constants(model)
    nodes = {n.name: n for n in model.graph.node}
    record: dict[str, dict[str, Any]] = {}
    for site, module in pairs:
        softmax = nodes[site.softmax]
        bmm1 = producer[softmax.input[0]]
        bmm2 = graph_edit.consumers(model)[softmax.output[0]][0]
        a, b = (_factor(producer, consts, model, t) for t in bmm1.input[:2])
        per_bucket = {p: np.maximum(np.asarray(ranges[f"{module}.{p}"], np.float64), 1e-8) for p in "qkv"}
        used = {p: v.max() if bucket is None else v[bucket] for p, v in per_bucket.items()}
        amax = {"q": a * used["q"], "k": b * used["k"], "v": used["v"]}
        scales = {p: float(qdq.positive_scale(amax[p] / qdq.FP8_MAX, dtype)) for p in amax}
        bmm1.input[0] = static_qdq(model, bmm1.input[0], scales["q"], dtype, fp8=True)
        bmm1.input[1] = static_qdq(model, bmm1.input[1], scales["k"], dtype, fp8=True)
        bmm2.input[0] = static_qdq(model, bmm2.input[0], SOFTMAX_SCALE, dtype, fp8=True)
        bmm2.input[1] = static_qdq(model, bmm2.input[1], scales["v"], dtype, fp8=True)
        record[f"{module}.attention"] = {
            "quantized": True, "scheme": "fp8-attention", "kernel": "TensorRT fused FP8 MHA (Q/DQ)",
            "softmax": site.softmax, "scales": {**scales, "softmax": float(qdq.positive_scale(SOFTMAX_SCALE, dtype))},
            "attention_scale": [a, b],
            "range_ratio_over_buckets": {p: float(v.max() / v.min()) for p, v in per_bucket.items()},
            "float_type": np.dtype(dtype).name}
    graph_edit.toposort(model)
    log.info("FP8 Q/DQ on Q, K, V and the softmax output of %d attention cores", len(pairs))
    return model, record
