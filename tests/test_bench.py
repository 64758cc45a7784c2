"""The benchmark's parts (not its timings): ORT-profiler breakdown of real sao-mini graphs, the Amdahl
arithmetic, and the candidate workers on real sessions. GPU and TensorRT workers run where those exist."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import RTN, one_line_error, run_script

from engines.evaluation.bench_candidates import feeds, torch_candidates, worker
from engines.evaluation.ort_profile import CATEGORIES, amdahl, classify_graph, median_round, profile_session
from exporter.models.layers import quantizable_linears
from exporter.passes.recipe import Recipe
from exporter.stages.quantized import quantize_graph

pytestmark = pytest.mark.filterwarnings("ignore")
LENGTH = 32


@pytest.fixture(scope="module")
def static_graph(mini, mini_export, mini_calibration, tmp_path_factory):
    """sao-mini's DiT as w8a8 static with per-bucket scales (the variant with the most added nodes)."""
    out, _ = mini_export
    layers = list(quantizable_linears(mini.dit))
    model, _ = quantize_graph(out / "dit.onnx", layers, mini_calibration,
                              Recipe(scheme="w8a8", bucket_policy="per-bucket-scale", **RTN))
    path = tmp_path_factory.mktemp("bench") / "w8a8.onnx"
    onnx.save(model, str(path))
    return path, len(layers)


def test_graph_classification_finds_every_quantized_layer_and_attention(mini_export, static_graph):
    fp32 = classify_graph(mini_export[0] / "dit.onnx")
    path, n_layers = static_graph
    quant = classify_graph(path)
    heads = sum(1 for c in fp32.values() if c == "Softmax")
    assert heads > 0
    # every attention block has two activation x activation MatMuls (QK^T, AV) next to its Softmax
    assert sum(1 for c in fp32.values() if c == "attention MatMuls") == 2 * heads
    assert sum(1 for c in quant.values() if c == "attention MatMuls") == 2 * heads
    # quantization keeps the GEMM count and adds per-tensor Q/DQ, bucket gathers and scale Muls
    assert sum(1 for c in quant.values() if c == "weight GEMMs") >= n_layers
    assert sum(1 for c in quant.values() if c == "activation quantization") > 2 * n_layers / 3
    assert "activation quantization" not in fp32.values()


def test_profile_breakdown_adds_up_and_shows_the_gemms(mini_export, static_graph):
    inputs = feeds(mini_export[1]["dims"], LENGTH)
    fp32 = profile_session(mini_export[0] / "dit.onnx", {}, inputs, runs=2)
    quant = profile_session(static_graph[0], {}, inputs, runs=2)
    for b in (fp32, quant):
        assert set(b) == {*CATEGORIES, "total", "profiled_step_ms"}
        assert b["total"] == pytest.approx(sum(b[c] for c in CATEGORIES))
        assert b["weight GEMMs"] > 0.2 * b["total"]
        # kernels run one after another (sequential executor): their sum is at most the runs' wall time
        assert 0.0 < b["total"] <= 1.02 * b["profiled_step_ms"]
    assert fp32["activation quantization"] == 0.0 and quant["activation quantization"] > 0.0


def test_median_round_keeps_the_middle_profile():
    rounds = [{"total": t, "weight GEMMs": t / 2} for t in (90.0, 300.0, 100.0)]
    assert median_round(rounds) == {"total": 100.0, "weight GEMMs": 50.0, "rounds": 3}
    assert median_round(rounds[:2])["total"] == 90.0


def test_amdahl_arithmetic():
    fp32 = {"weight GEMMs": 60.0, "activation quantization": 0.0, "low-rank branch": 0.0, "total": 100.0}
    quant = {"weight GEMMs": 25.0, "activation quantization": 5.0, "low-rank branch": 0.0, "total": 70.0}
    out = amdahl(fp32, quant)
    assert out["gemm_fraction_fp32"] == pytest.approx(0.6)
    assert out["gemm_speedup"] == pytest.approx(2.0)
    assert out["bound_at_this_speedup"] == pytest.approx(0.7)
    assert out["bound_free_gemms"] == pytest.approx(0.4)


