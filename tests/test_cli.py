"""The CLIs end to end, and bad input: one line on stderr, exit code 2, nothing left behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import one_line_error, run_script

pytestmark = pytest.mark.filterwarnings("ignore")



def test_generate_cli_writes_stereo_44k_wav_of_requested_length(mini_export, tmp_path):
    export_dir, _ = mini_export
    wav = tmp_path / "out.wav"
    proc = run_script("generate.py", "--export", str(export_dir), "--prompt", "birds at dawn", "--seconds", "2.5",
                      "--steps", "30", "--seed", "3", "--out", str(wav))
    assert proc.returncode == 0, proc.stderr[-3000:]
    audio, rate = sf.read(str(wav), always_2d=True)
    assert rate == 44100 and audio.shape == (int(2.5 * 44100), 2)
    assert np.isfinite(audio).all() and float(np.sqrt((audio ** 2).mean())) > 1e-3
    assert json.loads(proc.stdout.strip().splitlines()[-1])["out"] == str(wav.resolve())


@pytest.mark.slow  # a second model's whole export and generate: minutes
def test_model_config_of_another_sao_family_model_exports_and_generates(tmp_path):
    from exporter.models import presets

    config = presets.preset_config("sao-mini")
    dit = config["model"]["diffusion"]["config"]
    dit.update(embed_dim=256, depth=2, num_heads=4, cond_token_dim=128, global_cond_dim=256)
    config["model"]["conditioning"]["cond_dim"] = 128
    config["quadit"]["synthetic_t5"] = {"num_layers": 1, "d_ff": 512}
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "export"
    proc = run_script("export.py", "--model", "custom", "--model-config", str(path), "--synthetic-weights",
                      "--seed", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dims"]["embed_dim"] == 256 and manifest["dims"]["depth"] == 2
    assert manifest["parity"]["max_rel_error"] <= 1e-4
    wav = tmp_path / "custom.wav"
    proc = run_script("generate.py", "--export", str(out), "--prompt", "a bell", "--seconds", "1", "--steps", "10",
                      "--out", str(wav))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sf.info(str(wav)).frames == 44100


def _corrupt_checkpoint(tmp_path: Path) -> list[str]:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\x00garbage" * 100)
    from exporter.models import presets

    (tmp_path / "model_config.json").write_text(json.dumps(presets.preset_config("sao-mini")))
    return ["--model", "sao-mini", "--checkpoint", str(ckpt)]


def _not_sao_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"model_type": "autoencoder", "model": {}}))
    return ["--model-config", str(path), "--synthetic-weights"]


BAD_EXPORTS = {
    "unknown model": (lambda tmp: ["--model", "musicgen", "--synthetic-weights"], "unknown model"),
    "unknown scheme": (lambda tmp: ["--synthetic-weights", "--scheme", "int3"], "unknown scheme"),
    "missing checkpoint": (lambda tmp: ["--model", "stable-audio-open", "--checkpoint", str(tmp / "nope.ckpt")],
                           "not found"),
    "no weights at all": (lambda tmp: ["--model", "stable-audio-open"], "--synthetic-weights"),
    "corrupt checkpoint": (_corrupt_checkpoint, "corrupt"),
    "config not of the SAO family": (_not_sao_config, "not a Stable Audio Open-family config"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_export_bad_input_exits_2_and_leaves_nothing(case, tmp_path):
    make_args, expected = BAD_EXPORTS[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(work)
    before = set(work.iterdir())
    proc = run_script("export.py", *args, "--out", str(work / "export"))
    line = one_line_error(proc)
    assert expected in line
    assert set(work.iterdir()) == before, "a failed export must leave nothing behind"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_export_to_unwritable_directory_exits_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    proc = run_script("export.py", "--synthetic-weights", "--out", str(locked / "export"))
    assert "cannot write" in one_line_error(proc)


def test_export_to_path_under_a_file_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_script("export.py", "--synthetic-weights", "--out", str(blocker / "export"))
    assert "cannot write" in one_line_error(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("seconds,expected", [("-2", "positive"), ("600", "longer than")])
def test_generate_bad_duration_exits_2_and_writes_nothing(mini_export, tmp_path, seconds, expected):
    export_dir, _ = mini_export
    proc = run_script("generate.py", "--export", str(export_dir), "--prompt", "x", "--seconds", seconds,
                      "--out", str(tmp_path / "x.wav"))
    assert expected in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


def test_generate_from_a_directory_that_is_not_an_export_exits_2(tmp_path):
    proc = run_script("generate.py", "--export", str(tmp_path), "--prompt", "x", "--seconds", "1",
                      "--out", str(tmp_path / "x.wav"))
    assert "not a quadit export" in one_line_error(proc)
