"""Activation-aware calibration-set generation (PTQ4ADM, seed 002), and its uniform/random baselines.

Pass 1 records, for every (prompt, step) sample, each layer's per-channel abs-max. Under a budget of B
samples, `activation-aware` greedily picks the sample that most raises the coverage of the full run's
per-bucket, per-layer, per-channel maxima (a monotone submodular objective, so greedy is within 1 - 1/e
of the best set); `uniform` spreads samples evenly over steps with prompts in turn (the usual
timestep-uniform calibration set); `random` draws them with the run's seed; `normal` draws timesteps from a
normal distribution around the trajectory's middle (PTQ4ADM's "Normal" baseline). Coverage of a set = mean over
(bucket, layer) of the mean over channels of (max over the set) / (max over the full run).
"""
from __future__ import annotations

import random
from typing import Mapping

import torch

from calibration.collector import ActivationCollector, BucketSpec


class SampleRecorder:
    """Per-sample, per-layer channel abs-max, as rows of one [N, sum(C)] matrix."""

    def __init__(self, layers: list[str], buckets: BucketSpec, collector: ActivationCollector) -> None:
        self.layers = layers
        self.buckets = buckets
        self.collector = collector
        self.rows: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.sample_bucket: dict[tuple[int, int], int] = {}
        collector.sample_hook = self._record

    def _record(self, name: str, channel_max: torch.Tensor) -> None:
        key = (self.collector.prompt, self.collector.step)
        row = self.rows.setdefault(key, {})
        row[name] = torch.maximum(row[name], channel_max) if name in row else channel_max.clone()
        self.sample_bucket[key] = self.collector.bucket

    def detach(self) -> None:
        self.collector.sample_hook = None

    def matrix(self) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        keys = sorted(self.rows)
        data = torch.stack([torch.cat([self.rows[k][n] for n in self.layers]) for k in keys])
        return keys, data, torch.tensor([self.sample_bucket[k] for k in keys])

    def state(self) -> dict[str, torch.Tensor]:
        if not self.rows:
            return {}
        keys, data, buckets = self.matrix()
        return {"sel.keys": torch.tensor(keys, dtype=torch.int64), "sel.data": data, "sel.bucket": buckets}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if "sel.keys" not in state:
            return
        widths = None
        for key, row, bucket in zip(state["sel.keys"].tolist(), state["sel.data"], state["sel.bucket"].tolist()):
            if widths is None:
                widths = [int(state[f"{n}.ch_absmax"].shape[1]) for n in self.layers]
            self.rows[tuple(key)] = dict(zip(self.layers, torch.split(row, widths)))
            self.sample_bucket[tuple(key)] = bucket


def _normalised(recorder: SampleRecorder, full: Mapping[str, torch.Tensor]):
    keys, data, buckets = recorder.matrix()
    ref = torch.cat([full[f"{n}.ch_absmax"] for n in recorder.layers], dim=1)  # [K, D]
    ratio = torch.where(ref[buckets] > 0, data / ref[buckets].clamp_min(1e-30), torch.ones_like(data)).clamp(max=1)
    widths = [full[f"{n}.ch_absmax"].shape[1] for n in recorder.layers]
    weight = torch.cat([torch.full((w,), 1.0 / (w * len(widths))) for w in widths])
    return keys, ratio, buckets, weight


def selection_coverage(recorder: SampleRecorder, full: Mapping[str, torch.Tensor],
                       chosen: list[tuple[int, int]]) -> float:
    keys, ratio, buckets, weight = _normalised(recorder, full)
    index = {k: i for i, k in enumerate(keys)}
    cur = torch.zeros(int(buckets.max()) + 1, ratio.shape[1])
    for key in chosen:
        i = index[key]
        cur[buckets[i]] = torch.maximum(cur[buckets[i]], ratio[i])
    present = torch.unique(buckets)
    return float((cur[present] * weight).sum(dim=1).mean())


def select_samples(method: str, recorder: SampleRecorder, full: Mapping[str, torch.Tensor], budget: int,
                   num_prompts: int, steps: int, seed: int) -> list[tuple[int, int]]:
    keys = sorted(recorder.rows)
    budget = min(budget, len(keys))
    if method == "random":
        return sorted(random.Random(seed).sample(keys, budget))
    if method == "normal":
        # timesteps drawn from a normal distribution centred on the middle of the trajectory (sd a quarter
        # of it), prompts at random: the "Normal" intermediate-sampling baseline of PTQ4ADM's Figure 4
        rng = random.Random(seed)
        by_step: dict[int, list[tuple[int, int]]] = {}
        for key in keys:
            by_step.setdefault(key[1], []).append(key)
        chosen_n: set[tuple[int, int]] = set()
        while len(chosen_n) < budget:
            step = min(steps - 1, max(0, round(rng.gauss((steps - 1) / 2, steps / 4))))
            free = [k for k in by_step.get(step, []) if k not in chosen_n]
            if free:
                chosen_n.add(rng.choice(free))
        return sorted(chosen_n)
    if method == "uniform":
        chosen: list[tuple[int, int]] = []
        taken = set()
        for i in range(budget):
            step = min(steps - 1, int((i + 0.5) * steps / budget))
            prompt = i % num_prompts
            while (prompt, step) in taken:
                prompt = (prompt + 1) % num_prompts
            taken.add((prompt, step))
            chosen.append((prompt, step))
        return sorted(chosen)
    if method != "activation-aware":
        raise ValueError(f"unknown selection method {method!r}")
    keys, ratio, buckets, weight = _normalised(recorder, full)
    cur = torch.zeros(int(buckets.max()) + 1, ratio.shape[1])
    picked: list[int] = []
    available = torch.ones(len(keys), dtype=torch.bool)
    for _ in range(budget):
        gain = ((ratio - cur[buckets]).clamp_min(0) * weight).sum(dim=1)
        gain[~available] = -1.0
        i = int(gain.argmax())
        picked.append(i)
        available[i] = False
        cur[buckets[i]] = torch.maximum(cur[buckets[i]], ratio[i])
    return sorted(keys[i] for i in picked)

