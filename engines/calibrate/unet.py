"""Calibration of a UNet-family model (AudioLDM, TANGO): timestep-bucketed input statistics of its Conv2d and
Linear layers, over the pipeline's own scheduler loop (`exporter.models.unet_sampling.sample_latents`).

A Conv2d's input is [B, C, H, W]; the collector observes it with channels moved last, so `ch_absmax` is per
input channel for both kinds of layer (what smoothing and per-channel weights need). The buckets split the
scheduler's timesteps into equal numbers of steps (`BucketSpec.by_step` over the `t` the UNet receives:
0..999 for the DDPM-family schedulers). Prompt i is sampled with seed `seed + i`, as the runtime does.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calibration.collector import ActivationCollector, BucketSpec
from calibration.observers import outlier_fraction, range_growth
from calibration.selection import SampleRecorder
from exporter.errors import InputError
from exporter.models.unet_layers import quantizable_unet_layers
from exporter.models.unet_sampling import make_scheduler, sample_latents, torch_conditioning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetCalibrationSettings:
    version: int = 1
    steps: int = 10
    buckets: int = 3
    seconds: float = 2.56
    cfg_scale: float | None = None  # None: the pipeline's own default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 2 or not 1 <= self.buckets <= self.steps:
            raise InputError(f"need calibration steps >= 2 and 1 <= buckets <= steps (got {self.steps}, {self.buckets})")


@dataclass
class UNetCalibration:
    """What the UNet passes read: bucket edges in the UNet's `t`, and per layer its [K, C] channel abs-max.
    With `record_samples`, also each (prompt, step) sample's channel maxima (`samples`, a SampleRecorder) and
    the full run's tensors (`full`), from which `from_samples` rebuilds the statistics of a chosen subset."""

    edges: tuple[float, ...]
    ch_absmax: dict[str, np.ndarray]
    summary: dict[str, Any]
    samples: SampleRecorder | None = None
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    # E[p p^T] per layer over im2col'd patches (engines.calibrate.unet_moments), when asked for
    xtx: dict[str, np.ndarray] = field(default_factory=dict)

    def from_samples(self, chosen: Sequence[tuple[int, int]]) -> "UNetCalibration":
        """The statistics a calibration set of only the `chosen` (prompt, step) samples would have given; a bucket
        no chosen sample falls in takes the set's maxima over all buckets (what a deployment would be left with)."""
        if self.samples is None:
            raise ValueError("calibrate with record_samples=True to select samples")
        k = len(self.edges) - 1
        out: dict[str, np.ndarray] = {}
        for name in self.ch_absmax:
            rows = [[] for _ in range(k)]
            for key in chosen:
                rows[self.samples.sample_bucket[key]].append(self.samples.rows[key][name])
            every = torch.stack([r for b in rows for r in b]).amax(0)
            out[name] = torch.stack([torch.stack(b).amax(0) if b else every for b in rows]).double().numpy()
        return UNetCalibration(self.edges, out, {**self.summary, "selected_samples": len(chosen)})


def schedule_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[float]:
    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def _layers(unet: nn.Module) -> dict[str, nn.Module]:
    layers = dict(quantizable_unet_layers(unet))
    if not layers:
        raise InputError("the UNet has no Conv2d/Linear layer to quantize")
    return layers


@torch.no_grad()
def calibrate_unet(model: Any, prompts: Sequence[str], settings: UNetCalibrationSettings,
                   record_samples: bool = False, second_moments: bool = False) -> UNetCalibration:
    """Run the PyTorch UNet over `prompts` with the collector hooked (see the module docstring);
    `second_moments` also sums each layer's E[p p^T] (GPTQ rounding, --auto-precision)."""
    from contextlib import nullcontext

    from engines.calibrate.unet_moments import MOMENT_PROMPTS, SecondMoments

    if not prompts:
        raise InputError("calibration needs at least one prompt")
    layers = _layers(model.unet)
    ts = schedule_timesteps(model.scheduler_config, settings.steps)
    buckets = BucketSpec.by_step(ts, settings.buckets)
    cfg = float(model.defaults.get("cfg_scale", 1.0) if settings.cfg_scale is None else settings.cfg_scale)
    convs = [name for name, m in layers.items() if isinstance(m, nn.Conv2d)]
    collector = ActivationCollector(layers, buckets, settings.steps, channels_first=convs)

    def unet(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        from exporter.models.unet_text import unet_kwargs

        return model.unet(x, t, **unet_kwargs(model.family, cond)).sample

    uncond = torch_conditioning(model, [""]) if cfg > 1.0 else None
    recorder = SampleRecorder(list(layers), buckets, collector) if record_samples else None
    moments = SecondMoments(layers) if second_moments else None
    with collector, (moments if moments is not None else nullcontext()):
        for i, prompt in enumerate(tqdm(list(prompts), desc="calibrate", unit="prompt")):
            if moments is not None:
                moments.active = i < MOMENT_PROMPTS
            sample_latents(model.dims(), model.scheduler_config, unet, torch_conditioning(model, [prompt]), uncond,
                           settings.steps, cfg, settings.seconds, settings.seed + i,
                           on_step=lambda k, t, i=i: collector.begin_step(k, t, prompt=i))
    tensors = collector.tensors(list(layers))
    ch_absmax = {name: tensors[f"{name}.ch_absmax"].double().numpy() for name in layers}
    growth = [range_growth(tensors[f"{name}.step_absmax"]) for name in layers]
    outliers = [outlier_fraction(tensors[f"{name}.ch_absmax"].amax(0)) for name in layers]
    summary = {"settings": asdict(settings), "prompts": len(prompts), "layers": len(layers), "convs": len(convs),
               "edges": list(buckets.edges), "range_growth_median": float(np.median(growth)),
               "outlier_fraction_median": float(np.median(outliers)),
               "layers_with_outliers": int(sum(o >= 0.01 for o in outliers))}
    log.info("calibrated %d UNet layers (%d Conv2d) over %d prompts x %d steps, %d buckets; median range growth "
             "%.2fx, %d layers with >= 1%% outlier channels", len(layers), len(convs), len(prompts), settings.steps,
             settings.buckets, summary["range_growth_median"], summary["layers_with_outliers"])
    if recorder is not None:
        recorder.detach()
    return UNetCalibration(tuple(buckets.edges), ch_absmax, summary, recorder, tensors if record_samples else {},
                           moments.result() if moments is not None else {})
