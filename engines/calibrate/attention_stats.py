"""Per-bucket ranges of every attention core's Q, K and V, collected during calibration (for `--attention fp8`).

FP8 attention quantizes the inputs of the attention core's two batched MatMuls, which are not the input of any
Linear: Q and K after the rotary embedding and V, as `scaled_dot_product_attention` receives them. A forward hook
on a Linear cannot see them, so each stable-audio-tools `Attention` module's `apply_attn(q, k, v, ...)` (the one
call that takes exactly these tensors, [B, H, S, D], before cross-attention's KV heads are repeated, which
changes no range) is wrapped for the run and the three tensors go to an `ActivationCollector` keyed
`<module>.q|k|v`: per bucket and per head-dim channel abs-max, the log2 histogram and per-step abs-max, so they
merge across resumed runs and ranks exactly as the Linear statistics do.

In the artifact they are `attn.<module>.{q,k,v}.{absmax,ch_absmax,pctl,step_absmax}` and `calibration.json`
says `"attention": {"version": ATTENTION_STATS_VERSION, "modules": [...]}`. An artifact written before these
statistics existed has no such entry; the export refuses `--attention fp8` with it and says to re-calibrate.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from calibration.collector import ActivationCollector, BucketSpec, ObserverSettings

ATTENTION_STATS_VERSION = 1
PARTS = ("q", "k", "v")
PREFIX = "attn."


def attention_modules(dit: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every module of the DiT with stable-audio-tools' `apply_attn(q, k, v, ...)`."""
    return {name: m for name, m in dit.named_modules() if callable(getattr(type(m), "apply_attn", None))}


class AttentionStats:
    """Wraps each attention module's `apply_attn` while entered; `collector` holds the statistics."""

    def __init__(self, dit: nn.Module, buckets: BucketSpec, num_steps: int, percentiles: tuple[float, ...]) -> None:
        self.modules = attention_modules(dit)
        self.collector = ActivationCollector({}, buckets, num_steps, ObserverSettings(percentiles=percentiles))

    def keys(self) -> list[str]:
        return [f"{m}.{p}" for m in self.modules for p in PARTS]

    def _wrap(self, name: str, original: Callable) -> Callable:
        def apply_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any):
            if self.collector.active:
                for part, x in zip(PARTS, (q, k, v)):
                    self.collector.observe(f"{name}.{part}", x)
            return original(q, k, v, *args, **kwargs)

        return apply_attn

    def __enter__(self) -> "AttentionStats":
        for name, module in self.modules.items():
            module.apply_attn = self._wrap(name, module.apply_attn)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.modules.values():
            module.__dict__.pop("apply_attn", None)  # back to the class's method

    def tensors(self) -> dict[str, torch.Tensor]:
        """The artifact's `attn.*` tensors (ranges only: Q/K/V need no second moments or rows)."""
        keep = (".absmax", ".ch_absmax", ".pctl", ".step_absmax")
        return {PREFIX + k: v for k, v in self.collector.tensors(self.keys()).items() if k.endswith(keep)}

    def meta(self) -> dict[str, Any]:
        return {"version": ATTENTION_STATS_VERSION, "modules": list(self.modules), "parts": list(PARTS),
                "what": "abs-max of Q and K after the rotary embedding and of V, as scaled_dot_product_attention "
                        "receives them, per timestep bucket"}
