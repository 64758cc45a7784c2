"""The UNet family's runtime: prompt -> text encoder -> the pipeline's scheduler over the UNet -> VAE -> vocoder.

The loop is `exporter.models.unet_sampling.sample_latents` (the diffusers scheduler named in the export's
`scheduler_config.json`, CFG as a batch of 2, as `AudioLDMPipeline` steps it) for every backend; only the UNet
call and the text / decode graphs differ. The waveform is cut to the requested length as the pipeline cuts it
(`audio_length_in_s * sampling_rate` samples) and is mono at the vocoder's rate (16 kHz for AudioLDM/TANGO).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import InputError
from exporter.models.unet_sampling import check_seconds, sample_latents, tokenize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetGenerateOptions:
    prompt: str
    seconds: float
    steps: int
    cfg_scale: float
    seed: int = 0
    negative_prompt: str = ""

    def validate(self, dims: dict[str, Any]) -> None:
        check_seconds(dims, self.seconds)
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise InputError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if not self.prompt.strip():
            raise InputError("--prompt is empty")


@dataclass
class UNetResult:
    latents: torch.Tensor
    audio: torch.Tensor  # [B, 1, samples] mono, trimmed to the requested length
    sample_rate: int
    timings: dict[str, float] = field(default_factory=dict)


class TorchUNetBackend:
    """The reference: the PyTorch components (diffusers / transformers classes) themselves."""

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        from exporter.onnx.unet_graphs import graph_modules

        self.model = model
        self.modules = {k: m.to(device) for k, m in graph_modules(model).items()}
        self.device = device

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        from exporter.models.unet_text import text_outputs

        with torch.no_grad():
            out = self.modules["text_encoder"](ids.to(self.device), mask.to(self.device))
        return {k: v.cpu() for k, v in zip(text_outputs(self.model.family), out)}

    def unet(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.modules["unet"](x.to(self.device), t.to(self.device),
                                        *(v.to(self.device) for v in cond.values())).cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mel = self.modules["vae_decoder"](latents.to(self.device))
            return self.modules["vocoder"](mel.squeeze(1)).cpu()


class OrtUNetBackend:
    """The graphs of a UNet export in ONNX Runtime sessions on `device` (`engines.runtime.providers`)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], device: str = "cpu") -> None:
        from engines.runtime.backends import dit_session, session_providers
        from engines.runtime.providers import session

        graphs = manifest["graphs"]
        self.sessions = {name: session(Path(export_dir) / g["file"], device=device)
                         for name, g in graphs.items() if name != "unet"}
        self.sessions["unet"] = dit_session(Path(export_dir), graphs["unet"], device)
        self.providers = {name: session_providers(s) for name, s in self.sessions.items()}
        self.inputs = manifest["conditioning"]["inputs"]
        self.calls = 0

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.sessions["text_encoder"].run(self.inputs, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(self.inputs, out)}

    def unet(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        feeds = {"sample": x.float().numpy(), "timestep": t.float().numpy(),
                 **{k: v.float().numpy() for k, v in cond.items()}}
        return torch.from_numpy(self.sessions["unet"].run(["noise_pred"], feeds)[0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mel = self.sessions["vae_decoder"].run(["mel"], {"latents": latents.float().numpy()})[0]
        return torch.from_numpy(self.sessions["vocoder"].run(["waveform"], {"mel": mel[:, 0]})[0])


class UNetPipeline:
    """Steps the export's scheduler over one backend's UNet and decodes to a waveform."""

    def __init__(self, backend: Any, manifest: dict[str, Any], tokenizer: Any) -> None:
        self.backend, self.manifest, self.tokenizer = backend, manifest, tokenizer
        self.dims = manifest["dims"]

    @property
    def max_seconds(self) -> float:
        return float(self.dims["max_seconds"])

    def conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.backend.encode(*tokenize(self.tokenizer, prompts, int(self.dims["text_length"])))

    @torch.no_grad()
    def generate_latents(self, opts: UNetGenerateOptions, timings: dict[str, float] | None = None,
                         unet: Any = None) -> torch.Tensor:
        """Conditioning and the scheduler loop (`unet` replaces the backend's UNet call: calibration, reports)."""
        opts.validate(self.dims)
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        cond = self.conditioning([opts.prompt])
        uncond = self.conditioning([opts.negative_prompt]) if opts.cfg_scale > 1.0 else None
        timings["conditioning_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = sample_latents(self.dims, self.manifest["scheduler_config"], unet or self.backend.unet, cond, uncond,
                                 opts.steps, opts.cfg_scale, opts.seconds, opts.seed)
        timings["sampling_s"] = time.perf_counter() - t0
        return latents

    @torch.no_grad()
    def generate(self, opts: UNetGenerateOptions) -> UNetResult:
        timings: dict[str, float] = {}
        latents = self.generate_latents(opts, timings)
        t0 = time.perf_counter()
        audio = self.backend.decode(latents)
        timings["decode_s"] = time.perf_counter() - t0
        rate = int(self.dims["sample_rate"])
        samples = int(opts.seconds * rate)
        return UNetResult(latents=latents, audio=audio[:, None, :samples], sample_rate=rate, timings=timings)


def open_unet_pipeline(export_dir: Path, manifest: dict[str, Any], backend: str = "onnxruntime",
                       device: str = "cpu", engines_dir: Path | None = None) -> UNetPipeline:
    """A pipeline over a UNet export with the named backend (torch: the model rebuilt from the manifest's
    identity, refused when it differs from the exported one; tensorrt: the engines in `engines_dir`, built by
    scripts/build_engines.py, see `engines.runtime.unet_tensorrt`)."""
    from transformers import AutoTokenizer

    if (backend == "tensorrt") != (engines_dir is not None):
        raise InputError("--engines DIR (from scripts/build_engines.py) goes with --backend tensorrt, and only with it")
    if backend not in ("onnxruntime", "torch", "tensorrt"):
        raise InputError(f"unknown backend '{backend}' (choose from: onnxruntime, torch, tensorrt)")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(export_dir) / "tokenizer"), local_files_only=True)
    if backend == "onnxruntime":
        return UNetPipeline(OrtUNetBackend(Path(export_dir), manifest, device), manifest, tokenizer)
    if backend == "torch":
        from exporter.models.unet_audio import reload_from_identity

        return UNetPipeline(TorchUNetBackend(reload_from_identity(manifest), device), manifest, tokenizer)
    from engines.runtime.unet_tensorrt import TrtUNetBackend

    return UNetPipeline(TrtUNetBackend(Path(engines_dir), Path(export_dir), manifest), manifest, tokenizer)
