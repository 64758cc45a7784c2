"""`scripts/export.py --scheme w8a8/...`: the quantized export, its manifest and accuracy report, running it,
and the refusals (unsupported scheme for a target, a calibration artifact of another model)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import soundfile as sf
from conftest import RTN, one_line_error, run_script
from onnx import TensorProto

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def w8a8_export(mini_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    # round to nearest: the default weight passes (GPTQ, MSE clip, loss-driven smoothing; minutes here, for
    # two graphs: the FP16 one and the report's FP32 twin) are test_quantize's default-pass cases and test_gptq's
    proc = run_script("export.py", "--synthetic-weights", "--scheme", "w8a8", "--target", "tensorrt",
                      *[arg for field, value in RTN.items() for arg in (f"--{field.replace('_', '-')}", value)],
                      "--calibration", str(mini_calibration.directory), "--report-prompts", "2",
                      "--report-steps", "8", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "manifest.json").read_text()), proc


def test_w8a8_tensorrt_export_records_recipe_calibration_and_layers(w8a8_export, mini_calibration):
    out, manifest, proc = w8a8_export
    q = manifest["quantization"]
    assert manifest["scheme"] == "w8a8" and q["target"] == "tensorrt" and q["tensorrt_rules"] == "checked"
    assert q["recipe"]["method"] == "timestep-smoothquant" and len(q["recipe_sha256"]) == 64
    assert q["calibration"]["artifact_sha256"] == mini_calibration.meta["artifact_sha256"]
    assert (out / "calibration" / "calibration.json").is_file()
    layers = q["layers"]
    assert len(layers) == 42 and all(r["quantized"] and r["smoothed"] and r["rank"] == 0 for r in layers.values())
    assert all(len(r["act_scales"]) == 3 and min(r["act_scales"]) > 0 for r in layers.values())
    dit = manifest["graphs"]["dit"]
    # TensorRT cannot parse com.microsoft ops: the attention fusion is for the ONNX Runtime target only
    graph = onnx.load(str(out / dit["file"]), load_external_data=False).graph
    assert "ort_fusion" not in dit and not any(n.domain == "com.microsoft" for n in graph.node)
    assert sum(n.op_type == "Softmax" for n in graph.node) == 12
    assert 0.24 < dit["size_ratio"] < 0.30  # INT8 weights plus the float layers kept out (sao-mini is small)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["dit_size_ratio"] == pytest.approx(dit["size_ratio"])


def test_tensorrt_target_exports_fp16_text_encoder_and_vae(w8a8_export):
    """Strongly typed engines run in the graph's types, so a TensorRT-target export carries FP16 text encoder
    and VAE graphs: FP32 in and out, FP16 weights, T5's feed-forward output projections FP32."""
    out, manifest, _ = w8a8_export
    assert manifest["options"]["target"] == "tensorrt" and manifest["graphs"]["dit"]["precision"] == "w8a8"
    for name in ("text_encoder", "vae_decoder"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "fp16" and entry["parity"]["max_rel_error"] < 2e-2, entry["parity"]
        graph = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        float_io = [v for v in (*graph.input, *graph.output) if v.type.tensor_type.elem_type != TensorProto.INT64]
        assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in float_io)
        big = Counter(i.data_type for i in graph.initializer if np.prod(i.dims) >= 1024)
        assert big[TensorProto.FLOAT16] > 0
        if name == "text_encoder":  # one FP32 `wo` per T5 block, everything else of size FP16
            assert 0 < big[TensorProto.FLOAT] < big[TensorProto.FLOAT16], big
        else:
            assert big[TensorProto.FLOAT] == 0, big


def test_report_shows_timestep_smoothquant_beating_minmax_and_modelopt(w8a8_export):
    out, manifest, _ = w8a8_export
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"].split()[0]: r for r in report["rows"]}
    # a TensorRT-target export also carries the same recipe on the FP32 graph (exact Q/DQ): the FP16 graph's cost
    assert set(rows) == {"quadit", "minmax", "ModelOpt", "same"}
    assert abs(rows["same"]["mean_step_sqnr_db"] - rows["quadit"]["mean_step_sqnr_db"]) < 1.0
    assert manifest["report"]["fp16_cost_db"]["mean_step_sqnr"] == pytest.approx(
        rows["same"]["mean_step_sqnr_db"] - rows["quadit"]["mean_step_sqnr_db"])
    assert len(report["prompts"]) == 2 and all(len(r["buckets"]) == 3 for r in report["rows"])
    ours = rows["quadit"]["mean_step_sqnr_db"]
    assert ours > rows["minmax"]["mean_step_sqnr_db"] + 3.0
    assert ours > rows["ModelOpt"]["mean_step_sqnr_db"]
    assert rows["quadit"]["mean_cosine"] > 0.98 and np.isfinite(rows["quadit"]["final_latent_snr_db"])
    assert "| quadit w8a8" in (out / "report.md").read_text()
    assert manifest["report"]["mean_step_sqnr_db"] == pytest.approx(ours)


def test_check_passes_on_the_tensorrt_target_export(w8a8_export):
    """scripts/check.py on the FP16-based TensorRT-target graph (its Q/DQ run as float math in ONNX Runtime)."""
    out, manifest, _ = w8a8_export
    assert manifest["graphs"]["dit"]["base_precision"] == "fp16"
    assert manifest["quantization"]["tensorrt_precision"]["violations"] == []
    assert manifest["quantization"]["predicted_speed"]["kind"].startswith("PREDICTION")
    proc = run_script("check.py", "--export", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "check_report.json").read_text())
    assert report["passed"] and report["comparisons"][0]["sqnr_db"] >= report["thresholds"]["min_sqnr_db"]


def test_quantized_export_generates_audio(w8a8_export, tmp_path):
    out, _, _ = w8a8_export
    wav = tmp_path / "q.wav"
    proc = run_script("generate.py", "--export", str(out), "--prompt", "a dog barking", "--seconds", "1.5",
                      "--steps", "10", "--out", str(wav))
    assert proc.returncode == 0, proc.stderr[-3000:]
    audio, rate = sf.read(str(wav), always_2d=True)
    assert rate == 44100 and audio.shape == (int(1.5 * 44100), 2) and np.isfinite(audio).all()


@pytest.mark.parametrize("flags,needle", [
    (["--scheme", "w4a8", "--target", "tensorrt"], "w4a8 is not supported by TensorRT"),
    (["--scheme", "w8a8", "--activations", "dynamic", "--target", "tensorrt"], "dynamic INT8"),
    (["--scheme", "w9a9"], "unknown scheme"),
    (["--scheme", "w8a8", "--bucket-policy", "per-layer"], "unknown bucket policy"),
    (["--scheme", "w4a16", "--target", "tensorrt", "--block-size", "32"], "block sizes 64 or 128"),
    (["--scheme", "fp8"], "fp8 needs --target tensorrt"),
])
def test_unsupported_combinations_exit_2_before_any_work(tmp_path, flags, needle):
    out = tmp_path / "x"
    proc = run_script("export.py", "--synthetic-weights", *flags, "--calibration", str(tmp_path), "--out", str(out))
    assert needle in one_line_error(proc)
    assert not out.exists()


def test_calibration_of_another_model_is_refused(mini_calibration, tmp_path):
    out = tmp_path / "x"
    proc = run_script("export.py", "--synthetic-weights", "--seed", "1", "--scheme", "w8a8",
                      "--calibration", str(mini_calibration.directory), "--out", str(out))
    assert "does not belong to this model" in one_line_error(proc)
    assert not out.exists() and not list(tmp_path.glob(".x*"))
