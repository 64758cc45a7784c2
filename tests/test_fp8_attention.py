"""`--attention fp8` (issue 22, part 1b): FP8 Q/DQ on Q, Kᵀ, the softmax output and V of every attention core, placed
as TensorRT's fused FP8 MHA reads them, with calibrated Q/K/V ranges; the checker's attention rules, the precision
map's fused FP8 cores and the speed model's FP8 attention."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import RTN, one_line_error, run_script, sqnr_vs_reference
from onnx import TensorProto, helper, numpy_helper

from engines.evaluation.accuracy import sqnr_db
from exporter.errors import InputError
from exporter.models.layers import quantizable_linears
from exporter.onnx.torch_export import ort_session
from exporter.passes import qdq
from exporter.passes.fp8_attention import SOFTMAX_SCALE, quantize_attention_fp8
from exporter.passes.recipe import Recipe
from exporter.stages.quantized import FP8_ATTENTION_SESSION_CONFIG, export_fp16_base, quantize_graph
from exporter.tensorrt.checker import check_graph
from exporter.tensorrt.precision_map import precision_map

B, H, S, D = 2, 2, 6, 8


def _core(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """One attention core as the dynamo export writes it: Mul(Q, a) · Mul(Kᵀ, b) -> Softmax -> · V -> [B, S, H*D]."""
    np_t = helper.tensor_dtype_to_np_dtype(dtype)
    a = numpy_helper.from_array(np.asarray(D ** -0.25, np_t), "a")
    nodes = [helper.make_node("Mul", ["q", "a"], ["qs"], name="mul_q"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="kt"),
             helper.make_node("Mul", ["kt", "a"], ["kts"], name="mul_k"),
             helper.make_node("MatMul", ["qs", "kts"], ["scores"], name="bmm1"),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="bmm2"),
             helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3], name="merge_t"),
             helper.make_node("Reshape", ["ot", "shape"], ["y"], name="merge")]
    io = [helper.make_tensor_value_info(n, dtype, [B, H, S, D]) for n in ("q", "k", "v")]
    graph = helper.make_graph(nodes, "core", io, [helper.make_tensor_value_info("y", dtype, [B, S, H * D])],
                              [a, numpy_helper.from_array(np.array([B, S, H * D], np.int64), "shape")],
                              value_info=[helper.make_tensor_value_info("o", dtype, [B, H, S, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_pass_computes_the_fp8_core_exactly_as_numpy_fake_quantization():
    """ONNX Runtime on the rewritten core equals numpy: Q, Kᵀ (after the scale Muls), P (scale 1/448) and V each
    through E4M3 with the scale the pass derives from the calibrated ranges."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, S, D)).astype(np.float32) * s for s in (3.0, 1.5, 0.7))
    ranges = {f"m.{p}": np.array([np.abs(x).max() * 0.5, np.abs(x).max()], np.float32) for p, x in zip("qkv", (q, k, v))}
    model, record = quantize_attention_fp8(_core(), ranges, np.float32)
    assert {v.rule for v in check_graph(model)} == {"16-bit MHA"}  # placed right; TensorRT wants FP16 scales
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's CPU QDQ fusion would rewrite FP8 DQ -> MatMul (FP32) as MatMulIntegerToFloat, which takes no FP8;
    # the report runs FP32 Q/DQ graphs as float math the same way (engines/evaluation/compare.py)
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"q": q, "k": k, "v": v})[0]
    a = np.float32(D ** -0.25)
    scale = {p: float(qdq.fp8_scale(f * np.abs(x).max())) for p, f, x in (("q", a, q), ("k", a, k), ("v", 1.0, v))}
    qs = qdq.fake_quantize_fp8(q * a, scale["q"])
    kts = qdq.fake_quantize_fp8(np.swapaxes(k, 2, 3) * a, scale["k"])
    p = qdq.fake_quantize_fp8(_softmax((qs @ kts).astype(np.float32)), np.float32(SOFTMAX_SCALE))
    want = (p @ qdq.fake_quantize_fp8(v, scale["v"])).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    exact = (np.float64(_softmax((q * a) @ (np.swapaxes(k, 2, 3) * a))) @ v).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    assert 25.0 < sqnr_db(exact, got) < 40.0  # what E4M3's 3 mantissa bits cost one core
    assert record["m.attention"]["range_ratio_over_buckets"]["q"] == pytest.approx(2.0)


def _rules(model: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_graph(model)}


