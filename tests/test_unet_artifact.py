"""The UNet calibration artifact (engines/calibrate/unet_artifact.py): `quadit calibrate` writes it for a UNet
preset, `quadit export --scheme w8a8 --calibration DIR` quantizes from it (and `quadit check` passes on the result),
it round-trips every per-layer statistic of `UNetCalibration` exactly (float32), and an artifact of another model,
seed, family or with modified tensors is refused with one line (exit 2), leaving no output behind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import one_line_error, run_script

from exporter.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CALIB = ("--num-prompts", "2", "--steps", "4", "--buckets", "2", "--seconds", "0.64")


@pytest.fixture(scope="module")
def unet_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("unet-artifact") / "calib"
    proc = run_script("calibrate.py", "--model", "audioldm-mini", "--synthetic-weights", *CALIB, "--out", str(out),
                      env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_calibrate_writes_a_versioned_unet_artifact(unet_artifact):
    out, summary = unet_artifact
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["schema_version"] == 1 and meta["kind"] == "quadit-calibration" and meta["family"] == "unet"
    assert meta["model"]["model"] == "audioldm-mini" and meta["model"]["weights"] == "synthetic:0"
    assert len(meta["layers"]) == summary["layers"] == 117 and len(meta["buckets"]["edges"]) == 3
    assert sorted(meta["statistics"]) == summary["statistics"] == ["ch_absmax", "xtx"]
    assert meta["prompts"]["list"] and meta["artifact_sha256"] == summary["artifact_sha256"]


def test_artifact_round_trips_the_statistics_object(tmp_path):
    from engines.calibrate.unet import UNetCalibrationSettings, calibrate_unet
    from engines.calibrate.unet_artifact import read_unet_artifact, write_unet_artifact
    from exporter.models.unet_audio import load_unet_model

    model = load_unet_model("tango-mini", None, True, 0)
    settings = UNetCalibrationSettings(steps=3, buckets=2, seconds=0.64)
    calibration = calibrate_unet(model, ["rain"], settings, second_moments=True)
    write_unet_artifact(tmp_path, model, calibration, ["rain"], settings)
    back, prompts, _ = read_unet_artifact(tmp_path, model)
    assert prompts == ["rain"] and back.edges == calibration.edges
    for field in ("ch_absmax", "xtx"):
        ours, theirs = getattr(calibration, field), getattr(back, field)
        assert sorted(ours) == sorted(theirs) and ours
        for name in ours:  # stored as float32: exactly the float32 rounding of what was collected
            assert np.array_equal(theirs[name], np.asarray(ours[name]).astype(np.float32)), (field, name)
    meta = json.loads((tmp_path / "calibration.json").read_text())
    meta["family"] = "dit"
    (tmp_path / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not a UNet's"):
        read_unet_artifact(tmp_path, model)


@pytest.mark.slow  # a w8a8 export and a check (about 2 min of one core)
def test_export_quantizes_from_the_artifact_and_check_passes(unet_artifact, tmp_path):
    calib, summary = unet_artifact
    out = tmp_path / "w8a8"
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "w8a8",
                      "--calibration", str(calib), "--report-prompts", "0", "--out", str(out), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant = json.loads((out / "manifest.json").read_text())["graphs"]["unet"]["quantization"]
    assert quant["layers"] == 117 and quant["calibration"]["artifact_sha256"] == summary["artifact_sha256"]
    assert quant["calibration"]["settings"]["steps"] == 4  # the artifact's, not the export's --calib-steps
    check = run_script("check.py", "--export", str(out), env=ONE_THREAD)
    assert check.returncode == 0 and json.loads(check.stdout.strip().splitlines()[-1])["passed"], check.stderr[-2000:]


@pytest.mark.parametrize("model_args, words", [
    (("--model", "tango-mini", "--synthetic-weights"), "does not belong to this model"),
    (("--model", "audioldm-mini", "--synthetic-weights", "--seed", "1"), "weights: artifact 'synthetic:0'"),
])
def test_export_refuses_an_artifact_of_another_model(unet_artifact, tmp_path, model_args, words):
    calib, _ = unet_artifact
    out = tmp_path / "never"
    proc = run_script("export.py", *model_args, "--scheme", "w8a8", "--calibration", str(calib), "--out", str(out),
                      env=ONE_THREAD)
    assert proc.returncode == 2 and words in one_line_error(proc) and not out.exists(), proc.stderr[-2000:]


def test_export_refuses_modified_tensors(unet_artifact, tmp_path):
    import shutil

    calib, _ = unet_artifact
    bad = tmp_path / "bad"
    shutil.copytree(calib, bad)
    data = bytearray((bad / "calibration.safetensors").read_bytes())
    data[-8:] = b"\x00" * 8
    (bad / "calibration.safetensors").write_bytes(bytes(data))
    out = tmp_path / "never"
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "w8a8",
                      "--calibration", str(bad), "--out", str(out), env=ONE_THREAD)
    assert proc.returncode == 2 and "sha256" in one_line_error(proc) and not out.exists()
