"""What a quantizer cares about in collected statistics: outlier channels and range growth."""
from __future__ import annotations

import torch


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
