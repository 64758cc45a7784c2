"""TensorRT-native quantized graphs: FP16 around the INT8/INT4 GEMMs, FP16 scales, fusable attention, the
precision map that reads the graph as a strongly typed TensorRT build does, and the speed model."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import RTN
from onnx import TensorProto, numpy_helper

from calibration.collector import BucketSpec
from engines.evaluation.accuracy import sqnr_db
from exporter.models.layers import quantizable_linears
from exporter.onnx.torch_export import ort_session
from exporter.passes.quantize import LayerStats
from exporter.passes.recipe import Recipe
from exporter.stages.quantized import Calibration, export_fp16_base, quantize_graph
from exporter.tensorrt.checker import check_graph
from exporter.tensorrt.precision_map import precision_map

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"w8a8": Recipe(scheme="w8a8", **RTN), "w4a16": Recipe(scheme="w4a16", block_size=64, **RTN)}


@pytest.fixture(scope="module")
def fp16_base(mini, mini_export, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16base") / "dit.fp16.onnx"
    export_fp16_base(mini, mini_export[1]["dims"], path)
    return path


@pytest.fixture(scope="module")
def quantized16(mini, fp16_base, mini_calibration, tmp_path_factory):
    layers = list(quantizable_linears(mini.dit))
    root = tmp_path_factory.mktemp("q16")
    out = {}
    for scheme, recipe in RECIPES.items():
        model, record = quantize_graph(fp16_base, layers, mini_calibration, recipe)
        onnx.save(model, str(root / f"{scheme}.onnx"))
        out[scheme] = (root / f"{scheme}.onnx", model, record)
    return out


def _feeds(rng, t, length=24):
    return {"x": rng.standard_normal((2, 64, length)).astype(np.float32), "t": np.array([t, t], np.float32),
            "cross_attn_cond": rng.standard_normal((2, 66, 256)).astype(np.float32),
            "global_embed": rng.standard_normal((2, 512)).astype(np.float32)}


@pytest.mark.parametrize("scheme", list(RECIPES))
def test_fp16_quantized_graph_runs_every_gemm_attention_and_softmax_below_fp32(quantized16, scheme):
    path, model, record = quantized16[scheme]
    assert not check_graph(model)
    pmap = precision_map(model, latents=1024)
    assert pmap.violations == []
    kinds = Counter((x.kind, x.precision) for x in pmap.layers)
    want = "INT8 (FP16 out)" if scheme == "w8a8" else "INT4 (weight-only, FP16 compute)"
    assert kinds[("weight GEMM", want)] == 42 and all(r["float_type"] == "float16" for r in record.values())
    assert kinds[("attention MatMul", "FP16")] == 24 and kinds[("Softmax", "FP16")] == 12
    assert pmap.attention_cores == pmap.fusable_attention_cores == 12  # no Cast inside any Q.K^T->Softmax->.V
    share = pmap.flop_share()
    assert share[want.split()[0]] > 0.75 and share.get("FP32", 0) < 0.01
    inits = {t.name: t for t in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    for n in dqs:  # every scale FP16 and strictly positive in FP16
        scale = inits[n.input[1]]
        assert scale.data_type == TensorProto.FLOAT16 and (numpy_helper.to_array(scale) > 0).all(), n.name
    if scheme == "w4a16":  # INT4 DQ -> MatMul weight input directly, block 64 along K
        int4 = [n for n in dqs if inits[n.input[0]].data_type == TensorProto.INT4]
        assert len(int4) == 42
        users = {i: n for n in model.graph.node for i in n.input}
        assert all(users[n.output[0]].op_type == "MatMul" and users[n.output[0]].input[1] == n.output[0] for n in int4)
        assert all(next(a.i for a in n.attribute if a.name == "block_size") == 64 for n in int4)


@pytest.mark.parametrize("scheme", list(RECIPES))
def test_fp32_based_quantized_graph_is_named_by_the_precision_map(mini, mini_export, mini_calibration, scheme):
    """What the TensorRT target exported before: Q/DQ on the FP32 graph. It passes the Q/DQ rules, but a
    strongly typed engine would run its GEMMs, attention and Softmax in FP32: the map names them."""
    layers = list(quantizable_linears(mini.dit))
    model, _ = quantize_graph(mini_export[0] / "dit.onnx", layers, mini_calibration, RECIPES[scheme])
    assert not check_graph(model)
    pmap = precision_map(model)
    text = "\n".join(pmap.violations)
    assert "weight GEMM (quantized) would run in FP32" in text and "Softmax would run in FP32" in text
    assert sum("attention MatMul would run in FP32" in v for v in pmap.violations) == 24
    if scheme == "w4a16":
        assert sum("INT4 DequantizeLinear outputs FP32" in v for v in pmap.violations) == 42


def test_precision_map_types_agree_with_the_exporters_own_value_info(fp16_base):
    """The map infers types independently (ONNX type rules, ORT's symbolic shape inference); on the FP16
    export they must equal the types torch's exporter recorded."""
    from exporter.tensorrt.precision_map import _infer

    model = onnx.load(str(fp16_base))
    recorded = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    inferred = _infer(model, {"batch": 2, "length": 64})
    common = [n for n in recorded if n in inferred and recorded[n]]
    assert len(common) > 500
    assert all(inferred[n][0] == recorded[n] for n in common), [n for n in common if inferred[n][0] != recorded[n]][:5]


def test_fp16_per_bucket_scale_equals_quantizing_with_that_buckets_scale(mini, fp16_base, mini_calibration, tmp_path):
    """In the FP16 graph the pre-scale table is normalised to the smallest bucket (entries in (0, 1]: no FP16
    overflow of the pre-scaled activation or of the MatMul output before its post-scale), and at a t in bucket k
    the graph equals one built with bucket k's range as its only scale. Bucket ranges here are the calibrated
    ones times powers of two, so every FP16 table entry and scale is exact and the comparison tests the in-graph
    mechanics alone; with calibrated ranges the FP16 table changes a bucket's step by at most 2^-11 (asserted)."""
    layers = list(quantizable_linears(mini.dit))
    cal = mini_calibration
    _, record = quantize_graph(fp16_base, layers, cal, Recipe(method="minmax", bucket_policy="per-bucket-scale", **RTN))
    for name, rec in record.items():
        wanted = np.asarray(rec["act_range_per_bucket"]) / 127
        assert np.allclose(rec["act_scales"], wanted, rtol=2.0 ** -10), name
    spec = BucketSpec(cal.edges)
    two = {n: LayerStats(np.stack([s.ch_absmax.max(axis=0) * 2.0 ** b for b in range(spec.count)]),
                         np.array([float(s.absmax.max()) * 2.0 ** b for b in range(spec.count)]))
           for n, s in cal.stats.items()}
    model, _ = quantize_graph(fp16_base, layers, Calibration(cal.directory, cal.meta, two, cal.edges),
                              Recipe(method="minmax", bucket_policy="per-bucket-scale", **RTN))
    tables = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("prescale_table")]
    assert tables and all(t.dtype == np.float16 and (t <= 1).all() and (t > 0).all() for t in tables)
    assert min(float(t.min()) for t in tables) == 2.0 ** -(spec.count - 1)
    onnx.save(model, str(tmp_path / "pb.onnx"))
    session = ort_session(tmp_path / "pb.onnx")
    rng = np.random.default_rng(5)
    for t in (0.9999, 0.6, 0.05):
        k = spec.bucket_of(t)
        pinned = {n: LayerStats(np.repeat(s.ch_absmax[k:k + 1], spec.count, axis=0), np.repeat(s.absmax[k:k + 1], spec.count))
                  for n, s in two.items()}
        single, _ = quantize_graph(fp16_base, layers, Calibration(cal.directory, cal.meta, pinned, cal.edges),
                                   Recipe(method="minmax", bucket_policy="shared", **RTN))
        onnx.save(single, str(tmp_path / f"single{k}.onnx"))
        feeds = _feeds(rng, t)
        a, b = session.run(None, feeds)[0], ort_session(tmp_path / f"single{k}.onnx").run(None, feeds)[0]
        assert sqnr_db(b, a) > 40.0, (t, k, sqnr_db(b, a))


