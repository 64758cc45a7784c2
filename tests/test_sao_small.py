"""Stable Audio Open Small: the preset, its rectified-flow objective run by stable-audio-tools' own pingpong
sampler in every backend, calibration buckets in the t its DiT receives, and quantized exports for both
targets. A small SAO-Small-shaped config (same conditioning, objective, qk-norm, projected cross-attention
tokens, 128-wide heads) keeps it fast; the full size is the preset."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_script

from engines.runtime.backends import OrtBackend, TorchBackend
from engines.runtime.pipeline import GenerateOptions, Pipeline
from exporter.models import ModelSpec, family_of, load_model, presets

PROMPT = "warm arpeggios on house beats 120BPM"


def small_config() -> dict:
    config = presets.preset_config("stable-audio-open-small")
    config["model"]["diffusion"]["config"].update(embed_dim=256, depth=2, num_heads=2)  # heads of 128, as in SAO Small
    config["model"]["pretransform"] = presets.preset_config("sao-mini")["model"]["pretransform"]
    t5 = config["model"]["conditioning"]["configs"][0]["config"]
    t5.update(t5_model_name="t5-small", max_length=32)
    config["model"]["conditioning"]["cond_dim"] = 128
    config["model"]["diffusion"]["config"].update(cond_token_dim=128, global_cond_dim=128)
    config["quadit"] = {"synthetic_t5": {"num_layers": 1, "d_ff": 512}}
    return config


@pytest.fixture(scope="module")
def small():
    return load_model(ModelSpec(model="custom", config=small_config(), synthetic_weights=True, seed=2))


@pytest.fixture(scope="module")
def small_export(small, tmp_path_factory):
    from exporter.stages.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("sao-small") / "fp32"
    return out, export_model(small, out, ExportOptions(scheme="fp32"))


def test_preset_is_the_published_small_model():
    cfg = presets.preset_config("stable-audio-open-small")
    dit = cfg["model"]["diffusion"]["config"]
    assert (dit["embed_dim"], dit["depth"], dit["num_heads"], dit["attn_kwargs"]) == (1024, 16, 8, {"qk_norm": "ln"})
    assert cfg["model"]["diffusion"]["diffusion_objective"] == "rf_denoiser" and cfg["sample_size"] == 524288
    numbers = [c for c in cfg["model"]["conditioning"]["configs"] if c["type"] == "number"]
    assert numbers == [{"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 256}}]
    defaults = family_of(cfg).sampler_defaults(cfg)
    assert (defaults["sampler_type"], defaults["steps"], defaults["cfg_scale"]) == ("pingpong", 8, 1.0)


def test_model_config_file_of_sao_small_is_accepted(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({**presets.preset_config("stable-audio-open-small"), "training": {}}))
    assert presets.load_config_file(path)["model"]["diffusion"]["diffusion_objective"] == "rf_denoiser"
    bad = presets.preset_config("stable-audio-open-small")
    bad["model"]["diffusion"]["diffusion_objective"] = "edm"
    path.write_text(json.dumps(bad))
    from exporter.errors import InputError

    with pytest.raises(InputError, match="diffusion_objective 'edm'"):
        presets.load_config_file(path)


def test_manifest_carries_the_models_own_sampler(small_export):
    _, manifest = small_export
    assert manifest["sampler_defaults"]["objective"] == "rf_denoiser"
    assert manifest["sampler_defaults"]["sampler_type"] == "pingpong" and manifest["sampler_defaults"]["steps"] == 8
    assert manifest["conditioning"]["number_ids"] == ["seconds_total"]
    assert manifest["dims"]["cond_tokens"] == 32 + 1 and manifest["dims"]["global_dim"] == 128
    assert manifest["parity"]["max_rel_error"] <= 1e-4


def _options(manifest, seed: int = 5, seconds: float = 1.0) -> GenerateOptions:
    d = manifest["sampler_defaults"]
    return GenerateOptions(prompt=PROMPT, seconds=seconds, steps=d["steps"], cfg_scale=d["cfg_scale"], seed=seed,
                           sampler_type=d["sampler_type"], sigma_min=d["sigma_min"], sigma_max=d["sigma_max"],
                           rho=d["rho"])


def test_backends_reproduce_generate_diffusion_cond_with_pingpong(small, small_export):
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    export_dir, manifest = small_export
    opts = _options(manifest)
    torch_pipe = Pipeline(TorchBackend(small.wrapper), manifest)
    length = torch_pipe.latent_length(opts.seconds)
    reference = generate_diffusion_cond(small.wrapper, steps=8, cfg_scale=1.0,
                                        conditioning=[{"prompt": PROMPT, "seconds_total": opts.seconds}],
                                        sample_size=length * 2048, seed=opts.seed, device="cpu",
                                        sampler_type="pingpong", return_latents=True)
    ours = torch_pipe.generate_latents(opts)
    assert ours.shape == reference.shape == (1, 64, length)
    assert torch.equal(ours, reference), "PyTorch backend must reproduce generate_diffusion_cond exactly"
    ort_pipe = Pipeline(OrtBackend(export_dir, manifest), manifest)
    onnx = ort_pipe.generate_latents(opts)
    assert ort_pipe.backend.dit.calls == 8  # CFG 1: one batch-1 DiT call per step
    rel = float((onnx - reference).abs().max() / reference.abs().max())
    assert rel <= 1e-3, rel


def test_dit_timesteps_are_the_rectified_flow_schedule(small):
    family = small.family
    ts = family.dit_timesteps(small.config, family.sampler_defaults(small.config))
    # sample_rf: t = sigmoid(-logsnr) over logsnr from -6 to 2 in 8 steps, t[0] set to sigma_max = 1
    expected = [1.0] + [1 / (1 + math.exp(-6 + 8 * i / 8)) for i in range(1, 8)]
    assert np.allclose(ts, expected, atol=1e-6) and len(ts) == 8


def test_calibration_buckets_follow_the_t_the_dit_receives(small, tmp_path):
    from engines.calibrate.driver import CalibrationSettings, calibrate

    seen = []
    handle = small.wrapper.model.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1][0])))
    try:
        meta = calibrate(small, ["a kick drum"], CalibrationSettings(steps=8, buckets=2, seconds=1.0), tmp_path / "c",
                         prompt_source="test")
    finally:
        handle.remove()
    assert meta["sampler"]["sampler_type"] == "pingpong" and meta["sampler"]["cfg_scale"] == 1.0
    assert np.allclose(meta["buckets"]["step_t"], seen, atol=1e-7) and len(seen) == 8
    assert meta["buckets"]["step_bucket"] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_quantized_exports_for_both_targets(tmp_path, target):
    """w8a8 through the existing quantization stage (calibrating first) with --model-config (minutes)."""
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(small_config()))
    out = tmp_path / f"w8a8-{target}"
    proc = run_script("export.py", "--model", "custom", "--model-config", str(path), "--synthetic-weights",
                      "--scheme", "w8a8", "--target", target, "--calib-prompts", "2", "--calib-steps", "8",
                      "--report-prompts", "1", "--report-steps", "8", "--no-modelopt", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["dit"]["precision"] == "w8a8" and manifest["quantization"]["target"] == target
    assert manifest["sampler_defaults"]["sampler_type"] == "pingpong"
    assert manifest["quantization"]["calibration"]["artifact_sha256"]
    wav = tmp_path / f"{target}.wav"
    proc = run_script("generate.py", "--export", str(out), "--prompt", PROMPT, "--seconds", "1", "--out", str(wav))
    assert proc.returncode == 0, proc.stderr[-3000:]
