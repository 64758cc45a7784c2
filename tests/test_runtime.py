"""The runtime reproduces stable-audio-tools' own generate_diffusion_cond; ONNX Runtime tracks it."""
from __future__ import annotations

import pytest
import torch

from engines.runtime.backends import OrtBackend, TorchBackend
from engines.runtime.pipeline import GenerateOptions, Pipeline
from exporter.errors import InputError

PROMPT = "a dog barking in a large hall"


def _reference(mini, opts: GenerateOptions, samples: int) -> torch.Tensor:
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    cond = [{"prompt": opts.prompt, "seconds_start": 0, "seconds_total": opts.seconds}]
    return generate_diffusion_cond(mini.wrapper, steps=opts.steps, cfg_scale=opts.cfg_scale, conditioning=cond,
                                   sample_size=samples, seed=opts.seed, device="cpu", sampler_type="dpmpp-3m-sde",
                                   sigma_min=0.3, sigma_max=500, return_latents=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("steps,cfg", [(100, 7.0), (12, 1.0)])
def test_backends_match_generate_diffusion_cond(mini, mini_export, steps, cfg):
    export_dir, manifest = mini_export
    opts = GenerateOptions(prompt=PROMPT, seconds=1.0, steps=steps, cfg_scale=cfg, seed=11)
    torch_pipe = Pipeline(TorchBackend(mini.wrapper), manifest)
    length = torch_pipe.latent_length(opts.seconds)
    reference = _reference(mini, opts, length * manifest["dims"]["downsampling_ratio"])

    ours = torch_pipe.generate(opts)
    assert ours.latents.shape == reference.shape == (1, 64, length)
    assert torch.equal(ours.latents, reference), "PyTorch backend must reproduce generate_diffusion_cond exactly"

    ort_pipe = Pipeline(OrtBackend(export_dir, manifest), manifest)
    onnx = ort_pipe.generate(opts)
    assert ort_pipe.backend.dit.calls == steps
    assert _rel(onnx.latents, reference) <= 1e-3
    assert torch.isfinite(onnx.audio).all()
    assert onnx.audio.shape == (1, 2, 44100)
    assert _rel(onnx.audio, ours.audio) <= 1e-2


def test_conditioning_of_ort_backend_matches_stable_audio_tools(mini, mini_export):
    export_dir, manifest = mini_export
    meta = [{"prompt": PROMPT, "seconds_start": 3.0, "seconds_total": 30.0}]
    ref = TorchBackend(mini.wrapper).conditioning(meta)
    got = OrtBackend(export_dir, manifest).conditioning(meta)
    assert set(ref) == set(got) == {"prompt", "seconds_start", "seconds_total"}
    for key in ref:
        assert got[key][0].shape == ref[key][0].shape
        assert _rel(got[key][0], ref[key][0].float()) < 1e-5
        assert torch.equal(got[key][1].bool(), ref[key][1].bool())


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 1000.0, float("nan")])
def test_bad_durations_are_refused(mini_export, seconds):
    _, manifest = mini_export
    with pytest.raises(InputError):
        GenerateOptions(prompt="x", seconds=seconds).validate(max_seconds=11.9)
