"""Timestep-bucketed activation statistics, collected through forward-pre hooks on any `nn.Module`.

The caller owns the forward loop (a sampler) and calls `begin_step(step, t)` before each denoiser call;
the collector maps `t` to a bucket with `BucketSpec` and reduces every hooked input on the spot:

- per bucket, per input channel: abs-max                      -> `<layer>.ch_absmax` [K, C]
- per bucket: a log2-spaced histogram of |x| (exact integer counts, so merging ranks or resumed runs
  is a sum and bit-identical regardless of order)             -> `<layer>.hist` [K, NB] int64
- per sampler step: per-tensor abs-max (for range growth)     -> `<layer>.step_absmax` [S]

Percentiles of |x| per bucket come from the histogram at the end (`<layer>.pctl` [K, P]); their
resolution is one histogram bin (2^(1/16) = 4.4% by default), always clipped to the exact abs-max.
Memory is fixed by (layers, K, C, NB, S), not by the number of prompts or steps run.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class BucketSpec:
    """K timestep buckets as K+1 descending edges in the `t` the denoiser receives.

    Bucket k holds edges[k] >= t > edges[k+1]; bucket 0 is the noisiest. Any later stage maps a `t` to
    its bucket as the number of interior edges that are >= t, without knowing the schedule.
    """

    edges: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or any(a <= b for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"bucket edges must be >= 2 strictly descending values, got {self.edges}")

    @property
    def count(self) -> int:
        return len(self.edges) - 1

    def bucket_of(self, t: float) -> int:
        interior = [-e for e in self.edges[1:-1]]
        return bisect.bisect_right(interior, -t)

    @classmethod
    def by_step(cls, ts: Sequence[float], count: int) -> "BucketSpec":
        """Equal numbers of sampler steps per bucket; edges halfway between neighbouring steps' t."""
        ts = list(ts)
        if not 1 <= count <= len(ts):
            raise ValueError(f"cannot split {len(ts)} steps into {count} buckets")
        bounds = [round(i * len(ts) / count) for i in range(count + 1)]
        inner = [(ts[b - 1] + ts[b]) / 2 for b in bounds[1:-1]]
        return cls(tuple([max(1.0, ts[0]) + 1e-6] + inner + [min(0.0, ts[-1]) - 1e-6]))

    @classmethod
    def by_t(cls, ts: Sequence[float], count: int) -> "BucketSpec":
        """Equal-width intervals of t between the schedule's first and last step."""
        hi, lo = max(ts), min(ts)
        inner = [hi - (hi - lo) * i / count for i in range(1, count)]
        return cls(tuple([max(1.0, hi) + 1e-6] + inner + [min(0.0, lo) - 1e-6]))


@dataclass(frozen=True)
class ObserverSettings:
    percentiles: tuple[float, ...] = (99.0, 99.9, 99.99)
    bins_per_octave: int = 16
    min_exp: int = -24  # |x| below 2^-24 (FP16's smallest subnormal) counts in the first bin
    max_exp: int = 24

    @property
    def num_bins(self) -> int:
        return (self.max_exp - self.min_exp) * self.bins_per_octave

    def to_json(self) -> dict:
        return asdict(self)


