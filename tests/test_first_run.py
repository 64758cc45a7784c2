"""What a new user meets first: durations that fit the model, options checked before work, errors on their
own line, no third-party noise, time estimates, and ONNX Runtime's device providers.

The short-window model is an SAO-family config the other tests do not use: sao-mini's classes with
`sample_size` 131072 (a 2.97 s window) and 192-wide condition tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, one_line_error, run_script

THIRD_PARTY_NOISE = ("Should have tb<=t1", "Should have ta>=t0", "flash_attn", "pkg_resources", "weight_norm",
                     "autocast", "Warning")


def _clean_env() -> dict[str, str]:
    """The environment a user has: no PYTHONWARNINGS (conftest's run_script sets it to ignore)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


def _script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_clean_env())


def short_window_config(path: Path) -> Path:
    from exporter.models import presets

    config = presets.preset_config("sao-mini")
    config["sample_size"] = 131072  # 2.97 s at 44.1 kHz: 64 latents
    config["model"]["diffusion"]["config"].update(embed_dim=384, depth=2, num_heads=6, cond_token_dim=192,
                                                  global_cond_dim=384)
    config["model"]["conditioning"]["cond_dim"] = 192
    config["quadit"]["synthetic_t5"] = {"num_layers": 1, "d_ff": 512}
    path.write_text(json.dumps(config))
    return path


# durations -------------------------------------------------------------------------------------------------

def test_durations_default_to_the_window_and_user_values_are_checked():
    from engines.runtime.durations import pick_seconds, window_seconds
    from exporter.errors import InputError

    short = {"sample_size": 131072, "sample_rate": 44100}
    assert window_seconds(short) == pytest.approx(2.97215, abs=1e-5)
    assert pick_seconds("--seconds", None, 5.0, short, "calibration") == 2.97  # rounded down to 10 ms
    assert pick_seconds("--seconds", None, 2.0, short, "calibration") == 2.0
    assert pick_seconds("--seconds", 1.5, 5.0, short, "calibration") == 1.5
    with pytest.raises(InputError, match=r"--seconds 5.0 is longer than this model's window of 2.97 s"):
        pick_seconds("--seconds", 5.0, 3.0, short, "calibration")
    with pytest.raises(InputError, match="positive"):
        pick_seconds("--report-seconds", -1.0, 3.0, short, "report")
    # the chosen default never rounds up past the window's latent count (ceil(2.97 * 44100 / 2048) == 64)
    import math

    assert math.ceil(pick_seconds("--seconds", None, 5.0, short, "x") * 44100 / 2048) == 64


def test_short_window_calibrate_runs_with_default_duration_and_logs_choice_and_estimate(tmp_path):
    config = short_window_config(tmp_path / "model_config.json")
    out = tmp_path / "cal"
    proc = _script("calibrate.py", "--model-config", str(config), "--synthetic-weights", "--num-prompts", "1",
                   "--steps", "2", "--buckets", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["sampler"]["seconds"] == 2.97 and meta["model"]["model"] == "custom"
    err = proc.stderr
    assert "calibration at 2.97 s of audio: this model's window (the default 5.0 s is longer; --seconds sets it)" in err
    assert f"building 'custom' from {config} (synthetic weights)" in err and "building sao-mini" not in err
    estimate = [line for line in err.replace("\r", "\n").splitlines() if "first step took" in line]
    assert len(estimate) == 1, err[-3000:]
    assert "2 steps (1 prompts x 2 steps) take about" in estimate[0]
    assert estimate[0].endswith("(shorter: --num-prompts, --steps, --device cuda)")
    assert not [n for n in THIRD_PARTY_NOISE if n in err], err[-3000:]
    assert proc.stdout.count("\n") == 1 and json.loads(proc.stdout)["out"] == str(out.resolve())


@pytest.mark.parametrize("script,args,expected", [
    ("calibrate.py", ["--seconds", "5"], "--seconds 5.0 is longer than this model's window of 2.97 s"),
    ("export.py", ["--scheme", "w8a8", "--report-seconds", "3"], "--report-seconds 3.0 is longer than this model's"),
    ("export.py", ["--scheme", "w8a8", "--report-prompts", "300"], "--report-prompts 300: only"),
    ("export.py", ["--scheme", "w8a8", "--calib-steps", "1"], "--calib-steps must be >= 2"),
    ("export.py", ["--scheme", "w8a8", "--calib-prompts", "400"], "--calib-prompts 400: the seed list has 261"),
])
def test_options_the_model_cannot_take_fail_before_work_on_their_own_line(tmp_path, script, args, expected):
    config = short_window_config(tmp_path / "model_config.json")
    out = tmp_path / "out"
    proc = _script(script, "--model-config", str(config), "--synthetic-weights", *args, "--out", str(out))
    assert expected in one_line_error(proc)
    # the error starts its own line (no progress bar or log record before it on that line) and ends the run
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert "calibrate[" not in proc.stderr and "export:" not in proc.stderr  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_config.json"]


# errors on their own line ----------------------------------------------------------------------------------

def test_error_raised_under_an_open_progress_bar_starts_its_own_line():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from tqdm import tqdm\n"
            "from engines.cli.common import run\nfrom engines.runtime.logs import setup_logging\n"
            "from exporter.errors import InputError\n"
            "def main():\n"
            "    setup_logging()\n"
            "    bar = tqdm(total=4, desc='calibrate[stats]')\n"
            "    bar.update(1)\n"
            "    raise InputError('--seconds 5.0 is longer than this model\\'s window of 2.97 s')\n"
            "run(main)\n") % str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[-1] == "error: --seconds 5.0 is longer than this model's window of 2.97 s"
    assert "calibrate[stats]:  25%" in lines[-2] and "error" not in lines[-2]


