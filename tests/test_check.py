"""`scripts/check.py` and the Polygraphy data loader: a quantized export's DiT against FP32 on the inputs saved
in check/, pass on w8a8 and w4a16 (per-bucket graphs with a session config), fail by the numbers on a
mis-scaled activation, refuse an FP32 export; `polygraphy run --data-loader-script` on the saved inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, RTN, one_line_error, run_script
from onnx import numpy_helper

pytestmark = pytest.mark.filterwarnings("ignore")
POLYGRAPHY = str(Path(sys.executable).parent / "polygraphy")
LOADER = str(ROOT / "engines" / "evaluation" / "polygraphy_loader.py")
# round to nearest (conftest.RTN): the checks compare the export with FP32, whatever its weight passes
_RTN = [arg for field, value in RTN.items() for arg in (f"--{field.replace('_', '-')}", value)]
FLAGS = {"w8a8": ["--scheme", "w8a8", *_RTN],
         # the TensorRT target (FP16-based graphs, FP16 scales; ORT runs their Q/DQ as float math); the w8a8
         # TensorRT-target export of tests/test_quantized_export.py is checked there. Per-bucket graphs
         # (dit.bucket{k}.onnx) and the w4a16 ORT session config: both need quadit's runner
         "w4a16": ["--scheme", "w4a16", "--method", "timestep-smoothquant", "--bucket-policy", "per-bucket-graph",
                   "--target", "tensorrt", *_RTN]}


def _ensure_check_data(out: Path, fp32_dit: Path, cal_prompts: list[str]) -> None:
    """The export writes check/ in its report stage once `write_check_data` is called there; until then make
    the same data here from the report's own held-out trajectories (1 prompt, 8 steps)."""
    if (out / "check" / "inputs.json").is_file():
        return
    from engines.evaluation.accuracy import AccuracySettings, capture, heldout_prompts
    from engines.evaluation.check import write_check_data
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline
    from exporter.onnx.torch_export import ort_session

    manifest = json.loads((out / "manifest.json").read_text())
    settings = AccuracySettings(prompts=1, steps=8)
    reference = ort_session(fp32_dit)
    trajectories = capture(Pipeline(OrtBackend(out, manifest), manifest), reference,
                           heldout_prompts(cal_prompts, settings.prompts, settings.heldout_seed), settings)
    write_check_data(out, reference, trajectories, manifest["quantization"]["calibration"]["buckets"])


