"""exporter/passes/ort_fusion.py: the ONNX Runtime target's fused attention equals the plain-op graph to FP32
rounding (real ONNX Runtime sessions, the sao-mini DiT as exported and as w8a8 quantized), and the export
records it; the session-option keys of `ort_session_config` reach ONNX Runtime."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import RTN

from exporter.passes.ort_fusion import MS_DOMAIN, find_attention, fuse_attention

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], config: dict[str, str] | None = None) -> np.ndarray:
    import tempfile
    from pathlib import Path

    from exporter.onnx.torch_export import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        onnx.save(model, str(path))
        return ort_session(path, config).run(["v"], feeds)[0]


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fp32_dit(mini_export):
    out, manifest = mini_export
    from engines.evaluation.bench_candidates import feeds

    return onnx.load(str(out / manifest["graphs"]["dit"]["file"])), feeds(manifest["dims"], 40), manifest


def test_every_attention_core_is_found(fp32_dit, mini):
    model, _, _ = fp32_dit
    sites = find_attention(model)
    depth, heads = mini.config["model"]["diffusion"]["config"]["depth"], mini.config["model"]["diffusion"]["config"]["num_heads"]
    assert len(sites) == 2 * depth  # self- and cross-attention per block
    assert {(s.heads, s.head_dim) for s in sites} == {(heads, 512 // heads)}
    assert all(s.scale == pytest.approx(1 / np.sqrt(512 // heads), rel=1e-6) for s in sites)


@pytest.mark.parametrize("op,fused_op", [("mha", "MultiHeadAttention"), ("attention23", "Attention")])
def test_fused_fp32_graph_equals_the_plain_one(fp32_dit, op, fused_op):
    model, feeds, _ = fp32_dit
    plain = _run(model, feeds)
    fused, count = fuse_attention(onnx.ModelProto.FromString(model.SerializeToString()), op)
    onnx.checker.check_model(fused)
    ops = Counter(n.op_type for n in fused.graph.node)
    assert count == 12 and ops[fused_op] == 12 and ops["Softmax"] == 0
    assert (fused_op == "MultiHeadAttention") == any(n.domain == MS_DOMAIN for n in fused.graph.node)
    assert _rel(_run(fused, feeds), plain) < 1e-5


def test_fused_w8a8_graph_equals_the_plain_one(fp32_dit, mini, mini_calibration, tmp_path):
    """The pass runs after quantization; the attention core is float in both, so the two graphs differ only
    by FP32 rounding inside the core (which can move an activation across a rounding step of the next
    quantized layer: hence a bound of a few quantization steps, far below the quantization error itself)."""
    from exporter.models.layers import quantizable_linears
    from exporter.passes.recipe import Recipe
    from exporter.stages.quantized import quantize_graph

    model, feeds, _ = fp32_dit
    path = tmp_path / "dit.fp32.onnx"
    onnx.save(model, str(path))
    recipe = Recipe(scheme="w8a8", method="timestep-smoothquant", activations="static", bucket_policy="per-bucket-scale", **RTN)
    quantized, _ = quantize_graph(path, list(quantizable_linears(mini.dit)), mini_calibration, recipe)
    plain = _run(quantized, feeds)
    fused, count = fuse_attention(quantized, "mha")
    assert count == 12
    err = _rel(_run(fused, feeds), plain)
    quant_err = _rel(plain, _run(model, feeds))
    assert err < 1e-3 and err < quant_err / 20, (err, quant_err)


def test_session_options_in_the_config_reach_onnx_runtime(fp32_dit):
    import onnxruntime as ort

    from exporter.onnx.torch_export import apply_session_config

    options = ort.SessionOptions()
    apply_session_config(options, {"intra_op_num_threads": "1", "enable_cpu_mem_arena": "0",
                                   "graph_optimization_level": "extended", "session.intra_op.allow_spinning": "0"})
    assert options.intra_op_num_threads == 1 and not options.enable_cpu_mem_arena
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="graph_optimization_level"):
        apply_session_config(ort.SessionOptions(), {"graph_optimization_level": "fast"})
    model, feeds, _ = fp32_dit
    assert _rel(_run(model, feeds, {"intra_op_num_threads": "1"}), _run(model, feeds)) < 1e-5


def test_onnxruntime_target_export_writes_the_fused_graph(mini_export, mini, mini_calibration, tmp_path):
    """quantize_stage on the ONNX Runtime target fuses and records it; --attention none keeps the plain ops."""
    import shutil

    from exporter.passes.recipe import Recipe
    from exporter.stages.quantized import QuantizeOptions, quantize_stage

    out, manifest = mini_export
    recipe = Recipe(scheme="w8a8", method="timestep-smoothquant", activations="dynamic", bucket_policy="shared", **RTN)
    for attention, expected in (("mha", 12), ("none", 0)):
        target = tmp_path / attention
        shutil.copytree(out, target)
        doc = json.loads(json.dumps(manifest))
        (tmp_path / f"scratch-{attention}").mkdir()
        quantize_stage(mini, mini_calibration, QuantizeOptions(recipe, "onnxruntime", attention=attention),
                       tmp_path / f"scratch-{attention}", source=out)(target, doc)
        entry = doc["graphs"]["dit"]
        graph = onnx.load(str(target / entry["file"]), load_external_data=False).graph
        assert sum(n.op_type == "MultiHeadAttention" for n in graph.node) == expected
        assert entry.get("ort_fusion", {}).get("sites", 0) == expected


def test_unknown_fused_attention_is_refused():
    from exporter.errors import InputError
    from exporter.passes.recipe import Recipe
    from exporter.stages.quantized import QuantizeOptions

    with pytest.raises(InputError, match="unknown fused attention"):
        QuantizeOptions(Recipe(scheme="w8a8"), "onnxruntime", attention="flash")


def test_profile_counts_the_fused_core_as_attention(fp32_dit, tmp_path):
    """--breakdown after the change: MultiHeadAttention lands in 'attention MatMuls' (its Softmax inside)."""
    from engines.evaluation.ort_profile import CATEGORIES, profile_session

    model, feeds, _ = fp32_dit
    fused, _ = fuse_attention(onnx.ModelProto.FromString(model.SerializeToString()), "mha")
    path = tmp_path / "fused.onnx"
    onnx.save(fused, str(path))
    b = profile_session(path, {}, feeds, runs=1)
    assert b["attention MatMuls"] > 0 and b["Softmax"] == 0 and b["total"] == pytest.approx(sum(
        b[c] for c in CATEGORIES))


def test_bench_table_has_every_cpu_denominator():
    from engines.evaluation.bench import CPU_DENOMINATORS, FUSED_FP32, _markdown

    names = {"ort fp32": 100.0, FUSED_FP32: 95.0, "torch eager fp32": 110.0, "ort w8a8 static": 57.0}
    rows = [{"name": n, "device": "cpu", "length": 1024, "median_ms": ms, "peak_rss_mb": 500.0, "gpu_mb": float("nan"),
             "size_ratio": None} for n, ms in names.items()]
    for r in rows:
        r["vs_baseline"] = r["median_ms"] / 100.0
        for key, den in CPU_DENOMINATORS.items():
            r[key] = r["median_ms"] / names[den]
    doc = {"rows": rows, "runs": 10, "warmup": 1, "schedule": "interleaved", "generate_seconds": {},
           "machine": {"cpu": "test cpu", "cores": 2, "cpu_flags": "avx2 fma", "loadavg_at_start": (1.0, 1.0, 1.0),
                       "loadavg_at_end": (2.0, 2.0, 2.0)}}
    lines = _markdown(doc, "title")
    row = next(line for line in lines if line.startswith("| ort w8a8 static |"))
    assert "| 0.57x | 0.600x | 0.518x |" in row
    assert any("test cpu, 2 cores (avx2 fma)" in line for line in lines)
