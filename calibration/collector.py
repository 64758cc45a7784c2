"""Timestep-bucketed activation statistics, collected through forward-pre hooks on any `nn.Module`.

The caller owns the forward loop (a sampler) and calls `begin_step(step, t)` before each denoiser call;
the collector maps `t` to a bucket with `BucketSpec` and reduces every hooked input on the spot:

- per bucket, per input channel: abs-max                      -> `<layer>.ch_absmax` [K, C]
- per bucket: a log2-spaced histogram of |x| (exact integer counts, so merging ranks or resumed runs
  is a sum and bit-identical regardless of order)             -> `<layer>.hist` [K, NB] int64
- per sampler step: per-tensor abs-max (for range growth)     -> `<layer>.step_absmax` [S]
- optionally, pooled over buckets: the input second moment E[x x^T] (what error-minimising weight
  rounding needs: a Linear's output error from a weight change D is tr(D E[x x^T] D^T))
                                                              -> `<layer>.xtx` [C, C], `<layer>.xtx_rows`
- optionally, per bucket: a uniform reservoir sample of R input rows, bfloat16 (what searched activation scales and
  loss-driven smoothing measure output error on)             -> `<layer>.rows` [K, R, C], `<layer>.rows_seen` [K]

Percentiles of |x| per bucket come from the histogram at the end (`<layer>.pctl` [K, P]); their
resolution is one histogram bin (2^(1/16) = 4.4% by default), always clipped to the exact abs-max.
Memory is fixed by (layers, K, C, NB, S, R), not by the number of prompts or steps run. The second moments
are accumulated in float32 (float64 would double a full-size run's memory: 168 layers, up to 6144 wide) and
skipped for layers wider than `max_moment_channels`; the reservoir uses a seeded generator, so a rerun in
the same order is bit-identical.
"""
from __future__ import annotations

import bisect
import math
import zlib
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
    second_moments: bool = False
    max_moment_channels: int = 4096
    sample_rows: int = 0  # R per bucket; 0: no reservoir

    def __post_init__(self) -> None:
        if self.sample_rows < 0 or self.max_moment_channels < 1:
            raise ValueError(f"sample_rows must be >= 0 and max_moment_channels >= 1, got {self.sample_rows}, "
                             f"{self.max_moment_channels}")

    @property
    def num_bins(self) -> int:
        return (self.max_exp - self.min_exp) * self.bins_per_octave

    def to_json(self) -> dict:
        return asdict(self)


class ActivationCollector:
    """Hooks `modules` (name -> module) and accumulates the statistics in the module docstring."""

    def __init__(self, modules: Mapping[str, nn.Module], buckets: BucketSpec, num_steps: int,
                 settings: ObserverSettings = ObserverSettings(), channels_first: Iterable[str] = ()) -> None:
        self.modules = dict(modules)
        # modules whose input puts channels on dim 1 ([B, C, H, W]: a Conv2d); their statistics are per
        # input channel as for a Linear's last dim, so they are observed with channels moved last
        self.channels_first = frozenset(channels_first)
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
            s = self.settings
            if s.second_moments and channels <= s.max_moment_channels:
                self.state[f"{name}.xtx"] = torch.zeros(channels, channels)
                self.state[f"{name}.xtx_rows"] = torch.zeros(1, dtype=torch.int64)
            if s.sample_rows:
                # bfloat16: FP32's range (massive activations stay finite), 2^-9 rounding, which is far below
                # the INT8 step the rows are used to measure; half the memory of float32 at full size
                self.state[f"{name}.rows"] = torch.zeros(k, s.sample_rows, channels, dtype=torch.bfloat16)
                self.state[f"{name}.rows_seen"] = torch.zeros(k, dtype=torch.int64)

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
        signed = x.reshape(-1, x.shape[-1])
        if f"{name}.xtx" in self.state:
            xs = signed.cpu()
            self.state[f"{name}.xtx"].addmm_(xs.T, xs)
            self.state[f"{name}.xtx_rows"] += xs.shape[0]
        if f"{name}.rows" in self.state:
            self._reservoir(name, signed.cpu())
        if self.sample_hook is not None:
            self.sample_hook(name, channel_max)

    def _reservoir(self, name: str, rows: torch.Tensor) -> None:
        """Algorithm R over this bucket's rows: after n rows, each is in the sample with probability R/n."""
        store, seen = self.state[f"{name}.rows"][self.bucket], self.state[f"{name}.rows_seen"]
        n0, cap, m = int(seen[self.bucket]), store.shape[0], rows.shape[0]
        fill = max(0, min(cap - n0, m))
        if fill:
            store[n0:n0 + fill] = rows[:fill].to(store.dtype)
        if fill < m:
            index = torch.arange(n0 + fill, n0 + m, dtype=torch.float64)  # 0-based global index of each row
            # seeded by (layer, bucket, rows seen): a resumed run draws exactly what an uninterrupted one does
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{self.bucket}/{n0}".encode()))
            draw = (torch.rand(m - fill, generator=gen, dtype=torch.float64) * (index + 1)).long()
            keep = draw < cap
            store[draw[keep]] = rows[fill:][keep].to(store.dtype)
        seen[self.bucket] += m

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if self.active:
                x = args[0]
                self.observe(name, x.movedim(1, -1) if name in self.channels_first else x)

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
            elif key.endswith((".hist", ".xtx", ".xtx_rows", ".rows_seen")):
                if key.endswith(".rows_seen"):
                    continue  # merged with its rows below
                self.state[key] += value
            elif key.endswith(".rows"):
                base = key[:-len(".rows")]
                self.state[key], self.state[f"{base}.rows_seen"] = merge_reservoirs(
                    self.state[key], self.state[f"{base}.rows_seen"], value, other[f"{base}.rows_seen"])
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
            if f"{name}.xtx" in self.state:
                dist.all_reduce(self.state[f"{name}.xtx"], op=dist.ReduceOp.SUM)
                dist.all_reduce(self.state[f"{name}.xtx_rows"], op=dist.ReduceOp.SUM)
            if f"{name}.rows" in self.state:
                rows = [torch.zeros_like(self.state[f"{name}.rows"]) for _ in range(dist.get_world_size())]
                seen = [torch.zeros_like(self.state[f"{name}.rows_seen"]) for _ in range(dist.get_world_size())]
                dist.all_gather(rows, self.state[f"{name}.rows"])
                dist.all_gather(seen, self.state[f"{name}.rows_seen"])
                merged, total = rows[0], seen[0]
                for r, n in zip(rows[1:], seen[1:]):
                    merged, total = merge_reservoirs(merged, total, r, n)
                self.state[f"{name}.rows"], self.state[f"{name}.rows_seen"] = merged, total

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
            if f"{name}.xtx" in self.state:
                rows = self.state[f"{name}.xtx_rows"].clamp_min(1)
                out[f"{name}.xtx"] = (self.state[f"{name}.xtx"] / rows.float()).contiguous()
                out[f"{name}.xtx_rows"] = self.state[f"{name}.xtx_rows"].contiguous()
            if f"{name}.rows" in self.state:
                out[f"{name}.rows"] = self.state[f"{name}.rows"].contiguous()
                out[f"{name}.rows_seen"] = self.state[f"{name}.rows_seen"].contiguous()
        return out


def merge_reservoirs(a: torch.Tensor, a_seen: torch.Tensor, b: torch.Tensor, b_seen: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-bucket reservoirs [K, R, C] of runs that saw a_seen / b_seen rows: per bucket, a share of R
    from each in proportion to the rows it saw (each reservoir is a uniform sample of its own rows)."""
    out = a.clone()
    for k in range(a.shape[0]):
        na, nb, cap = int(a_seen[k]), int(b_seen[k]), a.shape[1]
        ha, hb = min(na, cap), min(nb, cap)
        if na + nb <= cap:
            out[k, ha:ha + hb] = b[k, :hb]
            continue
        take_b = min(hb, round(cap * nb / (na + nb)))
        take_a = min(ha, cap - take_b)
        take_b = cap - take_a
        out[k] = torch.cat([a[k, :take_a], b[k, :take_b]])
    return out, a_seen + b_seen


def schedule_t(sigmas: Sequence[float]) -> list[float]:
    """The `t` a v-denoiser receives for each sigma (k-diffusion's VDenoiser: atan(sigma) * 2 / pi)."""
    return [math.atan(s) * 2 / math.pi for s in sigmas]
