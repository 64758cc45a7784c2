"""Calibration runs: the PyTorch model through the runtime's own sampler loop, with the collector hooked.

Same schedule, CFG batch of 2 and seed handling as `engines.runtime.pipeline.Pipeline` (prompt i uses seed
`seed + i`), so statistics describe exactly the activations the deployed graphs will see. Work is done a
prompt at a time; after each prompt the mergeable state is saved, so an interrupted run resumes from its
last completed prompt. Under `torchrun` each rank takes prompts i with i % world == rank and the ranks
merge with all-reduce (MAX for maxima, SUM for exact histogram counts): bit-identical to one process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from calibration.collector import ActivationCollector, BucketSpec, ObserverSettings
from calibration.probes import TrajectoryProbe
from calibration.selection import SampleRecorder, select_samples, selection_coverage
from engines.calibrate.attention_stats import PREFIX as ATTN_PREFIX
from engines.calibrate.attention_stats import AttentionStats
from engines.runtime.backends import TorchBackend
from engines.runtime.estimate import log_estimate
from engines.runtime.pipeline import GenerateOptions, Pipeline
from exporter.errors import InputError
from exporter.models import LoadedModel
from exporter.models.layers import quantizable_linears, transformer_blocks

log = logging.getLogger(__name__)
SELECTIONS = ("all", "uniform", "random", "normal", "activation-aware")


@dataclass(frozen=True)
class CalibrationSettings:
    version: int = 1
    steps: int = 20
    buckets: int = 4
    bucket_by: str = "step"
    seconds: float = 5.0
    cfg_scale: float | None = None  # None: the model's own (its family's sampler defaults)
    seed: int = 0
    selection: str = "all"
    budget: int = 0
    percentiles: tuple[float, ...] = (99.0, 99.9, 99.99)
    device: str = "cpu"
    # what GPTQ-style weight rounding (E[x x^T] per layer) and searched activation scales / loss-driven
    # smoothing (a reservoir of input rows per bucket) need; see calibration/collector.py
    second_moments: bool = True
    sample_rows: int = 128
    # ranges of every attention core's Q, K and V (engines/calibrate/attention_stats.py), what --attention fp8 needs
    attention_stats: bool = True

    def __post_init__(self) -> None:
        if self.steps < 2 or not 1 <= self.buckets <= self.steps:
            raise InputError(f"need steps >= 2 and 1 <= buckets <= steps (got {self.steps}, {self.buckets})")
        if self.bucket_by not in ("step", "t"):
            raise InputError(f"--bucket-by must be 'step' or 't', got {self.bucket_by!r}")
        if self.selection not in SELECTIONS:
            raise InputError(f"unknown selection '{self.selection}' (choose from: {', '.join(SELECTIONS)})")
        if self.sample_rows < 0:
            raise InputError(f"--sample-rows must be >= 0, got {self.sample_rows}")
        if self.selection != "all" and self.budget < 1:
            raise InputError(f"--selection {self.selection} needs --budget B >= 1 (prompt, timestep) samples")

    def sampler(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The sampler a run uses: the model's own (`defaults`, its manifest's sampler_defaults; SAO 1.0's
        when not given) with these settings' steps, CFG and length."""
        base = defaults or {"sampler_type": "dpmpp-3m-sde", "cfg_scale": 7.0, "sigma_min": 0.3, "sigma_max": 500.0,
                            "rho": 1.0}
        cfg = base["cfg_scale"] if self.cfg_scale is None else self.cfg_scale
        return {**base, "steps": self.steps, "cfg_scale": float(cfg), "seconds": self.seconds}


def layer_observer(settings: CalibrationSettings) -> ObserverSettings:
    """What the quantizable layers' collector records (the block collector keeps ranges only)."""
    return ObserverSettings(percentiles=settings.percentiles, second_moments=settings.second_moments,
                            sample_rows=settings.sample_rows)


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        return dist.get_rank(), world
    return 0, 1


