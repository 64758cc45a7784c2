"""Streaming activation observers on any `nn.Module`, through forward-pre hooks.

Memory does not grow with the number of forward calls: each hooked input is reduced on the spot into
a [num_slots, C] running per-input-channel abs-max. The caller decides what a slot is (a sampler step,
a timestep bucket) by setting `observer.slot` before each forward of the model.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class ChannelAbsMaxObserver:
    """Per-slot, per-input-channel abs-max of the first positional input of each named module.

    Use as a context manager: hooks are registered on enter and removed on exit.
    """

    def __init__(self, modules: Mapping[str, nn.Module], num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.modules = dict(modules)
        self.num_slots = num_slots
        self.slot = 0
        self.stats: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            channel_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            if name not in self.stats:
                self.stats[name] = torch.zeros(self.num_slots, x.shape[-1])
            row = self.stats[name][self.slot]
            torch.maximum(row, channel_max, out=row)

        return hook

    def __enter__(self) -> "ChannelAbsMaxObserver":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def outlier_channels(channel_absmax: torch.Tensor, ratio: float = 20.0) -> int:
    """Input channels whose abs-max (over all slots/buckets) is at least `ratio` x the median channel's."""
    ch = channel_absmax.reshape(-1, channel_absmax.shape[-1]).amax(dim=0)
    median = ch.median().clamp_min(torch.finfo(ch.dtype).tiny)
    return int((ch >= ratio * median).sum())


def outlier_fraction(channel_absmax: torch.Tensor, ratio: float = 20.0) -> float:
    """Fraction of input channels whose abs-max is at least `ratio` x the median channel's."""
    return outlier_channels(channel_absmax, ratio) / channel_absmax.shape[-1]


def range_growth(per_slot_absmax: torch.Tensor) -> float:
    """Mean per-slot abs-max range over the last quarter of slots divided by that over the first quarter.

    Slots are in trajectory order (first = noisiest step); input is [S] per-slot maxima or [S, C].
    """
    ranges = per_slot_absmax if per_slot_absmax.dim() == 1 else per_slot_absmax.amax(dim=-1)
    quarter = max(1, ranges.shape[0] // 4)
    first, last = ranges[:quarter].mean(), ranges[-quarter:].mean()
    return float(last / first.clamp_min(torch.finfo(ranges.dtype).tiny))