class ActivationCollector:
    """Hooks `modules` (name -> module) and accumulates the statistics in the module docstring."""

    def __init__(self, modules: Mapping[str, nn.Module], buckets: BucketSpec, num_steps: int,
                 settings: ObserverSettings = ObserverSettings()) -> None:
        self.modules = dict(modules)
        self.buckets = buckets
        self.num_steps = num_steps
        self.settings = settings
        self.state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.prompt = 0
        self.bucket = 0
        self.active = True
        self.sample_hook = None  # optional callable(name, channel_absmax) for per-sample recording
        self._handles: list = []

    def begin_step(self, step: int, t: float, active: bool = True, prompt: int = 0) -> None:
        self.prompt = prompt
        self.step = min(step, self.num_steps - 1)
        self.bucket = self.buckets.bucket_of(t)
        self.active = active

    def _ensure(self, name: str, channels: int) -> None:
        if f"{name}.ch_absmax" not in self.state:
            k = self.buckets.count
            self.state[f"{name}.ch_absmax"] = torch.zeros(k, channels)
            self.state[f"{name}.hist"] = torch.zeros(k, self.settings.num_bins, dtype=torch.int64)
            self.state[f"{name}.step_absmax"] = torch.zeros(self.num_steps)

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        flat = x.reshape(-1, x.shape[-1]).abs()
        self._ensure(name, flat.shape[1])
        channel_max = flat.amax(dim=0).cpu()
        row = self.state[f"{name}.ch_absmax"][self.bucket]
        torch.maximum(row, channel_max, out=row)
        step_max = self.state[f"{name}.step_absmax"]
        step_max[self.step] = max(float(step_max[self.step]), float(channel_max.max()))
        s = self.settings
        idx = ((torch.log2(flat.clamp_min(2.0 ** s.min_exp)) - s.min_exp) * s.bins_per_octave).floor()
        counts = torch.bincount(idx.clamp(0, s.num_bins - 1).long().flatten(), minlength=s.num_bins)
        self.state[f"{name}.hist"][self.bucket] += counts.cpu()
        if self.sample_hook is not None:
            self.sample_hook(name, channel_max)

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if self.active:
                self.observe(name, args[0])

        return hook

    def __enter__(self) -> "ActivationCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # merging (resume, data parallel) ---------------------------------------------------------------
    def merge_state(self, other: Mapping[str, torch.Tensor]) -> None:
        for key, value in other.items():
            if key not in self.state:
                self.state[key] = value.clone()
            elif key.endswith(".hist"):
                self.state[key] += value
            else:
                torch.maximum(self.state[key], value, out=self.state[key])

    def all_reduce(self, layer_order: Iterable[str]) -> None:
        """Merge across torch.distributed ranks: MAX for maxima, SUM for histogram counts. Every rank
        must have observed every layer (same model, at least one prompt per rank)."""
        import torch.distributed as dist

        for name in layer_order:
            for suffix, op in ((".ch_absmax", dist.ReduceOp.MAX), (".step_absmax", dist.ReduceOp.MAX),
                               (".hist", dist.ReduceOp.SUM)):
                dist.all_reduce(self.state[name + suffix], op=op)

    # results ---------------------------------------------------------------------------------------
    def percentiles(self, name: str) -> torch.Tensor:
        """[K, P] |x| percentiles from the histogram (upper bin edge), clipped to the bucket abs-max."""
        s = self.settings
        hist = self.state[f"{name}.hist"].double()
        absmax = self.state[f"{name}.ch_absmax"].amax(dim=1)
        cum = hist.cumsum(dim=1)
        total = cum[:, -1:].clamp_min(1)
        out = torch.zeros(hist.shape[0], len(s.percentiles))
        for j, p in enumerate(s.percentiles):
            first = (cum >= total * (p / 100.0)).float().argmax(dim=1)
            edge = torch.pow(2.0, s.min_exp + (first.double() + 1) / s.bins_per_octave).float()
            out[:, j] = torch.minimum(edge, absmax)
        return out

    def tensors(self, layer_order: Sequence[str]) -> dict[str, torch.Tensor]:
        """The artifact tensors in the documented layout, for every layer in `layer_order`."""
        missing = [n for n in layer_order if f"{n}.ch_absmax" not in self.state]
        if missing:
            raise RuntimeError(f"no activations were observed for {len(missing)} layers, e.g. {missing[:2]}")
        out: dict[str, torch.Tensor] = {}
        for name in layer_order:
            ch = self.state[f"{name}.ch_absmax"]
            out[f"{name}.ch_absmax"] = ch.contiguous()
            out[f"{name}.absmax"] = ch.amax(dim=1).contiguous()
            out[f"{name}.pctl"] = self.percentiles(name).contiguous()
            out[f"{name}.hist"] = self.state[f"{name}.hist"].contiguous()
            out[f"{name}.step_absmax"] = self.state[f"{name}.step_absmax"].contiguous()
        return out


def schedule_t(sigmas: Sequence[float]) -> list[float]:
    """The `t` a v-denoiser receives for each sigma (k-diffusion's VDenoiser: atan(sigma) * 2 / pi)."""
    return [math.atan(s) * 2 / math.pi for s in sigmas]
