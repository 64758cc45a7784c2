"""Input second moments E[p p^T] of a UNet's Conv2d and Linear layers, for GPTQ-style rounding and the layer
sensitivities of `--auto-precision` (`exporter.passes.conv_lowbit`, `engines.evaluation.unet_sensitivity`).

A Linear's output error for a weight change D is E||x D||^2 = tr(D^T H D), H = E[x x^T] over its input rows.
A convolution is a Linear on its im2col'd patches p (kh*kw*I values per output position, zero padding included),
so its H is E[p p^T] [kh*kw*I, kh*kw*I], with rows *tap-major* (tap (u, v) outer, channel inner), the order
conv_lowbit views the weight in. The calibration collector's own `xtx` is over channels only (a Conv input seen
channels-last), which is what smoothing needs but not what a 3x3 convolution's error depends on, hence this.

Bounded cost: each call contributes at most `max_rows` rows per layer (evenly spaced positions of the batch,
deterministic), so memory is fixed by the layers' K^2 (float32 sums: 21 MB for the widest 2304-row conv of the
minis) and the work by (calls x layers x max_rows x K^2), not by the latent's length. Calibration sums over
the first `MOMENT_PROMPTS` prompts' trajectories only (a 3x3 convolution's patch sums cost seconds per UNet
call on 2 CPU cores; 2 prompts x 10 steps, CFG's halves in one batch, x 128 rows = 2560 rows per layer).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MOMENT_PROMPTS = 2


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows [R, K]: a Linear's features, or a Conv2d's tap-major im2col patches."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"second moments need an integer zero-padded Conv2d, got padding {module.padding!r}")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, I*kh*kw, L]
        b, _, length = cols.shape
        taps = module.kernel_size[0] * module.kernel_size[1]
        cols = cols.reshape(b, module.in_channels, taps, length).permute(0, 3, 2, 1)  # [B, L, taps, I]
        return cols.reshape(b * length, taps * module.in_channels)
    return x.reshape(-1, x.shape[-1])


class SecondMoments:
    """Forward-pre hooks that sum p p^T per layer (see the module docstring); a context manager."""

    def __init__(self, layers: Mapping[str, nn.Module], max_rows: int = 128) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.layers, self.max_rows = dict(layers), max_rows
        self.active = True  # the caller may sum over only some of its forward calls
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if not self.active:
                return
            p = patches(module, args[0].detach().float())
            if p.shape[0] > self.max_rows:
                p = p[torch.linspace(0, p.shape[0] - 1, self.max_rows).round().long()]
            acc = self.sums.get(name)
            self.sums[name] = p.T @ p if acc is None else acc.add_(p.T @ p)
            self.rows[name] = self.rows.get(name, 0) + int(p.shape[0])
        return hook

    def __enter__(self) -> "SecondMoments":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> dict[str, np.ndarray]:
        """E[p p^T] per layer, float64."""
        return {name: (s.double() / max(self.rows[name], 1)).numpy() for name, s in self.sums.items()}