def test_checker_names_every_fp8_attention_rule():
    ranges = {f"m.{p}": np.ones(1, np.float32) for p in "qkv"}
    good, _ = quantize_attention_fp8(_core(TensorProto.FLOAT16), ranges, np.float16)
    assert _rules(good) == set()
    partial = onnx.ModelProto()
    partial.CopyFrom(good)
    bmm2 = next(n for n in partial.graph.node if n.name == "bmm2")
    bmm2.input[1] = "v"  # V left unquantized
    assert "FP8 MHA inputs" in _rules(partial)
    fp32 = quantize_attention_fp8(_core(), ranges, np.float32)[0]
    assert "16-bit MHA" in _rules(fp32)
    moved = onnx.ModelProto()  # the scale Mul after the DQ (the export's order) instead of before the Q
    moved.CopyFrom(_core(TensorProto.FLOAT16))
    g = moved.graph
    g.initializer.extend([numpy_helper.from_array(np.float16(0.01), "s"),
                          qdq.fp8_initializer("z", qdq.to_fp8(np.zeros(())))])
    g.node.extend([helper.make_node("QuantizeLinear", ["q", "s", "z"], ["q8"], name="qq"),
                   helper.make_node("DequantizeLinear", ["q8", "s", "z"], ["qd"], name="qdq")])
    next(n for n in g.node if n.name == "mul_q").input[0] = "qd"
    assert "DQ feeds the BMM" in _rules(moved)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(good)
    softmax_scale = next(t for t in wrong.graph.initializer if t.name == "p.act.scale")
    softmax_scale.CopyFrom(numpy_helper.from_array(np.float16(1 / 127), "p.act.scale"))
    assert "softmax scale" in _rules(wrong)
    int8 = onnx.ModelProto()
    int8.CopyFrom(good)
    for t in int8.graph.initializer:
        if t.name == "v.act.zero_point":
            t.CopyFrom(numpy_helper.from_array(np.int8(0), t.name))
    assert "FP8 attention" in _rules(int8)


def test_recipe_takes_fp8_attention_beside_fp8_on_tensorrt_only():
    Recipe(scheme="fp8", attention_quant="fp8").check_target("tensorrt")
    with pytest.raises(InputError, match="needs --target tensorrt"):
        Recipe(scheme="fp8", attention_quant="fp8").check_target("onnxruntime")
    with pytest.raises(InputError, match="goes with --scheme fp8, not w8a8"):
        Recipe(scheme="w8a8", attention_quant="fp8").check_target("tensorrt")
    with pytest.raises(InputError, match="unknown attention_quant"):
        Recipe(attention_quant="int8")
    # recipes without it keep their JSON (and digest); with it, it round-trips
    assert "attention_quant" not in Recipe(scheme="fp8").to_json()
    r = Recipe(scheme="fp8", attention_quant="fp8")
    assert Recipe.from_json(r.to_json()) == r and r.digest() != Recipe(scheme="fp8").digest()


@pytest.fixture(scope="module")
def attention_graphs(mini, mini_export, mini_calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8attn")
    base = root / "dit.fp16.onnx"
    export_fp16_base(mini, mini_export[1]["dims"], base)
    layers = list(quantizable_linears(mini.dit))
    out = {"fp16": (base, None)}
    for name, recipe in (("fp8", Recipe(scheme="fp8", **RTN)),
                         ("fp8+attn", Recipe(scheme="fp8", attention_quant="fp8", **RTN))):
        model, record = quantize_graph(base, layers, mini_calibration, recipe)
        onnx.save(model, str(root / f"{name}.onnx"))
        out[name] = (root / f"{name}.onnx", record)
    return out


def test_calibration_collects_qkv_ranges_of_every_attention_module(mini_calibration):
    ranges = mini_calibration.attention
    assert ranges is not None and mini_calibration.meta["attention"]["version"] == 1
    modules = {k.rsplit(".", 1)[0] for k in ranges}
    assert len(modules) == 12 and {m.rsplit(".", 1)[1] for m in modules} == {"self_attn", "cross_attn"}
    assert all(v.shape == (3,) and (v > 0).all() for v in ranges.values())


def test_sao_mini_fp8_attention_graph_is_tensorrt_clean_with_fused_fp8_mha(attention_graphs):
    path, record = attention_graphs["fp8+attn"]
    model = onnx.load(str(path))
    assert not check_graph(model)
    pmap = precision_map(model, latents=1024)
    assert pmap.violations == []
    kinds = Counter((x.kind, x.precision) for x in pmap.layers)
    assert kinds[("attention MatMul", "FP8 (FP16 out)")] == 24 and kinds[("weight GEMM", "FP8 (FP16 out)")] == 42
    assert pmap.attention_cores == pmap.fusable_attention_cores == pmap.fp8_attention_cores == 12
    assert pmap.summary()["fp8_attention_cores"] == 12
    cores = {k: r for k, r in record.items() if k.endswith(".attention")}
    assert len(cores) == 12 and all(r["scales"]["softmax"] == pytest.approx(1 / 448, rel=1e-3) for r in cores.values())
    inits = {t.name: t for t in model.graph.initializer}
    softmax_out = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
    softmax_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in softmax_out]
    assert len(softmax_q) == 12 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in softmax_q)
    # the plain fp8 graph's cores stay FP16 MHA
    assert precision_map(onnx.load(str(attention_graphs["fp8"][0])), latents=1024).fp8_attention_cores == 0