def test_generate_without_seconds_takes_a_duration_the_model_can_sample(mini_export, tmp_path):
    """--seconds is optional: 10 s (the model card's demo length), or the model's window where shorter (the
    short-window case: the slow first-run test below)."""
    import soundfile as sf

    export_dir, _ = mini_export
    wav = tmp_path / "a.wav"
    proc = _script("generate.py", "--export", str(export_dir), "--prompt", "rain", "--steps", "4", "--out", str(wav))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generating at 10.00 s of audio (default; --seconds sets it)" in proc.stderr
    assert sf.info(str(wav)).frames == 10 * 44100


# third-party noise -----------------------------------------------------------------------------------------

def test_default_generate_prints_no_third_party_warnings_and_v_shows_them(mini_export, tmp_path):
    export_dir, _ = mini_export
    args = ["--export", str(export_dir), "--prompt", "rain", "--seconds", "1", "--steps", "4",
            "--out", str(tmp_path / "a.wav")]
    proc = _script("generate.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [n for n in THIRD_PARTY_NOISE if n in proc.stderr], proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("WARNING")], proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the JSON summary alone (flash_attn's prints kept out)
    assert summary["device"] == "cpu"
    assert summary["providers"] == {g: ["CPUExecutionProvider"] for g in
                                    ("text_encoder", "conditioners", "vae_decoder", "dit")}
    # -v (setup_logging(verbose=True)) installs no filter: the same imports show the prints and the warning
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from engines.runtime.logs import setup_logging\n"
            "setup_logging(verbose=True)\n"
            "import stable_audio_tools.models.transformer, k_diffusion\n") % str(ROOT)
    verbose = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=_clean_env())
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert verbose.stdout.splitlines() == ["No module named 'flash_attn'",
                                           "flash_attn not installed, disabling Flash Attention"]
    assert "UserWarning: pkg_resources is deprecated" in verbose.stderr


def test_only_the_known_messages_from_their_own_modules_are_filtered():
    code = ("import sys, warnings; sys.path.insert(0, %r)\n"
            "from engines.runtime.logs import setup_logging\n"
            "setup_logging()\n"
            "msg = 'Should have ta>=t0 but got ta=0.29999998 and t0=0.3.'\n"
            "warnings.warn_explicit(msg, UserWarning, 'brownian_interval.py', 599, "
            "module='torchsde._brownian.brownian_interval')\n"
            "warnings.warn_explicit(msg, UserWarning, 'mine.py', 1, module='mine')\n"
            "warnings.warn('a real warning')\n") % str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    shown = [line for line in proc.stderr.splitlines() if line.startswith("WARNING py.warnings")]
    assert len(shown) == 2 and "mine.py:1" in shown[0] and "a real warning" in shown[1], proc.stderr


# ONNX Runtime providers ------------------------------------------------------------------------------------

def test_provider_selection_for_each_device(tmp_path):
    from engines.runtime.providers import CPU, CUDA_EP, TRT_EP, providers_for
    from exporter.errors import InputError

    assert providers_for("cpu") == [CPU]
    with pytest.raises(InputError, match=r"--device cuda: this onnxruntime build has no CUDAExecutionProvider "
                                         r"\(it has CPUExecutionProvider\); install onnxruntime-gpu"):
        providers_for("cuda", available=[CPU])
    gpu = [TRT_EP, CUDA_EP, CPU]
    assert providers_for("cuda:1", available=gpu, tensorrt=False) == [(CUDA_EP, {"device_id": 1}), CPU]
    trt = providers_for("cuda", int8=True, trt_cache=tmp_path, available=gpu, tensorrt=True)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [TRT_EP, CUDA_EP, CPU]
    assert trt[0][1] == {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path),
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path),
                         "trt_int8_enable": True}
    with pytest.raises(InputError, match="unknown --device 'gpu'"):
        providers_for("gpu")


