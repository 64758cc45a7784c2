#!/usr/bin/env python
"""Reproduce the method comparison: every scheme x method x activation mode x bucket policy x low-rank rank
that quadit offers, plus the minmax and ModelOpt baselines at equal bits, on one model, one calibration
artifact and one set of held-out prompts. Writes comparison.json, comparison.md and comparison.png."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import add_model_args, model_spec, run, setup_logging  # noqa: E402

log = logging.getLogger("compare")

# (scheme, method, activations, bucket policy, rank)
GRID = [
    ("w8a8", "minmax", "static", "shared", 0),
    ("w8a8", "smoothquant", "static", "shared", 0),
    ("w8a8", "smoothquant", "static", "per-bucket-scale", 0),
    ("w8a8", "timestep-smoothquant", "static", "shared", 0),
    ("w8a8", "timestep-smoothquant", "static", "per-bucket-scale", 0),
    ("w8a8", "timestep-smoothquant", "static", "per-bucket-graph", 0),
    ("w8a8", "timestep-smoothquant", "static", "per-bucket-scale", 32),
    ("w8a8", "timestep-smoothquant", "dynamic", "shared", 0),
    ("w8a8", "timestep-smoothquant", "dynamic", "shared", 32),
    ("w4a16", "minmax", "static", "shared", 0),
    ("w4a16", "minmax", "static", "shared", 32),
    ("w4a16", "smoothquant", "static", "shared", 0),
    ("w4a16", "timestep-smoothquant", "static", "shared", 0),
    ("w4a16", "timestep-smoothquant", "static", "shared", 32),
    ("w4a8", "minmax", "static", "shared", 0),
    ("w4a8", "timestep-smoothquant", "static", "per-bucket-scale", 0),
    ("w4a8", "timestep-smoothquant", "static", "per-bucket-scale", 32),
    ("w4a8", "timestep-smoothquant", "dynamic", "shared", 0),
    ("w4a8", "timestep-smoothquant", "dynamic", "shared", 32),
]


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    names = [r["name"] for r in rows][::-1]
    ax.barh(names, [r["mean_step_sqnr_db"] for r in rows][::-1], color=[
        "#999999" if r["name"].startswith(("minmax", "ModelOpt")) else "#3b6fb6" for r in rows][::-1])
    ax.set_xlabel("mean per-step DiT output SQNR vs FP32 (dB, held-out prompts)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--calibration", required=True, help="calibration artifact directory")
    parser.add_argument("--extra-calibration", action="append", default=[], metavar="NAME=DIR",
                        help="also run w8a8 timestep-smoothquant per-bucket-scale with another artifact "
                             "(e.g. an activation-aware vs a uniform sample selection)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=None,
                        help="audio length of the trajectories (default: 3, or the model's window if shorter)")
    parser.add_argument("--schemes", default="w8a8,w4a16,w4a8")
    parser.add_argument("--no-modelopt", action="store_true")
    parser.add_argument("--modelopt-prompts", type=int, default=2,
                        help="calibration prompts ModelOpt calibrates on (all their steps; AWQ's search is slow on CPU)")
    parser.add_argument("--cache", help="JSON-lines file of finished rows, reused when rerun with the same settings")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    import dataclasses

    from engines.accuracy import AccuracySettings, capture, evaluate, heldout_prompts, markdown
    from engines.backends import OrtBackend
    from engines.compare import graph_candidate, modelopt_candidate
    from engines.runtime import Pipeline
    from exporter.artifacts import atomic_dir
    from exporter.export import ExportOptions, export_model
    from exporter.models import load_model
    from exporter.onnx_export import ort_session
    from exporter.quantized_export import read_calibration
    from exporter.recipe import Recipe

    schemes = [s for s in args.schemes.split(",") if s and s != "none"]
    loaded = load_model(model_spec(args))
    from engines.durations import pick_seconds

    settings = AccuracySettings(prompts=args.prompts, steps=args.steps, seconds=pick_seconds(
        "--seconds", args.seconds, AccuracySettings.seconds, loaded.config, "comparison"))
    calibration = read_calibration(Path(args.calibration), loaded)
    extra = {}
    for item in args.extra_calibration:
        name, _, path = item.partition("=")
        extra[name] = read_calibration(Path(path), loaded)
    scratch = Path(tempfile.mkdtemp(prefix="quadit-compare-"))
    started = time.time()
    try:
        export = export_model(loaded, scratch / "fp32", ExportOptions(scheme="fp32"))
        fp32 = scratch / "fp32" / export["graphs"]["dit"]["file"]
        fp32_bytes = export["graphs"]["dit"]["weight_bytes"]
        pipeline = Pipeline(OrtBackend(scratch / "fp32", export), export)
        reference = ort_session(fp32)
        prompts = heldout_prompts(calibration.meta["prompts"]["list"], settings.prompts, settings.heldout_seed)
        trajectories = capture(pipeline, reference, prompts, settings)
        cal_traj = None
        rows = []
        jobs = [(calibration, "", Recipe(scheme=s, method=m, activations=a, bucket_policy=p, lowrank=r))
                for s, m, a, p, r in GRID if s in schemes]
        jobs += [(cal, f" [{name} calibration]", Recipe(scheme="w8a8", method="timestep-smoothquant"))
                 for name, cal in extra.items()]
        cache_key = json.dumps([loaded.identity, dataclasses.asdict(settings), calibration.meta["artifact_sha256"],
                                args.modelopt_prompts, prompts], sort_keys=True)
        cached = {}
        if args.cache and Path(args.cache).is_file():
            for line in Path(args.cache).read_text().splitlines():
                entry = json.loads(line)
                if entry["key"] == cache_key:
                    cached[entry["row"]["name"]] = entry["row"]

        def keep(row: dict) -> None:
            rows.append(row)
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps({"key": cache_key, "row": row}, default=str) + "\n")

        for i, (cal, tag, recipe) in enumerate(jobs):
            name = (f"{recipe.scheme} {recipe.method} {recipe.activations} {recipe.bucket_policy}"
                    f"{f' rank {recipe.lowrank}' if recipe.lowrank else ''}{tag}")
            log.info("[%d/%d] %s", i + 1, len(jobs), name)
            if name in cached:
                rows.append(cached[name])
                continue
            session, size = graph_candidate(fp32, loaded, cal, recipe, scratch / f"cand{i}.onnx")
            row = evaluate(name, session, reference, trajectories, cal.edges, pipeline, settings)
            graphs = len(cal.edges) - 1 if recipe.bucket_policy == "per-bucket-graph" else 1
            row.update({"recipe": recipe.to_json(), "size_ratio": size / fp32_bytes, "graphs": graphs,
                        "total_size_ratio": graphs * size / fp32_bytes})
            keep(row)
        if not args.no_modelopt:
            count = min(len(calibration.meta["prompts"]["list"]), args.modelopt_prompts)
            for scheme in schemes:
                from engines.modelopt_baseline import MODELOPT_CONFIGS

                name = f"ModelOpt {scheme} {MODELOPT_CONFIGS[scheme]}"
                log.info("%s", name)
                if name in cached:
                    rows.append(cached[name])
                    continue
                if cal_traj is None:
                    cal_traj = capture(pipeline, reference, calibration.meta["prompts"]["list"][:count], settings)
                session, info = modelopt_candidate(loaded, scheme, cal_traj)
                row = evaluate(name, session, reference, trajectories, calibration.edges, pipeline, settings)
                row["modelopt"] = info
                keep(row)
        with atomic_dir(Path(args.out)) as tmp:
            context = {"model": loaded.identity, "prompts": prompts, "settings": dataclasses.asdict(settings),
                       "calibration_sha256": calibration.meta["artifact_sha256"], "rows": rows,
                       "seconds": round(time.time() - started, 1),
                       "extra_calibrations": {k: v.meta["artifact_sha256"] for k, v in extra.items()}}
            (tmp / "comparison.json").write_text(json.dumps(context, indent=1, default=str) + "\n")
            table = markdown(rows, f"Method comparison on {loaded.identity['model']} ({loaded.identity['weights']})")
            (tmp / "comparison.md").write_text(table)
            _chart(rows, tmp / "comparison.png")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table)
    return 0


if __name__ == "__main__":
    run(main)