def test_feeds_have_the_cfg_batch_and_model_dims(mini_export):
    dims = mini_export[1]["dims"]
    x = feeds(dims, LENGTH)
    assert x["x"].shape == (2, dims["io_channels"], LENGTH) and x["t"].tolist() == [0.5, 0.5]
    assert x["cross_attn_cond"].shape == (2, dims["cond_tokens"], dims["cond_dim"])
    assert x["global_embed"].shape == (2, dims["global_dim"])


def test_candidate_rows_by_device():
    assert list(torch_candidates(False)) == ["torch eager fp32"]
    cuda = torch_candidates(True)
    assert {v["device"] for v in cuda.values()} == {"cpu", "cuda"} and sum(v["compile"] for v in cuda.values()) == 1


def _spec(mini_export, **extra):
    return {"length": LENGTH, "dims": mini_export[1]["dims"], "warmup": 1, "runs": 2, **extra}


def test_ort_worker_times_and_profiles_a_real_session(mini_export):
    out, manifest = mini_export
    result = worker(_spec(mini_export, kind="ort", dir=str(out), entry=manifest["graphs"]["dit"], profile=True))
    assert 0 < result["min_ms"] <= result["median_ms"] and result["peak_rss_mb"] > 50
    assert result["breakdown"]["weight GEMMs"] > 0 and "gpu_mb" not in result
    json.dumps(result)  # crosses the process boundary as JSON


def test_torch_worker_runs_the_stable_audio_tools_dit_on_cpu(mini_export):
    result = worker(_spec(mini_export, kind="torch", manifest=mini_export[1], device="cpu", dtype="float32",
                          compile=False))
    assert result["median_ms"] > 0 and "gpu_mb" not in result


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_torch_worker_fp16_on_cuda(mini_export, compile_):
    result = worker(_spec(mini_export, kind="torch", manifest=mini_export[1], device="cuda", dtype="float16",
                          compile=compile_))
    assert result["median_ms"] > 0 and result["gpu_mb"] > 0


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_worker_times_a_built_engine(mini_export, tmp_path):
    from engines.runtime.tensorrt import BuildSettings, build_engines

    out, manifest = mini_export
    dims = manifest["dims"]
    seconds = (LENGTH - 0.5) * dims["downsampling_ratio"] / dims["sample_rate"]
    doc = build_engines(out, tmp_path / "engines", BuildSettings(min_seconds=seconds, max_seconds=seconds,
                                                                batch_sizes=(2,)))
    engine = Path(tmp_path / "engines" / doc["engines"]["dit"]["engine"])
    result = worker(_spec(mini_export, kind="trt", engine=str(engine)))
    assert result["median_ms"] > 0 and result["gpu_mb"] > 0
    assert np.isfinite(result["median_ms"])


def test_gemm_ceiling_runs_both_kernels_on_one_shape():
    from engines.evaluation.ort_profile import gemm_ceiling

    out = gemm_ceiling(64, 128, 256, runs=2)
    assert (out["m"], out["k"], out["n"]) == (64, 128, 256)
    assert out["fp32_ms"] > 0 and out["int8_ms"] > 0
    assert out["speedup"] == pytest.approx(out["fp32_ms"] / out["int8_ms"])


def test_tensorrt_rows_only_within_the_models_window(mini):
    from engines.evaluation.bench import trt_lengths

    window = int(mini.config["sample_size"]) // int(mini.wrapper.pretransform.downsampling_ratio)
    assert trt_lengths([64, window, window + 1, 1024], mini) == [64, window]


def test_device_of_spec():
    from engines.evaluation.bench_candidates import device_of

    assert device_of({"kind": "trt"}) == "cuda" and device_of({"kind": "ort"}) == "cpu"
    assert device_of({"kind": "torch", "device": "cuda"}) == "cuda" and device_of({"kind": "torch", "device": "cpu"}) == "cpu"


def test_bad_run_counts_are_refused_before_any_work(tmp_path):
    """--profile-rounds 0 would leave --breakdown with no profile: refused on one line, nothing written."""
    proc = run_script("bench.py", "--synthetic-weights", "--calibration", str(tmp_path / "none"), "--breakdown",
                      "--profile-rounds", "0", "--out", str(tmp_path / "b"), timeout=300)
    assert "--profile-rounds >= 1" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []
