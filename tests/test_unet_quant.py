"""The UNet family's W8A8 (issue 21): Conv2d quantization pass, calibration, exports for both targets.

Numbers asserted: the pass's error ordering on a Conv with injected outlier channels (smoothing beats plain
min-max), per-bucket pre-scales exact in FP32 without rounding, the TensorRT rules on the TensorRT-target graph
(checker clean, INT8 convolutions with FP16 outputs, nothing quantized in FP32), and the report's SNRs against
FP32 and against ONNX Runtime's own quantizer on held-out prompts.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import one_line_error, run_script
from onnx import TensorProto, helper, numpy_helper

from engines.evaluation.accuracy import sqnr_db
from exporter.onnx.torch_export import ort_session
from exporter.passes.conv_quant import WeightedSite, quantize_unet
from exporter.tensorrt.checker import check_graph
from exporter.tensorrt.precision_map import precision_map

EDGES = (1000.0, 500.0, -1.0)  # two buckets: t >= 500 is bucket 0


def _conv_graph(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """x [B, C, H, W], timestep [B] -> Conv(x, w, b) 3x3 same padding (timestep unused until a pass reads it)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1])]
    nodes[0].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'unet.conv']")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", w.shape[1], 8, 8]),
                                           helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", w.shape[0], 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _outlier_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 32, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    gain = np.ones(32, np.float32)
    gain[[3, 17]] = 40.0  # two outlier input channels (6%), as trained UNets have
    # bucket 0 (noisy steps) small, bucket 1 three times larger: the range grows along the trajectory
    xs = [(rng.standard_normal((2, 32, 8, 8)) * gain[None, :, None, None] * s).astype(np.float32) for s in (1.0, 3.0)]
    return w, b, xs


def _quantized_error(method: str) -> float:
    w, b, xs = _outlier_case()
    model = _conv_graph(w, b)
    ch_absmax = np.stack([np.abs(x).max(axis=(0, 2, 3)) for x in xs])  # [K=2, C]
    site = WeightedSite("conv", "/conv/Conv", "Conv", "x", "w", 1, 0, "b")
    record = quantize_unet(model, {"conv": site}, {"conv": ch_absmax}, EDGES, method, 0.5)
    assert record["conv"]["op"] == "Conv" and record["conv"]["per_bucket"] == (method == "timestep-smoothquant")
    onnx.checker.check_model(model)
    ref, q = _session(_conv_graph(w, b)), _session(model)
    errors = []
    for t, x in zip((800.0, 100.0), xs):
        feeds = {"x": x, "timestep": np.array([t, t], np.float32)}
        errors.append(sqnr_db(ref.run(None, feeds)[0], q.run(None, feeds)[0]))
    return float(np.mean(errors))


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_conv_smoothing_and_timestep_scales_beat_plain_minmax():
    """The same INT8 Conv (per-output-channel weights, per-tensor activations): smoothing moves the outlier
    channels' range into the weights, the per-bucket pre-scale gives the small-range bucket its own scale."""
    plain, smooth, timestep = (_quantized_error(m) for m in ("minmax", "smoothquant", "timestep-smoothquant"))
    assert smooth > plain + 3.0, (plain, smooth)
    assert timestep > smooth + 1.0, (smooth, timestep)
    assert timestep > 30.0


def test_checker_reads_conv_rules():
    w, b, _ = _outlier_case()
    model = _conv_graph(w, b)
    ch_absmax = np.ones((2, 32), np.float32)
    quantize_unet(model, {"conv": WeightedSite("conv", "/conv/Conv", "Conv", "x", "w", 1, 0, "b")},
                  {"conv": ch_absmax}, EDGES, "timestep-smoothquant", 0.5)
    assert check_graph(model) == []
    inits = {t.name for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    next(a for a in dq.attribute if a.name == "axis").i = 1  # per input channel: not what TensorRT quantizes
    assert [v.rule for v in check_graph(model)] == ["Conv weights per output channel"]


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """tango-mini (cross-attention to T5 states) exported for TensorRT through the CLI, without the report."""
    out = tmp_path_factory.mktemp("unet") / "tango-w8a8-trt"
    proc = run_script("export.py", "--model", "tango-mini", "--synthetic-weights", "--scheme", "w8a8", "--target",
                      "tensorrt", "--calib-prompts", "4", "--calib-steps", "6", "--report-prompts", "0",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "manifest.json").read_text())


def test_tensorrt_target_unet_is_int8_conv_with_fp16_outputs(trt_export):
    out, manifest = trt_export
    entry = manifest["graphs"]["unet"]
    assert entry["precision"] == "w8a8" and manifest["target"] == "tensorrt"
    q = entry["quantization"]
    assert q["layers"] == q["conv_layers"] + q["linear_layers"] and q["conv_layers"] >= 40
    model = onnx.load(str(out / entry["file"]))
    assert check_graph(model) == []
    pmap = precision_map(model, latents=64, extra_dims={"frames": 64})
    assert pmap.violations == []
    kinds = Counter((x.kind, x.precision) for x in pmap.layers)
    assert kinds[("Conv", "INT8 (FP16 out)")] == q["conv_layers"], kinds
    assert kinds[("weight GEMM", "INT8 (FP16 out)")] == q["linear_layers"], kinds
    assert not [x for x in pmap.layers if x.kind in ("Conv", "weight GEMM", "attention MatMul") and x.compute == "FP32"]
    assert pmap.flop_share()["INT8"] > 0.9
    assert entry["size_ratio"] < 0.4


def test_tensorrt_target_unet_tracks_fp32(trt_export):
    """The FP16 + INT8 graph against diffusers' FP32 UNet (the same synthetic weights, rebuilt here) on the
    same input, the graph run in ONNX Runtime (exact Q/DQ math)."""
    import torch

    from exporter.models.unet_audio import load_unet_model
    from exporter.onnx.unet_graphs import UNetGraph

    out, manifest = trt_export
    reference = UNetGraph("tango", load_unet_model("tango-mini", None, True, 0).unet).eval()
    session = ort_session(out / "unet.onnx")
    rng = np.random.default_rng(0)
    length = manifest["dims"]["text_length"]
    feeds = {"sample": rng.standard_normal((2, 8, 64, 16)).astype(np.float32),
             "encoder_hidden_states": rng.standard_normal((2, length, 64)).astype(np.float32),
             "encoder_attention_mask": np.ones((2, length), np.float32)}
    snr = []
    for t in (901.0, 501.0, 101.0):
        f = {**feeds, "timestep": np.array([t, t], np.float32)}
        with torch.no_grad():
            ref = reference(*(torch.from_numpy(f[k]) for k in ("sample", "timestep", "encoder_hidden_states",
                                                                "encoder_attention_mask"))).numpy()
        snr.append(sqnr_db(ref, session.run(None, f)[0]))
    assert min(snr) > 15.0, snr


def test_audioldm_w8a8_report_beats_onnx_runtime_quantizer(tmp_path):
    out = tmp_path / "audioldm-w8a8"
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "w8a8",
                      "--calib-prompts", "4", "--calib-steps", "6", "--report-prompts", "1", "--report-steps", "6",
                      "--no-modelopt", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["candidate"].split(" (")[0]: r for r in report["rows"]}
    ours, peer = rows["quadit w8a8"], rows["ONNX Runtime quantize_static w8a8"]
    assert ours["step_sqnr_db"] > 20.0 and ours["latent_snr_db"] > 15.0 and ours["audio_snr_db"] > 15.0, ours
    assert ours["latent_snr_db"] > peer["latent_snr_db"] + 5.0, (ours, peer)
    assert report["context"]["ort_peer"]["nodes"] == json.loads((out / "manifest.json").read_text())[
        "graphs"]["unet"]["quantization"]["layers"]
    check = run_script("check.py", "--export", str(out))
    assert check.returncode == 0, check.stderr[-3000:]
    unet = next(c for c in json.loads((out / "check_report.json").read_text())["comparisons"] if c["graph"] == "unet")
    assert unet["candidate"] == "w8a8-onnxrt" and unet["status"] == "passed"
    assert unet["mean_sqnr_db"] >= unet["min_sqnr_db"] == 15.0 and unet["mean_cosine"] >= 0.98, unet
    wav = tmp_path / "out.wav"
    gen = run_script("generate.py", "--export", str(out), "--prompt", "a dog barking", "--seconds", "2",
                     "--out", str(wav))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert json.loads(gen.stdout.strip().splitlines()[-1])["rms"] > 0.0


def test_unet_refuses_schemes_it_does_not_have(tmp_path):
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "fp8",
                      "--out", str(tmp_path / "x"))
    assert "not available for the UNet family" in one_line_error(proc)
    assert not (tmp_path / "x").exists()
    # W4A8 exists on ONNX Runtime only (TensorRT has it in TensorRT-LLM alone): refused before any work
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "w4a8",
                      "--target", "tensorrt", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "TensorRT-LLM" in one_line_error(proc)
    assert not (tmp_path / "y").exists()
