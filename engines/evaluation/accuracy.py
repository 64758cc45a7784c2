"""Accuracy of quantized DiTs against FP32 on real sampler trajectories of held-out prompts.

Two views, both against the FP32 graph:
- per step: the DiT output v on the FP32 trajectory's own inputs (x_t, t, conditioning; CFG batch of
  2), as SQNR = 10 log10(sum v^2 / sum (v - v_q)^2) and cosine similarity, averaged per timestep bucket;
- end to end: the final latents after the whole sampler run with the quantized DiT (same seed), as SNR;
- what the user hears: those final latents decoded by the export's own VAE decoder graph (as the runtime
  decodes them), against the FP32 run's decoded audio, as SNR over the requested length.
The FP32 reference's per-step outputs and decoded audio are kept with the trajectory, so each candidate
costs its own DiT calls only.
Every candidate (ONNX graphs in ONNX Runtime, ModelOpt's fake-quantized PyTorch model) is seen through
one `session.run(outputs, feeds)` interface so all are measured on identical inputs.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from calibration.collector import BucketSpec
from engines.runtime.backends import OrtDiT
from engines.runtime.pipeline import GenerateOptions, Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracySettings:
    version: int = 1
    prompts: int = 4
    steps: int = 20
    seconds: float = 3.0
    cfg_scale: float | None = None  # None: the model's own (SAO 1.0: 7, SAO Small: 1; manifest sampler_defaults)
    seed: int = 0
    heldout_seed: int = 1234

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.steps < 2 or not self.seconds > 0:
            raise ValueError("accuracy settings need prompts >= 1, steps >= 2 and seconds > 0")


class TorchSession:
    """A PyTorch DiT graph module (x, t, cross_attn_cond, global_embed -> v) behind ORT's `run`, on the
    module's device (feeds are moved there, outputs come back to the CPU)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval()
        self.device = next(iter(module.parameters())).device

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            v = self.module(*(torch.from_numpy(feeds[k]).to(self.device)
                              for k in ("x", "t", "cross_attn_cond", "global_embed")))
        return [v.float().cpu().numpy()]


@dataclass
class Trajectory:
    prompt: str
    seed: int
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    latents: torch.Tensor | None = None
    outputs: list[np.ndarray] = field(default_factory=list)  # the reference's v for each feed
    audio: np.ndarray | None = None  # the final latents decoded by the export's VAE decoder


class _Recording(OrtDiT):
    def __init__(self, session: Any, sink: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> None:
        super().__init__(session)
        self.sink, self.outputs = sink, outputs

    def run(self, x, t, cross, global_embed):
        self.sink.append({"x": x.float().numpy().copy(), "t": t.float().numpy().copy(),
                          "cross_attn_cond": cross.float().numpy().copy(),
                          "global_embed": global_embed.float().numpy().copy()})
        v = super().run(x, t, cross, global_embed)
        self.outputs.append(v.numpy().copy())
        return v


def heldout_prompts(calibration_prompts: Sequence[str], count: int, seed: int) -> list[str]:
    """Seed-list prompts that the calibration run did not use (a seeded sample)."""
    import random

    from calibration.prompts import load_seed_prompts

    used = set(calibration_prompts)
    pool = [p for p in load_seed_prompts() if p not in used]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} seed prompts are not calibration prompts; asked for {count}")
    return random.Random(seed).sample(pool, count)


def generate_options(pipeline: Pipeline, prompt: str, seed: int, settings: AccuracySettings) -> GenerateOptions:
    d = pipeline.manifest["sampler_defaults"]
    return GenerateOptions(prompt=prompt, seconds=settings.seconds, steps=settings.steps,
                           cfg_scale=float(d.get("cfg_scale", 7.0) if settings.cfg_scale is None else settings.cfg_scale),
                           seed=seed, sampler_type=d["sampler_type"],
                           sigma_min=d["sigma_min"], sigma_max=d["sigma_max"], rho=d["rho"])


def with_dit(pipeline: Pipeline, dit: Any) -> Pipeline:
    backend = copy.copy(pipeline.backend)
    backend.dit = dit
    return Pipeline(backend, pipeline.manifest)


class TimedSession:
    """A session whose first `run` is timed and handed to `on_first` (a stage's time estimate)."""

    def __init__(self, session: Any, on_first: Callable[[float], None]) -> None:
        self.session, self.on_first = session, on_first

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.on_first is None:
            return self.session.run(outputs, feeds)
        t0 = time.perf_counter()
        out = self.session.run(outputs, feeds)
        callback, self.on_first = self.on_first, None
        callback(time.perf_counter() - t0)
        return out


def capture(pipeline: Pipeline, reference: Any, prompts: Sequence[str], settings: AccuracySettings,
            on_first_step: Callable[[float], None] | None = None) -> list[Trajectory]:
    """Run the sampler with the FP32 `reference` session; keep every DiT input and the final latents.
    `on_first_step` gets the first DiT step's time (for the stage's estimate)."""
    if on_first_step is not None:
        reference = TimedSession(reference, on_first_step)
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="reference trajectories", unit="prompt")):
        traj = Trajectory(prompt, settings.seed + i)
        traj.latents = with_dit(pipeline, _Recording(reference, traj.feeds, traj.outputs)).generate_latents(
            generate_options(pipeline, prompt, traj.seed, settings))
        traj.audio = decode_audio(pipeline, traj.latents, settings)
        out.append(traj)
    return out


