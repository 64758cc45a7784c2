"""The runtime: prompt -> text encoder -> number conditioners -> sampler loop -> VAE decode -> WAV.

The sampler is the model family's own (exporter.models.family): for Stable Audio Open stable-audio-tools'
`sample_k` (k-diffusion's VDenoiser + dpmpp-3m-sde) for the v objective and `sample_rf` (pingpong) for
SAO Small's rf_denoiser, called the way `generate_diffusion_cond` calls them: same seed handling (noise
drawn right after `manual_seed`, later draws from the same generator), same schedule, same CFG batching.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_file, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    seconds: float
    steps: int = 100
    cfg_scale: float = 7.0
    seed: int = 0
    seconds_start: float = 0.0
    sampler_type: str = "dpmpp-3m-sde"
    sigma_min: float = 0.3
    sigma_max: float = 500.0
    rho: float = 1.0

    def validate(self, max_seconds: float) -> None:
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            raise InputError(f"--seconds must be positive, got {self.seconds}")
        if self.seconds > max_seconds + 1e-6:
            raise InputError(f"--seconds {self.seconds} is longer than this model's window of {max_seconds:.2f} s")
        if self.steps < 2:
            raise InputError(f"--steps must be at least 2, got {self.steps}")
        if not self.prompt.strip():
            raise InputError("--prompt is empty")


@dataclass
class Result:
    latents: torch.Tensor
    audio: torch.Tensor  # [B, 2, samples], trimmed to the requested length
    sample_rate: int
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Steps the diffusion sampler over one backend's DiT."""

    def __init__(self, backend: Any, manifest: dict[str, Any]) -> None:
        self.backend = backend
        self.manifest = manifest
        self.dims = manifest["dims"]
        layout = manifest["conditioning"]
        # stable-audio-tools' get_conditioning_inputs reads only these four attributes of its wrapper.
        self._ids = SimpleNamespace(cross_attn_cond_ids=layout["cross_attention_cond_ids"],
                                    global_cond_ids=layout["global_cond_ids"], input_concat_ids=[],
                                    prepend_cond_ids=[])

    @property
    def max_seconds(self) -> float:
        cfg = self.manifest["model_config"]
        return float(cfg.get("sample_size", 0)) / float(cfg["sample_rate"])

    def latent_length(self, seconds: float) -> int:
        return max(1, math.ceil(seconds * self.dims["sample_rate"] / self.dims["downsampling_ratio"]))

    @torch.no_grad()
    def generate(self, opts: GenerateOptions) -> Result:
        timings: dict[str, float] = {}
        latents = self.generate_latents(opts, timings)
        t0 = time.perf_counter()
        audio = self.backend.decode(latents.float())
        timings["decode_s"] = time.perf_counter() - t0
        samples = int(round(opts.seconds * self.dims["sample_rate"]))
        return Result(latents=latents, audio=audio[..., :samples], sample_rate=self.dims["sample_rate"],
                      timings=timings)

    @torch.no_grad()
    def generate_latents(self, opts: GenerateOptions, timings: dict[str, float] | None = None) -> torch.Tensor:
        """Conditioning and the sampler loop, without the VAE (calibration needs only this part)."""
        from stable_audio_tools.models.diffusion import ConditionedDiffusionModelWrapper

        from exporter.models.family import family_of

        opts.validate(self.max_seconds)
        timings = {} if timings is None else timings
        length = self.latent_length(opts.seconds)
        device = getattr(self.backend, "device", "cpu")
        torch.manual_seed(opts.seed)
        noise = torch.randn([1, self.dims["io_channels"], length], device=device)
        t0 = time.perf_counter()
        metadata = [{self.manifest["conditioning"]["text_id"]: opts.prompt, "seconds_start": opts.seconds_start,
                     "seconds_total": opts.seconds}]  # a conditioner the model lacks ignores its key
        tensors = self.backend.conditioning(metadata)
        inputs = ConditionedDiffusionModelWrapper.get_conditioning_inputs(self._ids, tensors)
        timings["conditioning_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler = {"sampler_type": opts.sampler_type, "steps": opts.steps, "cfg_scale": opts.cfg_scale,
                   "sigma_min": opts.sigma_min, "sigma_max": opts.sigma_max, "rho": opts.rho}
        config = self.manifest["model_config"]
        latents = family_of(config).sample(self.backend.dit, noise, sampler, inputs, config, device)
        timings["sampling_s"] = time.perf_counter() - t0
        return latents


def open_pipeline(export_dir: Path, backend: str = "onnxruntime", engines_dir: Path | None = None,
                  device: str = "cpu") -> Pipeline:
    """A pipeline over an export directory with the named backend (tensorrt: engines from `engines_dir`;
    onnxruntime: its sessions on `device`, see `engines.runtime.providers`)."""
    from engines.runtime.backends import OrtBackend, TorchBackend

    if (backend == "tensorrt") != (engines_dir is not None):
        raise InputError("--engines DIR (from scripts/build_engines.py) goes with --backend tensorrt, and only with it")
    manifest = read_manifest(Path(export_dir))
    if backend == "tensorrt":
        from engines.runtime.tensorrt import TrtBackend

        return Pipeline(TrtBackend(Path(engines_dir), Path(export_dir), manifest), manifest)
    if backend == "onnxruntime":
        return Pipeline(OrtBackend(Path(export_dir), manifest, device), manifest)
    if backend == "torch":
        from exporter.models import reload_from_identity

        return Pipeline(TorchBackend(reload_from_identity(manifest).wrapper, device), manifest)
    raise InputError(f"unknown backend '{backend}' (choose from: onnxruntime, torch, tensorrt)")


def write_wav(path: Path, audio: torch.Tensor, sample_rate: int) -> dict[str, float]:
    """Write [2, samples] audio as 16-bit PCM. Peaks above full scale are normalised down (as
    stable-audio-tools' own interface does), never clipped; returns level figures for the log."""
    import soundfile as sf

    audio = audio.detach().float().cpu()
    if not torch.isfinite(audio).all():
        raise RuntimeError("generated audio contains NaN or Inf")
    peak = float(audio.abs().max())
    scaled = audio / peak if peak > 1.0 else audio
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise InputError(f"output {path} must end in .wav")
    with atomic_file(path) as tmp:
        sf.write(str(tmp), scaled.T.numpy(), sample_rate, subtype="PCM_16", format="WAV")
    return {"peak": peak, "rms": float(scaled.pow(2).mean().sqrt()), "normalised": peak > 1.0}