def test_smoothing_folds_through_the_fp16_layernorm_island_exactly(mini, fp16_base, mini_calibration, tmp_path):
    """LayerNorm (FP32) -> Cast FP16 -> MatMul: 1/s goes into FP32 copies of the LayerNorm's scale and bias, so
    the smoothed FP16 graph computes what the unsmoothed one does, to FP16 rounding."""
    from exporter.onnx.linear_nodes import locate_linears
    from exporter.passes.smoothing import apply_smoothing

    layers = list(quantizable_linears(mini.dit))
    model = onnx.load(str(fp16_base))
    sites = locate_linears(model, layers)
    ranges = {n: np.asarray(mini_calibration.stats[n].ch_absmax, np.float64).max(axis=0) for n in layers}
    _, record = apply_smoothing(model, sites, ranges, 0.5)
    how = Counter(r["how"] for r in record.values())
    # as in the FP32 graph: each block's self-attention qkv, cross-attention q and FF input (6 blocks), not a Mul
    assert how["folded into LayerNorm"] == 18, how
    onnx.save(model, str(tmp_path / "smoothed.onnx"))
    feeds = _feeds(np.random.default_rng(2), 0.5)
    ref = ort_session(fp16_base).run(None, feeds)[0]
    got = ort_session(tmp_path / "smoothed.onnx").run(None, feeds)[0]
    assert sqnr_db(ref, got) > 40.0


def test_fp16_scales_never_underflow():
    from exporter.passes import qdq

    w = np.zeros((128, 4))
    w[:, 1] = 1e-9  # would be a 1e-38-floored or sub-FP16 scale
    w[:, 2] = np.linspace(-1, 1, 128)
    for q, s in (qdq.quantize_int8_per_channel(w, np.float16), qdq.quantize_int4_blockwise(w, 64, np.float16)):
        assert s.dtype == np.float16 and (s > 0).all()
        assert np.abs(qdq.dequantize(q, s) - w).max() <= np.abs(w).max() / 7 / 2 * 1.01
    assert float(qdq.positive_scale(1e-38, np.float16)) > 0


def test_precision_map_cli_prints_shares_and_fails_an_fp32_based_graph(quantized16, mini, mini_export,
                                                                       mini_calibration, tmp_path):
    cli = [sys.executable, "-m", "exporter.tensorrt.checker", "--precision-map", "--latents", "256"]
    ok = subprocess.run(cli + [str(quantized16["w8a8"][0])], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "| weight GEMM | INT8 (FP16 out) |" in ok.stdout and "attention cores fusable 12/12" in ok.stdout
    assert "GFLOP at 256 latents, batch 2: FP16" in ok.stdout and "INT8" in ok.stdout
    layers = list(quantizable_linears(mini.dit))
    model, _ = quantize_graph(mini_export[0] / "dit.onnx", layers, mini_calibration, RECIPES["w8a8"])
    onnx.save(model, str(tmp_path / "fp32based.onnx"))
    bad = subprocess.run(cli + [str(tmp_path / "fp32based.onnx")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "would run in FP32" in bad.stdout


def test_speed_model_is_a_labelled_roofline(quantized16, fp16_base):
    from exporter.tensorrt.speed_model import COMPUTE_EFFICIENCY, GPUS, predict, predict_all

    maps = {"fp16": precision_map(onnx.load(str(fp16_base))), "w8a8": precision_map(quantized16["w8a8"][1])}
    out = predict_all(maps)
    assert out["kind"].startswith("PREDICTION") and set(out["gpus"]) == set(GPUS)
    h100 = out["gpus"]["H100"]
    assert h100["fp16"]["speedup_vs_fp16"] == 1.0 and h100["w8a8"]["total_ms"] < h100["fp16"]["total_ms"]
    # the GEMM part is never faster than INT8 peak and never slower than FP16 peak on the same FLOPs
    gemm_flops = sum(x.flops for x in maps["w8a8"].layers if x.kind == "weight GEMM")
    parts = predict(maps["w8a8"], GPUS["H100"])
    assert parts["weight_gemms"] >= 1e3 * gemm_flops / (GPUS["H100"].fp16_tflops * 1e12 * COMPUTE_EFFICIENCY) / 2 * 0.99


def test_int4_block_is_decided_per_layer():
    from exporter.passes.recipe import ORT_INT4_BLOCKS, TRT_INT4_BLOCKS, int4_block

    assert int4_block(1536, 1536, 128, TRT_INT4_BLOCKS) == 128
    assert int4_block(192, 384, 128, TRT_INT4_BLOCKS) == 64      # the 192-wide condition tokens of a short config
    assert int4_block(96, 384, 128, TRT_INT4_BLOCKS) is None     # TensorRT has no block below 64: stays float
    assert int4_block(96, 384, 128, ORT_INT4_BLOCKS) == 32
    assert int4_block(256, 7, 64, ORT_INT4_BLOCKS) is None       # odd N cannot be stored as INT4


@pytest.mark.slow  # builds whole w4a16 graphs: a minute; in make test-all
def test_a_block_that_does_not_split_a_layer_gets_a_smaller_one(mini, mini_export, mini_calibration):
    """sao-mini's cross-attention K/V read 256-wide condition tokens: with --block-size 512 those layers get
    block 256 (ONNX Runtime) and everything still quantizes and runs, instead of a ValueError."""
    layers = list(quantizable_linears(mini.dit))
    model, record = quantize_graph(mini_export[0] / "dit.onnx", layers, mini_calibration,
                                   Recipe(scheme="w4a16", block_size=512))
    blocks = Counter(r["block_size"] for r in record.values() if r["quantized"])
    assert all(r["quantized"] for r in record.values()) and blocks[256] == 6 and blocks[512] == 36, blocks
    out = ort_session_from(model).run(None, _feeds(np.random.default_rng(0), 0.5))[0]
    assert np.isfinite(out).all()


def ort_session_from(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
