"""Per-layer quantization sensitivity: what each layer costs when it alone is quantized, per scheme.

For every quantizable Linear and every scheme the target can run, the base graph (FP32 for ONNX Runtime,
FP16 for TensorRT) is quantized with a recipe that keeps every other layer in float
(`transformer.layers.*` skipped, this layer overridden), and the result is compared with the FP32 graph:

- step SQNR: the DiT output on a few FP32 sampler steps per timestep bucket (the trajectories of
  calibration prompts, so the held-out prompts of the report stay unseen by the choice), one DiT call
  per probe. Its linear noise share `nsr = 10^(-SQNR/10)` is what adds up across layers (independent
  errors add in power), so it is the cost `engines/evaluation/auto_precision.py` minimises;
- final-latent SNR after a whole sampler run with that one layer quantized (on `final_prompts` of the
  probed prompts; 0 skips it): what the user hears, at the price of one sampler run per candidate;
- the weight bytes the layer saves: the quantized graph's bytes minus the base graph's, measured, not
  modelled, so scales, per-bucket tables and INT4 packing are counted as they are written.

With only one layer quantized the FP32 reference is exact, so the "drop" against FP32 is this SQNR itself
(higher = the layer bears the scheme better). The document is versioned (`SCHEMA`) and written beside the
export manifest as `sensitivity.json`, with `sensitivity.png` plotting it per layer.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from calibration.collector import BucketSpec
from engines.evaluation.accuracy import Trajectory, generate_options, sqnr_db, with_dit
from engines.evaluation.compare import graph_candidate
from engines.runtime.backends import OrtDiT
from exporter.models import LoadedModel
from exporter.passes.recipe import LayerRule, Recipe
from exporter.stages.quantized import Calibration

log = logging.getLogger(__name__)
SCHEMA = 1
KIND = "quadit-sensitivity"
# what each target can run per layer besides float (ARCHITECTURE.md section 3): TensorRT has no W4A8; FP8
# (E4M3 weights and activations, issue 22) is TensorRT's. A layer's activation and weight always get one scheme
# (layers reading one tensor share its quantizer and form one group), so no GEMM mixes INT8 and FP8 on its two
# inputs, the one mix TensorRT refuses (exporter/tensorrt/checker.py, "one quantized type")
TARGET_SCHEMES = {"tensorrt": ("w8a8", "fp8", "w4a16"), "onnxruntime": ("w8a8", "w4a8", "w4a16")}
# the low-rank rank a 4-bit layer may also get (docs/figures.md: rank 32 is what lifts w4a16 past w8a8's
# final-latent SNR on sao-mini, at 0.04x of FP32 more bytes); a precision is "scheme" or "scheme+rR"
LOWRANK_OPTION = 32


def precision_options(target: str, base_rank: int = 0, lowrank: int = LOWRANK_OPTION) -> tuple[str, ...]:
    """The per-layer precisions measured for `target`: each scheme at the base recipe's rank, and w4a16 also
    with a `lowrank` branch (0: none) when the base recipe has none (w4a8 with the branch is left out: it
    has w4a16's bytes and more error, so a quality-for-size choice never takes it)."""
    out = [label(s, base_rank) for s in TARGET_SCHEMES[target]]
    if lowrank and not base_rank:
        out.append(label("w4a16", lowrank))
    return tuple(out)


def label(scheme: str, rank: int) -> str:
    return scheme if not rank else f"{scheme}+r{rank}"


def parse(precision: str) -> dict[str, Any]:
    """{"scheme", "lowrank"} of a precision label ("w4a16", "w4a16+r32")."""
    scheme, _, rank = precision.partition("+r")
    return {"scheme": scheme, "lowrank": int(rank or 0)}


def override(precision: str, recipe: Recipe) -> tuple[tuple[str, Any], ...]:
    """The rule overrides that give a layer `precision` under `recipe` (sorted, as Recipe.from_json reads
    them): the scheme, and the rank where it differs from the recipe's."""
    fields = parse(precision)
    return tuple(sorted((k, v) for k, v in fields.items() if k == "scheme" or v != recipe.lowrank))


@dataclass(frozen=True)
class SensitivitySettings:
    """`prompts` calibration prompts are sampled in FP32; `probes_per_bucket` of each one's steps per
    timestep bucket are the step-SQNR probes; `final_prompts` of them also get a sampler run per candidate."""

    version: int = 1
    prompts: int = 2
    probes_per_bucket: int = 1
    # a sampler run per candidate costs 2 x steps DiT calls against the probes' few: off by default on
    # 2 CPU cores, the chosen mix is verified end to end instead (engines/evaluation/auto_precision.py)
    final_prompts: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.probes_per_bucket < 1 or not 0 <= self.final_prompts <= self.prompts:
            raise ValueError("sensitivity settings need prompts >= 1, probes_per_bucket >= 1 and "
                             "0 <= final_prompts <= prompts")


def single_layer_recipe(base: Recipe, layer: str, precision: str) -> Recipe:
    """`base` with every layer kept in float except `layer`, which gets `precision`."""
    scheme = parse(precision)["scheme"]
    return dataclasses.replace(base, scheme=scheme, rules=(
        LayerRule("transformer.layers.*", "skip"), LayerRule(layer, "override", override(precision, base))))


def probe_steps(trajectory: Trajectory, edges: Sequence[float], per_bucket: int) -> list[int]:
    """Indices of `per_bucket` steps per timestep bucket, evenly spread over each bucket's steps."""
    spec = BucketSpec(tuple(edges))
    by_bucket: dict[int, list[int]] = {}
    for i, feeds in enumerate(trajectory.feeds):
        by_bucket.setdefault(spec.bucket_of(float(feeds["t"][0])), []).append(i)
    out = []
    for steps in by_bucket.values():
        picks = np.linspace(0, len(steps) - 1, min(per_bucket, len(steps))).round().astype(int)
        out += [steps[p] for p in sorted(set(picks.tolist()))]
    return sorted(out)


def _nsr(db: float) -> float:
    return 0.0 if db == math.inf else 10 ** (-db / 10)


def _db(nsr: float) -> float:
    return math.inf if nsr <= 0 else -10 * math.log10(nsr)


class Probe:
    """The FP32 reference on the probe steps and final latents, measured once; `measure` scores a session."""

    def __init__(self, reference: Any, trajectories: Sequence[Trajectory], edges: Sequence[float],
                 settings: SensitivitySettings, pipeline: Any, sampling: Any) -> None:
        self.steps = [(traj, i) for traj in trajectories for i in probe_steps(traj, edges, settings.probes_per_bucket)]
        self.reference = [reference.run(["v"], traj.feeds[i])[0] for traj, i in self.steps]
        self.final = list(trajectories[:settings.final_prompts])
        self.pipeline, self.sampling = pipeline, sampling

    def measure(self, session: Any) -> dict[str, float | None]:
        step = [sqnr_db(ref, session.run(["v"], traj.feeds[i])[0]) for ref, (traj, i) in zip(self.reference, self.steps)]
        nsr = float(np.mean([_nsr(s) for s in step]))
        out: dict[str, float | None] = {"step_sqnr_db": float(np.mean(step)), "step_nsr": nsr,
                                        "final_latent_snr_db": None, "final_nsr": None}
        if self.final:
            pipe = with_dit(self.pipeline, OrtDiT(session))
            snrs = [sqnr_db(t.latents.numpy(), pipe.generate_latents(generate_options(self.pipeline, t.prompt, t.seed,
                                                                                self.sampling)).numpy())
                    for t in self.final]
            out["final_nsr"] = float(np.mean([_nsr(s) for s in snrs]))
            out["final_latent_snr_db"] = float(np.mean(snrs))
        return {k: (None if v is None else (v if math.isfinite(v) else 1e9)) for k, v in out.items()}


def layer_groups(base_graph: Path, layers: Sequence[str]) -> dict[str, str]:
    """Per layer, the activation tensor it reads: layers reading one tensor share one activation quantizer,
    so they must get one scheme (exporter/passes/quantize.py refuses otherwise)."""
    import onnx

    from exporter.onnx.linear_nodes import locate_linears

    model = onnx.load(str(base_graph), load_external_data=False)
    return {n: s.activation for n, s in locate_linears(model, list(layers)).items()}


def measure_sensitivity(base_graph: Path, loaded: LoadedModel, calibration: Calibration, base: Recipe,
                        schemes: Sequence[str], probe: Probe, scratch: Path, fp32_bytes: int, base_bytes: int,
                        layers: Sequence[str] | None = None, dynamic_kernel: str = "dql", device: str = "cpu",
                        context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sensitivity document: per layer (all quantizable layers, or `layers`) and scheme, the step
    SQNR / final-latent SNR with only that layer quantized and the bytes it saves."""
    from exporter.models.layers import quantizable_linears

    modules = quantizable_linears(loaded.dit)
    names = list(layers) if layers is not None else list(modules)
    groups = layer_groups(base_graph, names)
    started = time.time()
    rows = []
    jobs = [(n, s) for n in names for s in schemes]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name, scheme in tqdm(jobs, desc="sensitivity", unit="graph"):
        session, size = graph_candidate(base_graph, loaded, calibration, single_layer_recipe(base, name, scheme),
                                        Path(scratch) / "sensitivity.onnx", dynamic_kernel, device)
        results[(name, scheme)] = {**probe.measure(session), "weight_bytes_delta": int(size - base_bytes)}
        del session
    for name in names:
        m = modules[name]
        rows.append({"name": name, "group": groups[name], "in_features": m.in_features, "out_features": m.out_features,
                     "schemes": {s: results[(name, s)] for s in schemes}})
    return {"schema_version": SCHEMA, "kind": KIND, **dict(context or {}), "schemes": list(schemes),
            "recipe": base.to_json(), "calibration_sha256": calibration.meta.get("artifact_sha256"),
            "fp32_weight_bytes": int(fp32_bytes), "base_weight_bytes": int(base_bytes),
            "probe": {"steps": len(probe.steps), "final_prompts": len(probe.final),
                      "prompts": sorted({t.prompt for t, _ in probe.steps}),
                      "t": [float(t.feeds[i]["t"][0]) for t, i in probe.steps]},
            "metric": "SQNR/SNR in dB against the FP32 graph with only this layer quantized; nsr = 10^(-dB/10), "
                      "the noise share that adds across layers",
            "seconds": round(time.time() - started, 1), "layers": rows}


def plot_sensitivity(doc: Mapping[str, Any], path: Path, assignment: Mapping[str, str] | None = None) -> None:
    """Step SQNR (and final-latent SNR where measured) per layer and scheme; the chosen precision of each
    layer (when given) is written under its tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["layers"]
    labels = [r["name"].replace("transformer.layers.", "L").replace("self_attn.", "sa.").replace("cross_attn.", "ca.")
              .replace("ff.ff.0.proj", "ff.in").replace("ff.ff.2", "ff.out") for r in rows]
    if assignment:
        labels = [f"{lab} [{assignment.get(r['name'], '?')}]" for lab, r in zip(labels, rows)]
    finals = any(r["schemes"][s]["final_latent_snr_db"] is not None for r in rows for s in doc["schemes"])
    fig, axes = plt.subplots(2 if finals else 1, 1, figsize=(max(8.0, 0.28 * len(rows) + 2), 7 if finals else 4),
                             squeeze=False, sharex=True)
    x = np.arange(len(rows))
    width = 0.8 / len(doc["schemes"])
    for ax, key, title in zip(axes[:, 0], ("step_sqnr_db", "final_latent_snr_db"),
                              ("step SQNR with only this layer quantized (dB)", "final-latent SNR (dB)")):
        for j, scheme in enumerate(doc["schemes"]):
            vals = [r["schemes"][scheme][key] for r in rows]
            ax.bar(x + (j - (len(doc["schemes"]) - 1) / 2) * width, [np.nan if v is None else min(v, 200) for v in vals],
                   width, label=scheme)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(doc["schemes"]))
    axes[0, 0].set_title("per-layer sensitivity against FP32 (lower = more sensitive)", fontsize=9)
    axes[-1, 0].set_xlim(-0.6, len(rows) - 0.4)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(labels, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
