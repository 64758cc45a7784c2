"""Mixed precision from measured sensitivity: the per-layer precisions that keep the DiT most faithful to FP32
within a weight-size budget, written as an ordinary recipe.

Each activation tensor's readers (one layer, or the six cross-attention `to_kv` layers that all read the
condition tokens) form a group with one precision, since they share one activation quantizer. A group's
options are float (the base graph's type: FP32 for ONNX Runtime, FP16 for TensorRT; it saves nothing) and
each scheme the target runs (w8a8, w4a16, w4a8 on ONNX Runtime; w8a8, fp8, w4a16 on TensorRT), costed by the
measured noise share of its layers (`engines/evaluation/sensitivity.py`: nsr adds across layers because
independent errors add in power) and the measured bytes they save. The choice is an exact multiple-choice
knapsack (dynamic programming over the
bytes, rounded up so the budget holds): minimise the summed nsr subject to base bytes + sum of deltas <=
budget x FP32 bytes. The stage then measures the chosen assignment end to end (held-out prompts, step SQNR
and final-latent SNR) beside the uniform schemes, and hands the recipe to the ordinary quantize and report
stages, so the export is exactly what `--recipe recipe.auto.json` reproduces.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from exporter.errors import InputError
from exporter.passes.recipe import LayerRule, Recipe

log = logging.getLogger(__name__)
FLOAT = "float"
OBJECTIVES = ("step_nsr", "final_nsr")
BINS = 4000  # resolution of the knapsack's byte axis (a 1/4000 of the free bytes: far below one layer)


@dataclass(frozen=True)
class Choice:
    """The chosen precision per layer, the predicted size (fraction of FP32) and predicted step SQNR."""

    assignment: dict[str, str]
    size_ratio: float
    predicted_step_sqnr_db: float
    predicted_final_snr_db: float | None
    budget: float


def _groups(doc: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in doc["layers"]:
        out.setdefault(row["group"], []).append(row)
    return out


def _total_db(rows: Sequence[Mapping[str, Any]], assignment: Mapping[str, str], key: str) -> float | None:
    values = [r["schemes"][assignment[r["name"]]][key] for r in rows if assignment[r["name"]] != FLOAT]
    if any(v is None for v in values):
        return None
    total = float(sum(values))
    return math.inf if total <= 0 else -10 * math.log10(total)


def predicted_size(doc: Mapping[str, Any], assignment: Mapping[str, str]) -> float:
    """Weight bytes of the assignment as a fraction of FP32: base bytes + the measured per-layer deltas."""
    delta = sum(r["schemes"][assignment[r["name"]]]["weight_bytes_delta"]
                for r in doc["layers"] if assignment[r["name"]] != FLOAT)
    return (doc["base_weight_bytes"] + delta) / doc["fp32_weight_bytes"]


def choose(doc: Mapping[str, Any], budget: float, objective: str = "step_nsr",
           schemes: Sequence[str] | None = None) -> Choice:
    """The assignment minimising the summed `objective` with weight bytes <= budget x FP32 bytes."""
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective '{objective}' (choose from: {', '.join(OBJECTIVES)})")
    schemes = list(schemes or doc["schemes"])
    groups = _groups(doc)
    options: list[list[tuple[str, float, float]]] = []  # per group: (precision, bytes delta, cost)
    for rows in groups.values():
        opts = [(FLOAT, 0.0, 0.0)]
        for s in schemes:
            costs = [r["schemes"][s][objective] for r in rows]
            if any(c is None for c in costs):
                raise InputError(f"objective {objective} was not measured (sensitivity final_prompts 0)")
            opts.append((s, float(sum(r["schemes"][s]["weight_bytes_delta"] for r in rows)), float(sum(costs))))
        options.append(opts)
    free = budget * doc["fp32_weight_bytes"] - doc["base_weight_bytes"] - sum(min(d for _, d, _ in o) for o in options)
    if free < 0:
        smallest = predicted_size(doc, {r["name"]: min(((s, r["schemes"][s]["weight_bytes_delta"]) for s in schemes),
                                                       key=lambda p: p[1])[0] for r in doc["layers"]})
        raise InputError(f"--size-budget {budget} is below the smallest size these layers reach "
                         f"({smallest:.3f} of FP32, every layer at its smallest scheme)")
    unit = max(free, 1.0) / BINS
    # dp[c]: least cost with c bins of extra bytes spent over every group's smallest option
    dp = np.zeros(BINS + 1)
    picks: list[np.ndarray] = []
    for opts in options:
        low = min(d for _, d, _ in opts)
        new = np.full(BINS + 1, np.inf)
        arg = np.zeros(BINS + 1, dtype=int)
        for k, (_, delta, cost) in enumerate(opts):
            extra = int(math.ceil((delta - low) / unit - 1e-9))
            if extra > BINS:
                continue
            cand = np.full(BINS + 1, np.inf)
            cand[extra:] = dp[:BINS + 1 - extra] + cost
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp = new
        picks.append(arg)
    c = int(np.argmin(dp))
    chosen: dict[str, str] = {}
    for opts, arg, rows in reversed(list(zip(options, picks, groups.values()))):
        k = int(arg[c])
        precision, delta, _ = opts[k]
        for r in rows:
            chosen[r["name"]] = precision
        c -= int(math.ceil((delta - min(d for _, d, _ in opts)) / unit - 1e-9))
    assignment = {r["name"]: chosen[r["name"]] for r in doc["layers"]}
    return Choice(assignment, predicted_size(doc, assignment), _total_db(doc["layers"], assignment, "step_nsr"),
                  _total_db(doc["layers"], assignment, "final_nsr"), float(budget))


def assignment_recipe(base: Recipe, assignment: Mapping[str, str]) -> Recipe:
    """An ordinary recipe for `assignment`: the most common quantized scheme at the top, one rule per layer
    that differs (`skip` for float, `override` of the scheme otherwise), in layer order, editable by hand."""
    from engines.evaluation.sensitivity import label, override, parse

    counts = Counter(p for p in assignment.values() if p != FLOAT)
    top = counts.most_common(1)[0][0] if counts else label(base.scheme, base.lowrank)
    recipe = replace(base, **parse(top))
    rules = []
    for name, precision in assignment.items():
        if precision == FLOAT:
            rules.append(LayerRule(name, "skip"))
        elif precision != top:
            rules.append(LayerRule(name, "override", override(precision, recipe)))
    return replace(recipe, rules=tuple(rules))


def uniform_recipe(base: Recipe, precision: str) -> Recipe:
    from engines.evaluation.sensitivity import parse

    return replace(base, **parse(precision), rules=())


def write_recipe(recipe: Recipe, path: Path) -> None:
    Path(path).write_text(json.dumps(recipe.to_json(), indent=1) + "\n")


def auto_precision_stage(loaded: Any, calibration: Any, base: Recipe, budget: float, target: str, scratch: Path,
                         sampling: Any, settings: Any, follow: Callable[[Recipe], Sequence[Callable]],
                         objective: str = "step_nsr", dynamic_kernel: str = "dql", device: str = "cpu"
                         ) -> Callable[[Path, dict[str, Any]], None]:
    """An export stage: measure sensitivity, choose the assignment for `budget`, verify it end to end, write
    sensitivity.json / sensitivity.png / recipe.auto.json, then run `follow(recipe)` (quantize, report)."""
    import onnx

    from engines.evaluation.accuracy import capture, evaluate, heldout_prompts
    from engines.evaluation.compare import graph_candidate
    from engines.evaluation.sensitivity import Probe, measure_sensitivity, parse, plot_sensitivity, precision_options
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline
    from engines.runtime.providers import session
    from exporter.onnx import graph_edit
    from exporter.onnx.torch_export import PROTOBUF_LIMIT
    from exporter.stages.quantized import base_graph, export_fp16_base

    schemes = precision_options(target, base.lowrank)

    def stage(tmp: Path, manifest: dict[str, Any]) -> None:
        entry = manifest["graphs"]["dit"]
        fp32 = Path(scratch) / "dit.fp32.onnx"
        graph_edit.save(onnx.load(str(tmp / entry["file"])), fp32, PROTOBUF_LIMIT)
        base_path = base_graph(scratch, target)
        if base_path != fp32:
            export_fp16_base(loaded, manifest["dims"], base_path)
        fp32_bytes = entry["weight_bytes"]
        base_bytes = graph_edit.weight_bytes(onnx.load(str(base_path)))
        smallest = replace(base, scheme="w4a16", lowrank=0, rules=())
        _, size = graph_candidate(base_path, loaded, calibration, smallest, Path(scratch) / "auto.smallest.onnx",
                                  dynamic_kernel, device)
        if size / fp32_bytes > budget:
            raise InputError(f"--size-budget {budget} is below the smallest size this model reaches "
                             f"({size / fp32_bytes:.3f} of FP32 with every layer at 4-bit weights)")
        pipeline = Pipeline(OrtBackend(tmp, manifest, device), manifest)
        reference = session(fp32, device=device)
        cal_prompts = calibration.meta["prompts"]["list"][:settings.prompts]
        probe = Probe(reference, capture(pipeline, reference, cal_prompts, sampling), calibration.edges, settings,
                      pipeline, sampling)
        doc = measure_sensitivity(base_path, loaded, calibration, base, schemes, probe, scratch, fp32_bytes,
                                  base_bytes, dynamic_kernel=dynamic_kernel, device=device,
                                  context={"model": loaded.identity, "target": target,
                                           "settings": {**dataclasses.asdict(settings), "steps": sampling.steps,
                                                        "seconds": sampling.seconds}})
        choice = choose(doc, budget, objective)
        recipe = assignment_recipe(base, choice.assignment)
        log.info("auto precision (budget %.3f): %s; predicted %.3f of FP32, step SQNR %.2f dB", budget,
                 dict(Counter(choice.assignment.values())), choice.size_ratio, choice.predicted_step_sqnr_db)
        prompts = heldout_prompts(calibration.meta["prompts"]["list"], sampling.prompts, sampling.heldout_seed)
        trajectories = capture(pipeline, reference, prompts, sampling)
        rows = []
        # the uniform references around the budget (w4a8 has w4a16's bytes and more error)
        candidates = [("auto", recipe)] + [(f"uniform {s}", uniform_recipe(base, s)) for s in schemes
                                           if parse(s)["scheme"] != "w4a8"]
        for i, (name, candidate) in enumerate(candidates):
            sess, size = graph_candidate(base_path, loaded, calibration, candidate, Path(scratch) / f"auto.{i}.onnx",
                                         dynamic_kernel, device)
            row = evaluate(name, sess, reference, trajectories, calibration.edges, pipeline, sampling)
            rows.append({"name": name, "size_ratio": size / fp32_bytes, **{k: row[k] for k in (
                "mean_step_sqnr_db", "min_step_sqnr_db", "final_latent_snr_db")}})
            del sess
        if rows[0]["size_ratio"] > budget + 1e-9:
            raise RuntimeError(f"the chosen assignment measures {rows[0]['size_ratio']:.4f} of FP32, over the budget "
                               f"{budget}: the per-layer byte deltas did not add up")
        # the knapsack adds per-layer step noise; what the user hears is the end of the sampler run, so of the
        # measured candidates within the budget the one with the best final-latent SNR is the export's
        k = pick_measured(rows, budget)
        chosen_name, recipe = candidates[k]
        if k:
            log.info("auto precision: %s measures a better final-latent SNR than the knapsack's mix within the "
                     "budget; exporting it", chosen_name)
        doc["auto_precision"] = {"budget": budget, "objective": objective, "assignment": choice.assignment,
                                 "chosen": chosen_name,
                                 "predicted_size_ratio": choice.size_ratio,
                                 "predicted_step_sqnr_db": choice.predicted_step_sqnr_db,
                                 "predicted_final_snr_db": choice.predicted_final_snr_db,
                                 "verification": {"prompts": prompts, "rows": rows}}
        (tmp / "sensitivity.json").write_text(json.dumps(doc, indent=1) + "\n")
        plot_sensitivity(doc, tmp / "sensitivity.png", choice.assignment)
        write_recipe(recipe, tmp / "recipe.auto.json")
        log.info("auto precision, held-out prompts:\n%s", "\n".join(
            f"  {r['name']:<14} {r['size_ratio']:.3f}x  step SQNR {r['mean_step_sqnr_db']:6.2f} dB  "
            f"final-latent SNR {r['final_latent_snr_db']:6.2f} dB" for r in rows))
        manifest["sensitivity"] = {"file": "sensitivity.json", "schema_version": doc["schema_version"],
                                   "plot": "sensitivity.png"}
        manifest["auto_precision"] = {"recipe": "recipe.auto.json", "budget": budget, "objective": objective,
                                      "chosen": chosen_name,
                                      "predicted_size_ratio": choice.size_ratio, "verification": rows}
        for follower in follow(recipe):
            follower(tmp, manifest)

    return stage


def pick_measured(rows: Sequence[Mapping[str, Any]], budget: float) -> int:
    """Index of the row within `budget` with the best final-latent SNR (ties: the earlier row, the knapsack's
    mix first); row 0 is always within the budget."""
    within = [i for i, r in enumerate(rows) if r["size_ratio"] <= budget + 1e-9]
    return max(within, key=lambda i: (rows[i]["final_latent_snr_db"], -i))


def check_arguments(auto: bool, budget: float | None, recipe_file: str | None) -> None:
    """The CLI's `--auto-precision --size-budget R` contract, before anything is loaded."""
    if not auto:
        raise InputError("--size-budget needs --auto-precision")
    if budget is None:
        raise InputError("--auto-precision needs --size-budget R (DiT weight bytes as a fraction of FP32, e.g. 0.2)")
    if not 0 < budget <= 1:
        raise InputError(f"--size-budget must be in (0, 1], got {budget}")
    if recipe_file:
        raise InputError("--auto-precision writes its own recipe; leave out --recipe (or export with the "
                         "recipe.auto.json it wrote instead)")


def stage_for_export(loaded: Any, calibration: Any, quant: Any, budget: float, scratch: Path, report: Any,
                     follow: Callable[[Recipe], Sequence[Callable]], device: str = "cpu") -> Callable:
    """`auto_precision_stage` with scripts/export.py's settings: the report's sampling (else 2 prompts at the
    default length) for the probes and the verification, the default sensitivity settings."""
    from engines.evaluation.accuracy import AccuracySettings
    from engines.evaluation.sensitivity import SensitivitySettings
    from engines.runtime.durations import pick_seconds

    sampling = report or AccuracySettings(prompts=2, seconds=pick_seconds(
        "--report-seconds", None, AccuracySettings.seconds, loaded.config, "auto precision"))
    return auto_precision_stage(loaded, calibration, quant.recipe, budget, quant.target, scratch, sampling,
                                SensitivitySettings(), follow, dynamic_kernel=quant.dynamic_kernel, device=device)