def _has_cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda_ep(), reason="this onnxruntime has the CUDA provider")
@pytest.mark.parametrize("script", ["generate.py", "check.py", "bench.py"])
def test_device_cuda_without_the_provider_is_refused_on_one_line(mini_export, tmp_path, script):
    export_dir, _ = mini_export
    args = {"generate.py": ["--export", str(export_dir), "--prompt", "x", "--seconds", "1",
                            "--out", str(tmp_path / "x.wav")],
            "check.py": ["--export", str(export_dir)],
            "bench.py": ["--synthetic-weights", "--calibration", str(tmp_path / "none"), "--out", str(tmp_path / "b")]}
    proc = run_script(script, *args[script], "--device", "cuda")
    assert "--device cuda: this onnxruntime build has no CUDAExecutionProvider" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_generate_on_onnx_runtime_cuda_records_its_providers(mini_export, tmp_path):
    if not _has_cuda_ep():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider)")
    export_dir, _ = mini_export
    proc = run_script("generate.py", "--export", str(export_dir), "--prompt", "rain", "--seconds", "1", "--steps",
                      "10", "--device", "cuda", "--out", str(tmp_path / "a.wav"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    providers = json.loads(proc.stdout.strip().splitlines()[-1])["providers"]
    assert all("CUDAExecutionProvider" in p for p in providers.values()), providers


@pytest.mark.gpu
def test_calibration_on_cuda_matches_the_cpu_run(tmp_path):
    config = short_window_config(tmp_path / "model_config.json")
    runs = {}
    for device in ("cpu", "cuda"):
        proc = run_script("calibrate.py", "--model-config", str(config), "--synthetic-weights", "--num-prompts", "1",
                          "--steps", "4", "--buckets", "2", "--device", device, "--out", str(tmp_path / device))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[device] = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = [runs[d]["min_block_input_range_growth"] for d in ("cpu", "cuda")]
    assert growth[1] == pytest.approx(growth[0], rel=0.05)


# the whole first run on the short-window model -------------------------------------------------------------

@pytest.mark.slow
def test_short_window_w8a8_export_with_report_then_check_and_generate_with_defaults(tmp_path):
    """About 3 minutes on 2 cores: calibrate (2 prompts x 4 steps), export w8a8 with its report (1 prompt x 4
    steps, ModelOpt included), check.py and generate.py; every duration is the default."""
    config = short_window_config(tmp_path / "model_config.json")
    out = tmp_path / "w8a8"
    proc = _script("export.py", "--model-config", str(config), "--synthetic-weights", "--scheme", "w8a8",
                   "--calib-prompts", "2", "--calib-steps", "4", "--report-prompts", "1", "--report-steps", "4",
                   "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # ModelOpt's own prints went to the log, not stdout
    assert summary["report.mean_step_sqnr_db"] > 15
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seconds"] == 2.97 and report["providers"]["dit"] == ["CPUExecutionProvider"]
    assert "accuracy report at 2.97 s of audio: this model's window" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "accuracy report: first step took" in line]
    assert not [n for n in THIRD_PARTY_NOISE if n in proc.stderr], proc.stderr[-4000:]
    check = _script("check.py", "--export", str(out))
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    comparison = json.loads((out / "check_report.json").read_text())["comparisons"][0]
    assert comparison["providers"] == ["CPUExecutionProvider"] and comparison["device"] == "cpu"
    wav = tmp_path / "a.wav"
    gen = _script("generate.py", "--export", str(out), "--prompt", "a bell", "--steps", "8", "--out", str(wav))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "generating at 2.97 s of audio: this model's window" in gen.stderr
    import soundfile as sf

    assert sf.info(str(wav)).frames == round(2.97 * 44100)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_short_window_w4a16_export_picks_a_block_that_splits_each_layer(tmp_path, target):
    """The 192-wide condition tokens do not split into the default INT4 block of 128: those layers get block 64
    (logged before calibration), every layer still quantizes, and check.py passes with default options."""
    config = short_window_config(tmp_path / "model_config.json")
    out = tmp_path / "w4a16"
    proc = _script("export.py", "--model-config", str(config), "--synthetic-weights", "--scheme", "w4a16",
                   "--target", target, "--calib-prompts", "2", "--calib-steps", "4", "--report-prompts", "1",
                   "--report-steps", "4", "--no-modelopt", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "INT4 block 128 does not split K; using block 64" in proc.stderr
    assert proc.stderr.index("using block 64") < proc.stderr.index("calibrat")  # decided before any work
    layers = json.loads((out / "manifest.json").read_text())["quantization"]["layers"]
    assert all(r["quantized"] for r in layers.values())
    assert {r["block_size"] for r in layers.values()} == {64, 128}
    check = _script("check.py", "--export", str(out))
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