class _Run:
    """One calibration run's hooks, state and resume file."""

    def __init__(self, loaded: LoadedModel, settings: CalibrationSettings, prompts: list[str], partial: Path) -> None:
        from exporter.stages.export import runtime_spec

        self.settings, self.prompts, self.partial = settings, prompts, partial
        spec = runtime_spec(loaded)
        self.pipeline = Pipeline(TorchBackend(loaded.wrapper, settings.device), spec)
        self.sampler = settings.sampler(spec["sampler_defaults"])
        # the t the DiT receives under this model's objective and sampler (its family runs the sampler)
        self.ts = loaded.family.dit_timesteps(loaded.config, self.sampler)
        make = BucketSpec.by_step if settings.bucket_by == "step" else BucketSpec.by_t
        self.buckets = make(self.ts, settings.buckets)
        dit = loaded.dit
        self.layers = quantizable_linears(dit)
        blocks = list(transformer_blocks(dit).items())
        last_qkv = f"{blocks[-1][0]}.self_attn.to_qkv"
        self.probe_names = {"range": blocks[0][0], "map": last_qkv}
        self.collector = ActivationCollector(self.layers, self.buckets, settings.steps, layer_observer(settings))
        self.blocks = dict(blocks)
        self.block_collector = ActivationCollector(self.blocks, self.buckets, settings.steps,
                                                   ObserverSettings(percentiles=settings.percentiles))
        self.attention = AttentionStats(dit, self.buckets, settings.steps, settings.percentiles) \
            if settings.attention_stats else None
        snap = settings.steps // 2
        self.probes = {"range": TrajectoryProbe(blocks[0][1], settings.steps, snap),
                       "map": TrajectoryProbe(self.layers[last_qkv], settings.steps, snap)}
        self.dit_wrapper = loaded.wrapper.model
        self.step = 0
        self.active: Callable[[int, int], bool] = lambda p, s: True
        self.prompt_index = 0
        # called once with the wall time of the first sampler step (DiT call 0 to call 1) of this run
        self.on_first_step: Callable[[float], None] | None = None
        self._step0 = 0.0

    def _on_dit_call(self, _module, args) -> None:
        if self.on_first_step is not None:
            if self.step == 0:
                self._step0 = time.perf_counter()
            elif self.step == 1:
                callback, self.on_first_step = self.on_first_step, None
                callback(time.perf_counter() - self._step0)
        t = float(args[1].reshape(-1)[0])
        active = self.active(self.prompt_index, self.step)
        self.collector.begin_step(self.step, t, active, self.prompt_index)
        self.block_collector.begin_step(self.step, t, active, self.prompt_index)
        if self.attention is not None:
            self.attention.collector.begin_step(self.step, t, active, self.prompt_index)
        for probe in self.probes.values():
            probe.step = self.step
        self.step += 1

    def run_prompt(self, index: int) -> None:
        self.prompt_index, self.step = index, 0
        s = self.settings
        p = self.sampler
        opts = GenerateOptions(prompt=self.prompts[index], seconds=s.seconds, steps=s.steps, cfg_scale=p["cfg_scale"],
                               seed=s.seed + index, sampler_type=p["sampler_type"], sigma_min=p["sigma_min"],
                               sigma_max=p["sigma_max"], rho=p["rho"])
        handle = self.dit_wrapper.register_forward_pre_hook(self._on_dit_call)
        try:
            with self.collector, self.block_collector, self.probes["range"], self.probes["map"]:
                if self.attention is None:
                    self.pipeline.generate_latents(opts)
                else:
                    with self.attention:
                        self.pipeline.generate_latents(opts)
        finally:
            handle.remove()

    # resume ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = dict(self.collector.state)
        out.update(self.block_collector.state)
        if self.attention is not None:
            out.update({ATTN_PREFIX + k: v for k, v in self.attention.collector.state.items()})
        for key, probe in self.probes.items():
            out.update(probe.tensors(f"probe.{key}"))
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        blocks = tuple(f"{b}." for b in self.blocks)
        mine = {k: v for k, v in state.items() if not k.startswith("probe.") and not k.startswith("sel.")}
        self.collector.merge_state({k: v for k, v in mine.items() if k.rsplit(".", 1)[0] in self.layers})
        self.block_collector.merge_state({k: v for k, v in mine.items() if k.startswith(blocks)
                                          and k.rsplit(".", 1)[0] in self.blocks})
        for key, probe in self.probes.items():
            probe.load(f"probe.{key}", state)
        if self.attention is not None:
            self.attention.collector.merge_state({k[len(ATTN_PREFIX):]: v for k, v in state.items()
                                                  if k.startswith(ATTN_PREFIX)})


def _loop(run: _Run, indices: list[int], tag: str, key: str, rank: int,
          extra: Callable[[], dict[str, torch.Tensor]] | None = None,
          restore: Callable[[dict[str, torch.Tensor]], None] | None = None, shorten: str = "",
          note: str = "") -> None:
    """Run `indices` prompt by prompt, saving state after each; resume from a matching saved state."""
    from safetensors.torch import load_file, save_file

    state_path = run.partial / f"{tag}.rank{rank}.safetensors"
    progress_path = run.partial / f"{tag}.rank{rank}.json"
    done: list[int] = []
    if progress_path.is_file() and state_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress.get("key") == key:
            saved = load_file(str(state_path))
            run.load(saved)
            if restore is not None:
                restore(saved)
            done = progress["done"]
            log.info("resuming %s: %d of %d prompts already done", tag, len(done), len(indices))
    todo = [i for i in indices if i not in set(done)]
    if todo and rank == 0:
        steps = run.settings.steps
        run.on_first_step = lambda s: log_estimate(f"calibrate[{tag}]", s, len(todo) * steps,
                                                   f"{len(todo)} prompts x {steps} steps{note}", shorten)
    bar = tqdm(total=len(indices), initial=len(done), desc=f"calibrate[{tag}]", unit="prompt",
               disable=rank != 0)
    for index in todo:
        run.run_prompt(index)
        done.append(index)
        state = run.state()
        if extra is not None:
            state.update(extra())
        tmp = state_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(state_path)
        progress_path.write_text(json.dumps({"key": key, "done": done}))
        bar.update(1)
    bar.close()