def decode_audio(pipeline: Pipeline, latents: torch.Tensor, settings: AccuracySettings) -> np.ndarray:
    """Latents -> audio through the export's VAE decoder graph, trimmed to the requested length (what
    `Pipeline.generate` hands the user)."""
    audio = pipeline.backend.decode(latents.float())
    samples = int(round(settings.seconds * pipeline.dims["sample_rate"]))
    return audio[..., :samples].float().numpy()


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    noise = float(((ref - out) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def evaluate(name: str, session: Any, reference: Any, trajectories: Sequence[Trajectory], edges: Sequence[float],
             pipeline: Pipeline, settings: AccuracySettings, sampler: bool = True) -> dict[str, Any]:
    """Per-bucket SQNR / cosine on the FP32 trajectories' inputs; with `sampler`, the final-latent SNR and
    the decoded-audio SNR (the trajectory's own decoded FP32 audio as reference; decoded by `pipeline`'s VAE
    decoder). The reference outputs recorded by `capture` are used where the trajectory has them."""
    spec = BucketSpec(tuple(edges))
    per_bucket: dict[int, list[tuple[float, float]]] = {k: [] for k in range(spec.count)}
    steps = []
    for traj in trajectories:
        recorded = len(traj.outputs) == len(traj.feeds)
        for i, feeds in enumerate(traj.feeds):
            ref = traj.outputs[i] if recorded else reference.run(["v"], feeds)[0]
            out = session.run(["v"], feeds)[0]
            row = (sqnr_db(ref, out), cosine(ref, out))
            per_bucket[spec.bucket_of(float(feeds["t"][0]))].append(row)
            steps.append(row)
    result: dict[str, Any] = {
        "name": name,
        "mean_step_sqnr_db": float(np.mean([s for s, _ in steps])),
        "min_step_sqnr_db": float(np.min([s for s, _ in steps])),
        "mean_cosine": float(np.mean([c for _, c in steps])),
        "buckets": [{"bucket": k, "t_max": spec.edges[k], "t_min": spec.edges[k + 1], "steps": len(rows),
                     "sqnr_db": float(np.mean([s for s, _ in rows])) if rows else None,
                     "cosine": float(np.mean([c for _, c in rows])) if rows else None}
                    for k, rows in per_bucket.items()]}
    if sampler:
        snrs, audio = [], []
        for traj in trajectories:
            options = generate_options(pipeline, traj.prompt, traj.seed, settings)
            latents = with_dit(pipeline, OrtDiT(session)).generate_latents(options)
            snrs.append(sqnr_db(traj.latents.numpy(), latents.numpy()))
            reference_audio = traj.audio if traj.audio is not None else decode_audio(pipeline, traj.latents, settings)
            audio.append(sqnr_db(reference_audio, decode_audio(pipeline, latents, settings)))
        result["final_latent_snr_db"] = float(np.mean(snrs))
        result["audio_snr_db"] = float(np.mean(audio))
    return result


def fused_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The three headline figures of an `evaluate` row, for a second run of the same candidate with ONNX
    Runtime's fused integer kernels (kept beside the exact-arithmetic figures as `row["fused"]`)."""
    return {k: row.get(k) for k in ("mean_step_sqnr_db", "final_latent_snr_db", "audio_snr_db")}


def markdown(rows: Sequence[dict[str, Any]], title: str = "Accuracy against FP32") -> str:
    """One row per candidate: mean per-step SQNR, per-bucket SQNR, cosine, final-latent SNR, decoded-audio
    SNR, weight size; where any row was also run with ONNX Runtime's fused integer kernels, a column with
    those three figures (step / latent / audio)."""
    buckets = max((len(r["buckets"]) for r in rows), default=0)
    fused = any(r.get("fused") for r in rows)
    head = ["candidate", "mean step SQNR dB"] + [f"b{k} SQNR" for k in range(buckets)] + \
           ["min step SQNR", "mean cosine", "final-latent SNR dB", "decoded-audio SNR dB", "DiT weights vs FP32"] + \
           (["fused ORT kernel: step / latent / audio dB"] if fused else [])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        cells = [r["name"], fmt(r["mean_step_sqnr_db"])] + [fmt(b["sqnr_db"]) for b in r["buckets"]] + \
                [fmt(r["min_step_sqnr_db"]), fmt(r["mean_cosine"], 5), fmt(r.get("final_latent_snr_db")),
                 fmt(r.get("audio_snr_db")), fmt(r.get("size_ratio"), 3) + "x" if r.get("size_ratio") else "-"]
        if fused:
            f = r.get("fused")
            cells.append(" / ".join(fmt(f.get(k)) for k in ("mean_step_sqnr_db", "final_latent_snr_db", "audio_snr_db"))
                         if f else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(directory: Path, rows: Sequence[dict[str, Any]], context: dict[str, Any]) -> str:
    import json

    table = markdown(rows)
    (Path(directory) / "report.json").write_text(json.dumps({"schema_version": 1, **context, "rows": list(rows)},
                                                            indent=1) + "\n")
    lines = ["# quadit accuracy report", "", f"Held-out prompts ({len(context['prompts'])}), {context['settings']['steps']} "
             f"steps, {context['settings']['seconds']} s, CFG {context['settings']['cfg_scale'] or 'of the model'}; reference: "
             "the FP32 graph in ONNX Runtime. SQNR of the DiT output on the FP32 trajectory's inputs, averaged "
             "per timestep bucket (b0 = noisiest); final-latent SNR after the whole sampler run; decoded-audio SNR of "
             "those latents through the export's VAE decoder.", "", table]
    (Path(directory) / "report.md").write_text("\n".join(lines))
    return table


def settings_json(settings: AccuracySettings) -> dict[str, Any]:
    return asdict(settings)
