"""Probes for the plots: one module's input across the trajectory (seed 000, Fig. 1 and Fig. 2).

`TrajectoryProbe` records, per sampler step, the min, median and max of one module's input (signed, over
all tokens and channels, as Fig. 2 draws its span and median), and keeps one |x| snapshot
[tokens, channels] of the first batch element at a chosen step (Fig. 1's activation map).
"""
from __future__ import annotations

import torch
from torch import nn


class TrajectoryProbe:
    def __init__(self, module: nn.Module, num_steps: int, snapshot_step: int) -> None:
        self.module = module
        self.num_steps = num_steps
        self.snapshot_step = snapshot_step
        self.step = 0
        self.lo = torch.full((num_steps,), float("inf"))
        self.hi = torch.full((num_steps,), float("-inf"))
        self.median_sum = torch.zeros(num_steps, dtype=torch.float64)
        self.median_count = torch.zeros(num_steps, dtype=torch.int64)
        self.snapshot: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        s = min(self.step, self.num_steps - 1)
        self.lo[s] = min(float(self.lo[s]), float(x.min()))
        self.hi[s] = max(float(self.hi[s]), float(x.max()))
        self.median_sum[s] += float(x.median())
        self.median_count[s] += 1
        if s == self.snapshot_step and self.snapshot is None:
            self.snapshot = x[0].abs().cpu().clone()

    def __enter__(self) -> "TrajectoryProbe":
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Raw, mergeable state (min, max, median sum and count per step) plus the derived mean median."""
        out = {f"{prefix}.min": self.lo.clone(), f"{prefix}.max": self.hi.clone(),
               f"{prefix}.median_sum": self.median_sum.clone(), f"{prefix}.median_count": self.median_count.clone(),
               f"{prefix}.median": (self.median_sum / self.median_count.clamp_min(1)).float()}
        if self.snapshot is not None:
            out[f"{prefix}.snapshot"] = self.snapshot.contiguous()
        return out

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Restore (resume) from, or merge in (data parallel), the output of `tensors(prefix)`."""
        self.lo = torch.minimum(self.lo, tensors[f"{prefix}.min"])
        self.hi = torch.maximum(self.hi, tensors[f"{prefix}.max"])
        self.median_sum = self.median_sum + tensors[f"{prefix}.median_sum"]
        self.median_count = self.median_count + tensors[f"{prefix}.median_count"]
        if self.snapshot is None and f"{prefix}.snapshot" in tensors:
            self.snapshot = tensors[f"{prefix}.snapshot"]

    def all_reduce(self) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.median_sum, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.median_count, op=dist.ReduceOp.SUM)
