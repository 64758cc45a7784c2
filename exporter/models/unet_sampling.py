"""The UNet family's sampler loop: the pipeline's own diffusers scheduler, stepped as `AudioLDMPipeline` does.

Nothing of the scheduler is re-implemented: the class named by the scheduler config's `_class_name` is built
with `from_config`, and the loop is the pipeline's (noise drawn with a seeded generator, times
`init_noise_sigma`; per step: CFG as one batch of 2, [unconditioned, conditioned], `scale_model_input`, one
UNet call, `uncond + cfg * (cond - uncond)`, `scheduler.step(...).prev_sample`). The UNet call is a
parameter, so the PyTorch model, ONNX Runtime and TensorRT all run under the same loop, and calibration
hooks it. Conditioning is a dict keyed by the UNet graph's input names (AudioLDM: `class_labels`; TANGO:
`encoder_hidden_states`, `encoder_attention_mask`).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from exporter.errors import InputError

UNetFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def make_scheduler(config: dict[str, Any]) -> Any:
    """The diffusers scheduler a pipeline ships with, from its scheduler_config.json."""
    import diffusers

    name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise InputError(f"scheduler {name!r} is not a diffusers scheduler class")
    return cls.from_config(config)


def latent_shape(dims: dict[str, Any], seconds: float) -> tuple[int, int, int]:
    """[C, frames / vae_scale, mel_bins / vae_scale] for `seconds` of audio; frames rounded up to a multiple
    of the VAE's scale as the pipeline rounds them, then the latent frames up to a multiple of the UNet's
    down-sampling (`latent_frame_multiple`): diffusers' UNet takes other lengths through an
    interpolating up-sampling path, the exported graph does not (the runtime trims the audio to `seconds`)."""
    scale = int(dims["vae_scale"])
    multiple = int(dims.get("latent_frame_multiple", 1))
    # mel frames to cover `seconds` (the pipeline's int() drops the last one where float division lands just
    # below an integer, 0.29 / 0.01 = 28.99..., and its WAV falls short of the length asked for)
    frames = math.ceil(round(seconds / dims["hop_seconds"], 6))
    frames = int(math.ceil(frames / scale)) * scale
    if dims["mel_bins"] % scale:
        raise InputError(f"{dims['mel_bins']} mel bins are not divisible by the VAE scale {scale}")
    latent = int(math.ceil(max(1, frames // scale) / multiple)) * multiple
    return int(dims["latent_channels"]), latent, dims["mel_bins"] // scale


def check_seconds(dims: dict[str, Any], seconds: float) -> None:
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"--seconds must be positive, got {seconds}")
    least = dims["hop_seconds"] * dims["vae_scale"]
    if seconds < least:
        raise InputError(f"--seconds {seconds} is shorter than this model's shortest output, {least:.3f} s")
    if seconds > dims["max_seconds"] + 1e-6:
        raise InputError(f"--seconds {seconds} is longer than this model's limit of {dims['max_seconds']:.2f} s")


def tokenize(tokenizer: Any, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask as both pipelines make them (padded and truncated to `length`)."""
    enc = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def torch_conditioning(model: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The UNet conditioning of `prompts` from the PyTorch text encoder (see `exporter.onnx.unet_graphs`)."""
    from exporter.models.unet_text import encode_text

    ids, mask = tokenize(model.tokenizer, prompts, model.text_length)
    with torch.no_grad():
        return encode_text(model.family, model.text_encoder, ids, mask)


def _batch(uncond: dict[str, torch.Tensor], cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


@torch.no_grad()
def sample_latents(dims: dict[str, Any], scheduler_config: dict[str, Any], unet: UNetFn,
                   cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None, steps: int,
                   cfg_scale: float, seconds: float, seed: int,
                   on_step: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """Latents [1, C, H, W] of one prompt: the pipeline's loop over `unet` (see the module docstring).
    `on_step(k, t)` runs before the k-th UNet call (calibration's bucket bookkeeping)."""
    check_seconds(dims, seconds)
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, *latent_shape(dims, seconds)), generator=generator) * scheduler.init_noise_sigma
    guided = cfg_scale > 1.0
    if guided and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditioned inputs")
    inputs = _batch(uncond, cond) if guided else cond
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}
    for k, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents] * 2) if guided else latents
        x = scheduler.scale_model_input(x, t)
        if on_step is not None:
            on_step(k, float(t))
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        pred = unet(x, tt, inputs)
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + cfg_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, **extra).prev_sample
    return latents
