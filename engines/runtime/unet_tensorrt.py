"""TensorRT engines for a UNet-family export (AudioLDM, TANGO): build plan, optimisation profiles, runtime backend.

The build itself is `engines.runtime.tensorrt.build_engines` (Polygraphy, strongly typed, engines.json), which
asks this module for the plan and the profiles when the manifest says `family: "unet"`. Four engines: the text
encoder, the UNet, the VAE decoder (latents -> mel) and the vocoder (mel -> waveform); no ONNX Runtime graph stays.

Profiles, all from the manifest's `dims` (one profile per graph):
- UNet: one profile over batch 1..2 tuned for 2 (the pipeline runs CFG as one batch of [uncond, cond]; batch 1
  is cfg_scale <= 1, which AudioLDM and TANGO rarely use (defaults 2.5 and 3): it runs on kernels tuned for 2,
  where a profile per batch, the DiT's choice, would double the build for it),
  latent frames from `--min-seconds` to `--max-seconds` (default: the model's `max_seconds`), each rounded up as the
  runtime rounds them (`exporter.models.unet_sampling.latent_shape`: whole VAE frames, then a multiple of
  `latent_frame_multiple`, the UNet's down-sampling), tuned for `--opt-seconds` (default: the model's
  `default_seconds`, the length `generate` makes when not told). Channels and mel width are static.
- text encoder: batch 1 (tuned) to 2 at the tokenizer's fixed `text_length`; the runtime encodes the prompt and the
  negative prompt one at a time.
- VAE decoder and vocoder: batch 1 (the runtime decodes one latent at a time: their activations are the largest)
  over the same frames; the vocoder's mel frames are the latent frames x `vae_scale`.
TensorRT refuses shapes outside [min, max] at run time (`EngineRunner.profile_for` says so in one line).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from exporter.errors import InputError

log = logging.getLogger(__name__)

UNET_ENGINE_GRAPHS = ("text_encoder", "unet", "vae_decoder", "vocoder")
Shape = tuple[int, ...]
ProfileSpec = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def is_unet(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("family") == "unet"


def frame_range(manifest: Mapping[str, Any], settings: Any) -> tuple[int, int, int]:
    """(min, opt, max) latent frames of the UNet for `settings` (a `BuildSettings`): seconds rounded up as the
    runtime rounds them, so every length the runtime makes for seconds in [min, max] is inside the profile."""
    from exporter.models.unet_sampling import latent_shape

    dims = manifest["dims"]
    window, least = float(dims["max_seconds"]), float(dims["hop_seconds"]) * int(dims["vae_scale"])
    top = settings.max_seconds if settings.max_seconds is not None else window
    opt = settings.opt_seconds if settings.opt_seconds is not None else \
        min(max(float(dims["default_seconds"]), settings.min_seconds), top)
    for flag, seconds in (("max", top), ("opt", opt), ("min", settings.min_seconds)):
        if seconds > window + 1e-6 or seconds > top + 1e-6:
            raise InputError(f"--{flag}-seconds {seconds:g} is longer than the maximum ({top:.2f} s) or this model's "
                             f"limit ({window:.2f} s)")
        if seconds < least:
            raise InputError(f"--{flag}-seconds {seconds:g} is shorter than this model's shortest output, {least:.3f} s")
    return tuple(latent_shape(dict(dims), s)[1] for s in (settings.min_seconds, opt, top))  # type: ignore[return-value]


def unet_graph_profiles(manifest: Mapping[str, Any], graph: str, settings: Any) -> list[ProfileSpec]:
    """The optimisation profile of one graph of a UNet export (see the module docstring)."""
    dims = manifest["dims"]
    c, scale, mel_bins, text = (int(dims[k]) for k in ("latent_channels", "vae_scale", "mel_bins", "text_length"))
    frames = frame_range(manifest, settings)
    width = mel_bins // scale
    if graph == "unet":
        batches = (min(settings.batch_sizes), max(settings.batch_sizes), max(settings.batch_sizes))
        per_input = {"sample": lambda b, n: (b, c, n, width), "timestep": lambda b, n: (b,),
                     "class_labels": lambda b, n: (b, int(dims["text_embed_dim"])),
                     "encoder_hidden_states": lambda b, n: (b, text, int(dims["text_hidden_dim"])),
                     "encoder_attention_mask": lambda b, n: (b, text)}
        inputs = manifest["graphs"]["unet"]["inputs"]
        if unknown := [n for n in inputs if n not in per_input]:
            raise InputError(f"unet graph input(s) {', '.join(unknown)}: no TensorRT profile for them")
        return [{n: tuple(per_input[n](b, f) for b, f in zip(batches, frames)) for n in inputs}]
    if graph == "text_encoder":
        span = ((1, text), (1, text), (max(settings.batch_sizes), text))
        return [{"input_ids": span, "attention_mask": span}]
    if graph == "vae_decoder":
        return [{"latents": tuple((1, c, n, width) for n in frames)}]
    if graph == "vocoder":
        return [{"mel": tuple((1, n * scale, mel_bins) for n in frames)}]
    raise InputError(f"no TensorRT profile for graph '{graph}' of a UNet export")


def unet_build_plan(export_dir: Path, manifest: Mapping[str, Any]) -> list[Any]:
    """One engine per graph: text encoder, UNet, VAE decoder, vocoder (`BuildItem`s)."""
    from engines.runtime.tensorrt import BuildItem

    graphs = manifest["graphs"]
    if missing := [g for g in UNET_ENGINE_GRAPHS if g not in graphs]:
        raise InputError(f"UNet export {export_dir} has no {', '.join(missing)} graph")
    items = [BuildItem(g, g, graphs[g]["file"]) for g in UNET_ENGINE_GRAPHS]
    for item in items:
        if not (Path(export_dir) / item.onnx).is_file():
            raise InputError(f"export {export_dir} is incomplete: {item.onnx} is missing")
    return items


class TrtUNetBackend:
    """The four engines of a UNet export behind `OrtUNetBackend`'s interface (encode, unet, decode), each an
    `EngineRunner` loaded by `load_engine` after `check_engine_metadata` (the DiT's helpers). The scheduler loop
    stays on the CPU (same noise per seed as the other backends); each call copies its inputs to the GPU and its
    outputs back (a UNet call at 5 s of audio moves about 130 kB each way)."""

    name = "tensorrt"

    def __init__(self, engines_dir: Path, export_dir: Path, manifest: Mapping[str, Any],
                 cuda_graph: bool = False) -> None:
        from engines.runtime.tensorrt import (
            ENGINES_JSON,
            EngineRunner,
            check_engine_metadata,
            load_engine,
            tensorrt_unavailable,
        )

        if reason := tensorrt_unavailable():
            raise InputError(reason)
        engines_dir = Path(engines_dir)
        self.meta = check_engine_metadata(engines_dir / ENGINES_JSON, Path(export_dir))
        entries = self.meta["engines"]
        if missing := [g for g in UNET_ENGINE_GRAPHS if g not in entries]:
            raise InputError(f"{engines_dir} has no {', '.join(missing)} engine (built from another export?): "
                             "rebuild with scripts/build_engines.py")
        self.runners = {g: EngineRunner(load_engine(engines_dir / entries[g]["engine"]), g, cuda_graph)
                        for g in UNET_ENGINE_GRAPHS}
        self.inputs = list(manifest["conditioning"]["inputs"])
        self.calls = 0
        log.info("TensorRT UNet backend: %d engines, %s", len(self.runners), self.meta["gpu"]["name"])

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.runners["text_encoder"]({"input_ids": ids.long(), "attention_mask": mask.long()})
        return {k: out[k].float() for k in self.inputs}

    def unet(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        feeds = {"sample": x.float(), "timestep": t.float(), **{k: v.float() for k, v in cond.items()}}
        return self.runners["unet"](feeds)["noise_pred"].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        waves = []
        for item in latents:  # batch 1 per engine call (the profiles'), as the DiT's VAE
            mel = self.runners["vae_decoder"]({"latents": item[None].float()})["mel"]
            waves.append(self.runners["vocoder"]({"mel": mel[:, 0].float()})["waveform"].float())
        return torch.cat(waves)