@pytest.fixture(scope="module")
def exports(mini_export, mini_calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("check")

    def export(scheme: str) -> Path:
        out = root / scheme
        proc = run_script("export.py", "--synthetic-weights", *FLAGS[scheme], "--calibration",
                          str(mini_calibration.directory), "--report-prompts", "1", "--report-steps", "8",
                          "--no-modelopt", "--out", str(out), timeout=1500)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return out

    with ThreadPoolExecutor(2) as pool:  # two subprocesses: the exports overlap
        outs = dict(zip(FLAGS, pool.map(export, FLAGS)))
    for out in outs.values():
        _ensure_check_data(out, mini_export[0] / "dit.onnx", mini_calibration.meta["prompts"]["list"])
    return outs


@pytest.fixture(scope="module")
def misscaled(exports, tmp_path_factory):
    """A copy of the w8a8 export whose first activation Q scale is 50x too large; nothing else changed."""
    out = tmp_path_factory.mktemp("misscaled") / "w8a8-bad"
    shutil.copytree(exports["w8a8"], out)
    (out / "check_report.json").unlink(missing_ok=True)
    model = onnx.load(str(out / "dit.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith(".act.scale"))
    scale = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((scale * 50).astype(scale.dtype), init.name))
    onnx.save(model, str(out / "dit.onnx"))
    return out, init.name


def _report(out: Path) -> dict:
    return json.loads((out / "check_report.json").read_text())


@pytest.mark.parametrize("scheme", list(FLAGS))
def test_check_passes_on_quantized_exports(exports, scheme):
    out = exports[scheme]
    proc = run_script("check.py", "--export", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"fp32-onnxrt vs {scheme.split('-')[0]}-onnxrt" in proc.stdout and "FAIL" not in proc.stdout
    report = _report(out)
    manifest = json.loads((out / "manifest.json").read_text())
    from exporter.passes.recipe import Recipe

    assert report["thresholds"] == Recipe.from_json(manifest["quantization"]["recipe"]).check_thresholds()
    assert report["passed"] and len(report["comparisons"]) == 1
    (c,) = report["comparisons"]
    assert c["status"] == "passed" and c["polygraphy_passed"] and not c["failures"]
    meta = json.loads((out / "check" / "buckets.json").read_text())
    assert sorted(meta["buckets"]) == [0, 0, 1, 1, 2, 2]  # 2 saved inputs per timestep bucket
    assert [b["bucket"] for b in c["buckets"]] == [0, 1, 2] and all(b["inputs"] == 2 for b in c["buckets"])
    assert c["sqnr_db"] >= report["thresholds"]["min_sqnr_db"]
    assert all(b["sqnr_db"] >= report["thresholds"]["min_sqnr_db"] and b["passed"] for b in c["buckets"])
    assert len(c["iterations"]) == 6
    for row in c["iterations"]:  # every comparison's numbers, and Polygraphy's SNR equals the SQNR here
        assert all(np.isfinite(row[k]) for k in ("sqnr_db", "cosine", "max_abs_err", "mean_abs_err", "max_rel_err"))
        assert row["polygraphy_snr_db"] == pytest.approx(row["sqnr_db"], abs=1e-3)
        assert row["polygraphy_cosine"] == pytest.approx(row["cosine"], abs=1e-5)
    assert c["sqnr_db"] == pytest.approx(np.mean([r["sqnr_db"] for r in c["iterations"]]))


def test_check_fails_by_the_numbers_on_a_misscaled_activation(misscaled):
    out, name = misscaled
    proc = run_script("check.py", "--export", str(out))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" in proc.stdout
    report = _report(out)
    (c,) = report["comparisons"]
    assert not report["passed"] and c["status"] == "failed" and not c["polygraphy_passed"]
    assert c["sqnr_db"] < report["thresholds"]["min_sqnr_db"] and c["failures"]
    assert any("all inputs" in f for f in c["failures"])


def test_reference_rerun_matches_the_saved_fp32_outputs(exports, mini_export):
    from engines.evaluation.check import run_checks

    out = exports["w8a8"]
    saved = run_checks(out)["comparisons"][0]
    rerun = run_checks(out, fp32_onnx=mini_export[0] / "dit.onnx")
    assert rerun["reference"]["source"].endswith("dit.onnx")
    assert rerun["comparisons"][0]["sqnr_db"] == pytest.approx(saved["sqnr_db"], abs=1e-3)


def test_fp32_export_and_missing_check_data_exit_2(mini_export, tmp_path):
    proc = run_script("check.py", "--export", str(mini_export[0]))
    error = one_line_error(proc)
    assert "no check/ data" in error and "--report-prompts" in error, proc.stderr
    proc = run_script("check.py", "--export", str(tmp_path))
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_tensorrt_path_wiring_with_stand_in_engines(exports, monkeypatch):
    """No TensorRT here: engines.runtime.tensorrt's metadata check, engine loading and EngineRunner are replaced by
    stand-ins that run the per-bucket ONNX graphs, so TrtDiTRunner + TrtDiT's bucket choice are exercised."""
    import torch

    import engines.runtime.tensorrt as trt_mod
    from engines.evaluation.check import run_checks
    from exporter.onnx.torch_export import ort_session

    out = exports["w4a16"]
    manifest = json.loads((out / "manifest.json").read_text())
    dit = manifest["graphs"]["dit"]
    engines = {f"dit.bucket{b['index']}": {"graph": "dit", "engine": b["file"], "bucket": b} for b in dit["buckets"]}

    class StandInRunner:
        def __init__(self, path, name, cuda_graph=False):
            self.session = ort_session(path, dit["ort_session_config"])
            self.inputs, self.outputs = ["x", "t", "cross_attn_cond", "global_embed"], ["v"]
            self.dtypes = {n: torch.float32 for n in self.inputs + self.outputs}
            self.profiles = [{"x": [(b, 64, 22), (b, 64, 65), (b, 64, 65)], "t": [(b,)] * 3,
                              "cross_attn_cond": [(b, 66, 256)] * 3, "global_embed": [(b, 512)] * 3} for b in (2, 1)]

        def __call__(self, feeds):
            return {"v": torch.from_numpy(self.session.run(["v"], {k: v.numpy() for k, v in feeds.items()})[0])}

    monkeypatch.setattr(trt_mod, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(trt_mod, "check_engine_metadata", lambda path, export: {
        "engines": engines, "bucket_edges": dit["bucket_edges"]})
    monkeypatch.setattr(trt_mod, "load_engine", lambda path: path)
    monkeypatch.setattr(trt_mod, "EngineRunner", StandInRunner)
    report = run_checks(out, engines_dir=out)
    ort, trt = report["comparisons"]
    assert (ort["backend"], trt["backend"], trt["candidate"]) == ("onnxruntime", "tensorrt", "w4a16-tensorrt")
    assert trt["status"] == "passed"
    assert [r["sqnr_db"] for r in trt["iterations"]] == pytest.approx([r["sqnr_db"] for r in ort["iterations"]])


def test_polygraphy_cli_runs_on_the_saved_inputs(exports, tmp_path):
    w8a8, w4a16 = exports["w8a8"], exports["w4a16"]
    env = {**os.environ, "QUADIT_EXPORT": str(w8a8)}
    commands = [  # from another directory: the loader finds the export from the env var or the model path
        ([POLYGRAPHY, "run", str(w8a8 / "dit.onnx"), "--onnxrt", "--data-loader-script", LOADER], env),
        ([POLYGRAPHY, "run", str(w8a8 / "dit.onnx"), "--onnxrt", "--data-loader-script", LOADER, "--load-outputs",
          str(w8a8 / "check" / "reference_outputs.json"), "--compare", "snr", "cosine_similarity",
          "--snr-threshold", "15", "--cosine-similarity-threshold", "0.98", "--check-average"], env),
        ([POLYGRAPHY, "run", str(w4a16 / "dit.bucket1.onnx"), "--onnxrt", "--data-loader-script", LOADER],
         {k: v for k, v in os.environ.items() if k != "QUADIT_EXPORT"}),
    ]
    outputs = []
    for command, environment in commands:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    assert "Iteration: 5" in outputs[0] and "PASSED" in outputs[0]
    assert "Accuracy Summary" in outputs[1] and "SNR:" in outputs[1]
    assert "2 of bucket 1" in outputs[2] and "Iteration: 2" not in outputs[2]