def run_key(settings: CalibrationSettings, prompts: list[str], identity: dict[str, Any], world: int) -> str:
    blob = json.dumps({"settings": asdict(settings), "prompts": prompts, "model": identity, "world": world},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def calibrate(loaded: LoadedModel, prompts: list[str], settings: CalibrationSettings, out: Path,
              prompt_source: str, extra_meta: dict[str, Any] | None = None, shorten: str = ""
              ) -> dict[str, Any] | None:
    """Collect the statistics and (rank 0) write the artifact, plots and summary to `out` atomically.
    The first sampler step is timed and the run's total logged, with `shorten` (the caller's options that
    shorten it). The model runs on `settings.device` and is back on the CPU afterwards (the export needs
    it there)."""
    try:
        return _calibrate(loaded, prompts, settings, out, prompt_source, extra_meta, shorten)
    finally:
        if settings.device != "cpu":
            loaded.wrapper.to("cpu")


def _calibrate(loaded: LoadedModel, prompts: list[str], settings: CalibrationSettings, out: Path,
               prompt_source: str, extra_meta: dict[str, Any] | None, shorten: str) -> dict[str, Any] | None:
    from calibration import artifact
    from calibration.report import write_report
    from exporter.onnx.artifacts import atomic_dir

    rank, world = _dist()
    if world > 1 and settings.selection != "all":
        raise InputError("--selection other than 'all' runs in one process (it ranks samples across all prompts)")
    out = Path(out).absolute()
    partial = out.parent / f".{out.name}.partial"
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write output {out}: {exc.strerror or exc}") from None
    run = _Run(loaded, settings, prompts, partial)
    key = run_key(settings, prompts, loaded.identity, world)
    mine = [i for i in range(len(prompts)) if i % world == rank]
    selection_meta: dict[str, Any] = {"method": settings.selection, "budget": settings.budget}
    if settings.selection != "all":
        recorder = SampleRecorder(list(run.layers), run.buckets, run.collector)
        _loop(run, mine, "pass1", key, rank, extra=recorder.state, restore=recorder.load, shorten=shorten,
              note="; then a second pass over the selected prompts")
        full = dict(run.collector.state)
        # Every method at the same budget, once each: the chosen one is used, all are reported.
        selections = {m: select_samples(m, recorder, full, settings.budget, len(prompts), settings.steps,
                                        settings.seed) for m in SELECTIONS[1:]}
        chosen = selections[settings.selection]
        selection_meta["coverage"] = {m: selection_coverage(recorder, full, s) for m, s in selections.items()}
        selection_meta["samples"] = sorted([list(s) for s in chosen])
        recorder.detach()
        run = _Run(loaded, settings, prompts, partial)
        chosen_set = set(chosen)
        run.active = lambda p, s: (p, s) in chosen_set
        mine = sorted({p for p, _ in chosen})
    _loop(run, mine, "stats", key, rank, shorten=shorten)
    if world > 1:
        run.collector.all_reduce(list(run.layers))
        run.block_collector.all_reduce(list(run.blocks))
        for probe in run.probes.values():
            probe.all_reduce()
        if run.attention is not None:
            run.attention.collector.all_reduce(run.attention.keys())
    if rank != 0:
        return None
    layer_order = list(run.layers)
    tensors = run.collector.tensors(layer_order)
    tensors.update({f"block.{k}": v for k, v in run.block_collector.tensors(list(run.blocks)).items()
                    if k.endswith((".ch_absmax", ".step_absmax"))})
    for k, probe in run.probes.items():
        tensors.update(probe.tensors(f"probe.{k}"))
    if run.attention is not None:
        tensors.update(run.attention.tensors())
    meta = {
        "model": loaded.identity,
        "sampler": run.sampler,
        "buckets": {"count": run.buckets.count, "by": settings.bucket_by, "edges": list(run.buckets.edges),
                    "step_t": run.ts, "step_bucket": [run.buckets.bucket_of(t) for t in run.ts]},
        "prompts": {"source": prompt_source, "count": len(prompts), "sha256": artifact.prompts_hash(prompts),
                    "list": prompts},
        "seeds": {"base": settings.seed, "rule": "prompt i uses seed base + i"},
        "observer": layer_observer(settings).to_json(),
        "layers": [{"name": n, "channels": int(tensors[f"{n}.ch_absmax"].shape[1])} for n in layer_order],
        "probes": run.probe_names,
        "blocks": list(run.blocks),
        "selection": selection_meta,
        "settings": asdict(settings),
        "world_size": world,
        **({"attention": run.attention.meta()} if run.attention is not None else {}),
        **(extra_meta or {}),
    }
    with atomic_dir(out) as tmp:
        meta = artifact.write(tmp, meta, tensors)
        write_report(tmp, meta, tensors)
    shutil.rmtree(partial, ignore_errors=True)
    return meta