def test_fp8_attention_costs_little_accuracy_in_onnx_runtime(attention_graphs):
    """ONNX Runtime executes the FP8 Q/DQ exactly (as float math): the attention Q/DQ cost on top of fp8 GEMMs."""
    sessions = {k: ort_session(v[0], FP8_ATTENTION_SESSION_CONFIG if k == "fp8+attn" else None)
                for k, v in attention_graphs.items()}
    snr = sqnr_vs_reference(sessions, ("fp8", "fp8+attn"))
    assert min(snr["fp8+attn"]) > 8.0, snr
    assert np.mean(snr["fp8+attn"]) > np.mean(snr["fp8"]) - 1.0, snr


def test_speed_model_runs_fused_fp8_attention_at_the_fp8_peak(attention_graphs):
    from exporter.tensorrt.speed_model import predict_all

    maps = {k: precision_map(onnx.load(str(v[0]), load_external_data=False), latents=1024)
            for k, v in attention_graphs.items()}
    out = predict_all(maps)["gpus"]
    for gpu, rows in out.items():
        assert rows["fp8+attn"]["attention"] < rows["fp8"]["attention"], gpu
        assert rows["fp8+attn"]["total_ms"] < rows["fp8"]["total_ms"], gpu
    # on H100 the BMMs are compute bound: FP8 at twice the FP16 peak halves them
    assert out["H100"]["fp8+attn"]["attention"] == pytest.approx(out["H100"]["fp8"]["attention"] / 2, rel=0.05)


def test_old_artifact_with_fp8_attention_is_one_line_error_and_no_export(mini_calibration, tmp_path):
    old = tmp_path / "old-artifact"
    shutil.copytree(mini_calibration.directory, old)
    meta = json.loads((old / "calibration.json").read_text())
    del meta["attention"]  # what an artifact written before attention statistics looks like
    (old / "calibration.json").write_text(json.dumps(meta))
    out = tmp_path / "export"
    proc = run_script("export.py", "--synthetic-weights", "--scheme", "fp8", "--target", "tensorrt", "--attention",
                      "fp8", "--calibration", str(old), "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert "re-calibrate" in one_line_error(proc)
    assert not out.exists()
    proc = run_script("export.py", "--synthetic-weights", "--scheme", "w8a8", "--target", "tensorrt", "--attention",
                      "fp8", "--out", str(out))
    assert "goes with --scheme fp8" in one_line_error(proc) and not out.exists()


def test_attention_stats_observe_qkv_once_per_call_and_merge_like_a_resumed_run(mini):
    """The wrapper sees Q, K, V of all 12 attention modules per DiT call and restores the modules afterwards; its
    state merged into a fresh collector (what a resumed or data-parallel run does) gives the same artifact tensors."""
    import torch

    from calibration.collector import BucketSpec
    from engines.calibrate.attention_stats import AttentionStats
    from exporter.onnx.graphs import DiTGraph
    from exporter.stages.export import runtime_spec

    dims = runtime_spec(mini)["dims"]
    g = torch.Generator().manual_seed(0)
    feeds = (torch.randn(2, dims["io_channels"], 16, generator=g), torch.tensor([0.9, 0.9]),
             torch.randn(2, dims["cond_tokens"], dims["cond_dim"], generator=g),
             torch.randn(2, dims["global_dim"], generator=g))
    graph = DiTGraph(mini.dit).eval()
    stats = AttentionStats(mini.dit, BucketSpec((1.0, 0.5, 0.0)), 2, (99.0,))
    with torch.no_grad():
        plain = graph(*feeds)
        with stats:
            stats.collector.begin_step(0, 0.9)
            hooked = graph(*feeds)
    assert torch.equal(plain, hooked) and not any("apply_attn" in m.__dict__ for m in stats.modules.values())
    tensors = stats.tensors()
    assert len(stats.modules) == 12 and len([k for k in tensors if k.endswith(".absmax")]) == 36
    absmax = tensors["attn.transformer.layers.0.self_attn.q.absmax"]
    assert absmax[0] > 0 and absmax[1] == 0  # t = 0.9 is bucket 0; bucket 1 saw nothing
    fresh = AttentionStats(mini.dit, BucketSpec((1.0, 0.5, 0.0)), 2, (99.0,))
    fresh.collector.merge_state(stats.collector.state)
    assert all(torch.equal(v, fresh.tensors()[k]) for k, v in tensors.items())
