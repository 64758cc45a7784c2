"""Reproduce the method comparison: quadit's candidates (a grid of recipes), plus the minmax baseline, ModelOpt
and ONNX Runtime's own quantizer at equal bits, on one model (a test bed), one calibration artifact and one
set of held-out prompts: mean step SQNR, final-latent SNR and decoded-audio SNR against FP32. Writes
comparison.json, comparison.md and comparison.png; `--combine DIR ...` puts several beds in one table
(scripts/compare_all.sh runs both test beds end to end)."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from engines.runtime.logs import setup_logging
from exporter.models.cli_args import model_spec
from exporter.passes.recipe import ROUND_TO_NEAREST

log = logging.getLogger("compare")

# The candidate grids. One quadit row is one dict of Recipe fields (what is not given keeps the Recipe's
# default); a new recipe field is one more key, a new row one more line. Rows are named from their fields
# (`candidate_name`), so a row's name, and its --cache entry, stay the same when other rows are added.
def q(scheme: str, method: str, activations: str = "static", bucket_policy: str = "shared", lowrank: int = 0,
      **fields: object) -> dict:
    return {"scheme": scheme, "method": method, "activations": activations, "bucket_policy": bucket_policy,
            "lowrank": lowrank, **fields}


FULL = [
    q("w8a8", "minmax"),
    q("w8a8", "smoothquant"),
    q("w8a8", "smoothquant", bucket_policy="per-bucket-scale"),
    q("w8a8", "timestep-smoothquant"),
    q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-scale"),
    q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-graph"),
    q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-scale", lowrank=32),
    q("w8a8", "timestep-smoothquant", "dynamic"),
    q("w8a8", "timestep-smoothquant", "dynamic", lowrank=32),
    q("w4a16", "minmax"),
    q("w4a16", "minmax", lowrank=32),
    q("w4a16", "smoothquant"),
    q("w4a16", "timestep-smoothquant"),
    q("w4a16", "timestep-smoothquant", lowrank=32),
    q("w4a8", "minmax"),
    q("w4a8", "timestep-smoothquant", bucket_policy="per-bucket-scale"),
    q("w4a8", "timestep-smoothquant", bucket_policy="per-bucket-scale", lowrank=32),
    q("w4a8", "timestep-smoothquant", "dynamic"),
    q("w4a8", "timestep-smoothquant", "dynamic", lowrank=32),
]
# round to nearest with abs-max scales and the noise-model smoothing search: quadit before issue 14's passes
RTN = ROUND_TO_NEAREST
# issue 14's rows: quadit's deployable defaults per scheme (GPTQ, MSE weight clip, loss-driven smoothing),
# the same without those passes, and minmax (and the peers below)
ISSUE14 = [
    q("w8a8", "minmax", **RTN),
    q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-scale", **RTN),
    q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-scale"),
    q("w4a16", "timestep-smoothquant", **RTN),
    q("w4a16", "timestep-smoothquant"),
    q("w4a16", "timestep-smoothquant", lowrank=32),
    q("w4a8", "timestep-smoothquant", "dynamic", **RTN),
    q("w4a8", "timestep-smoothquant", "dynamic"),
]
# issue 22: FP8 E4M3 (TensorRT's; on the FP32 graph with exact Q/DQ like every row): minmax, quadit's defaults, and
# with FP8 attention cores (exporter/passes/fp8_attention.py; needs an artifact with attention statistics)
FP8 = [
    q("fp8", "minmax", **RTN),
    q("fp8", "timestep-smoothquant", bucket_policy="per-bucket-scale"),
    q("fp8", "timestep-smoothquant", bucket_policy="per-bucket-scale", attention_quant="fp8"),
]
GRIDS = {"full": FULL + FP8, "issue14": ISSUE14, "issue22": FP8}


def ort_peers():
    """ONNX Runtime's quantizer at its best documented settings, one line per row: static QDQ with symmetric
    per-channel INT8 weights and symmetric INT8 activations (the setting its docs give for TensorRT/GPU, and the
    one that is exact under TensorRT's arithmetic), per calibration method (Entropy also with 2048 histogram
    bins: through quantize_static its calibrator has 128 bins for 128 quantized bins, so one candidate
    threshold, the full range, and it equals MinMax); dynamic INT8 (per-channel
    weights, uint8 activations per tensor at run time, MatMul with a constant weight only); the docs' x86 CPU setting
    (asymmetric uint8 activations) once; 4-bit weight-only
    MatMulNBits (block 128, asymmetric: its default) for w4a16."""
    from engines.evaluation.ort_quantizer_baseline import OrtQuantSettings as O

    # without OpTypesToExcludeOutputQuantization quantize_static also puts a Q/DQ on every MatMul's output
    # (8-bit rounding that quadit, ModelOpt and TensorRT's placement rules leave out): not equal bits
    sym = (("ActivationSymmetric", True), ("WeightSymmetric", True), ("OpTypesToExcludeOutputQuantization", ("MatMul", "Gemm")))
    return [
        O("w8a8", "static", "MinMax", extra_options=sym),
        O("w8a8", "static", "Percentile", extra_options=sym + (("CalibPercentile", 99.999),)),
        O("w8a8", "static", "Entropy", extra_options=sym),  # as quantize_static runs it: 128 bins, one threshold
        O("w8a8", "static", "MinMax", activation_type="QUInt8", extra_options=sym[2:]),  # the docs' x86 CPU setting
        O("w8a8", "dynamic", extra_options=(("MatMulConstBOnly", True),)),
        O("w4a16", "nbits"),
        O("w8a8", "static", "Entropy", extra_options=sym, calibrator_options=(("num_bins", 2048),)),
    ]


def candidate_name(fields: dict) -> str:
    """`scheme method activations bucket-policy[ rank R][ field=value ...]` (fields beyond those five)."""
    head = f"{fields['scheme']} {fields['method']} {fields['activations']} {fields['bucket_policy']}"
    rank = f" rank {fields['lowrank']}" if fields.get("lowrank") else ""
    rest = "".join(f" {k}={v}" for k, v in fields.items()
                   if k not in ("scheme", "method", "activations", "bucket_policy", "lowrank"))
    return head + rank + rest


EXACT_NOTE = "exact Q/DQ (session.disable_quant_qdq)"


def _same_recipe(cached: dict | None, recipe) -> bool:
    """A cached row's recipe equals `recipe`, read as a Recipe (so a field added since, at its default, is
    the same recipe); an unreadable one is not."""
    from exporter.errors import InputError
    from exporter.passes.recipe import Recipe

    try:
        return cached is not None and Recipe.from_json(cached) == recipe
    except (InputError, TypeError, KeyError, ValueError):
        return False


def execute(args: argparse.Namespace) -> int:
    """`quadit compare` after argument parsing (the parser: `engines.cli.compare`)."""
    setup_logging(args.verbose)

    from engines.evaluation.compare_table import chart, combine
    from exporter.errors import InputError

    if args.combine:
        print(combine([Path(d) for d in args.combine], Path(args.out)))
        return 0
    if not args.calibration:
        raise InputError("--calibration DIR is required (or --combine DIR ...)")
    if args.grid not in GRIDS:
        raise InputError(f"unknown --grid '{args.grid}' (choose from: {', '.join(GRIDS)})")
    schemes = [s for s in args.schemes.split(",") if s and s != "none"]
    unknown = set(schemes) - {"w8a8", "w4a16", "w4a8", "fp8"}
    if unknown:
        raise InputError(f"unknown scheme(s) in --schemes: {', '.join(sorted(unknown))}")

    import dataclasses

    from engines.evaluation.accuracy import AccuracySettings, capture, evaluate, fused_columns, heldout_prompts, markdown
    from engines.evaluation.compare import EXACT_QDQ, graph_candidate, modelopt_candidate, ort_quantizer_candidate
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline
    from exporter.models import load_model
    from exporter.onnx.artifacts import atomic_dir
    from exporter.onnx.torch_export import ort_session
    from exporter.passes.recipe import Recipe
    from exporter.stages.export import ExportOptions, export_model
    from exporter.stages.quantized import read_calibration

    grid = [fields for fields in GRIDS[args.grid] if fields["scheme"] in schemes]
    recipes = [Recipe(**fields) for fields in grid]  # bad fields fail here, before any work
    files = [recipe_file(item) for item in args.recipe_row]
    peers = [] if args.no_ort else [p for p in ort_peers() if p.scheme in schemes]
    loaded = load_model(model_spec(args))
    from engines.runtime.durations import pick_seconds

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
        prompts = heldout_prompts(calibration.meta["prompts"]["list"], settings.prompts, settings.heldout_seed)
        state: dict = {}

        def fp32_state() -> dict:
            """The FP32 export, its pipeline and the held-out FP32 trajectories, made when a row first needs them
            (a rerun whose rows are all in --cache only rewrites the table)."""
            if not state:
                export = export_model(loaded, scratch / "fp32", ExportOptions(scheme="fp32"))
                state["fp32"] = scratch / "fp32" / export["graphs"]["dit"]["file"]
                state["fp32_bytes"] = export["graphs"]["dit"]["weight_bytes"]
                state["pipeline"] = Pipeline(OrtBackend(scratch / "fp32", export), export)
                state["reference"] = ort_session(state["fp32"])
                state["trajectories"] = capture(state["pipeline"], state["reference"], prompts, settings)
            return state

        def run_eval(name: str, session, sampler: bool = True) -> dict:
            st = fp32_state()
            return evaluate(name, session, st["reference"], st["trajectories"], calibration.edges, st["pipeline"],
                            settings, sampler=sampler)

        count = min(len(calibration.meta["prompts"]["list"]), args.modelopt_prompts)
        cal_traj = []
        missing: list[str] = []
        rows = []
        jobs = [(calibration, "", recipe, candidate_name(fields)) for fields, recipe in zip(grid, recipes)]
        jobs += [(calibration, "", recipe, name) for name, recipe in files]
        jobs += [(cal, f" [{name} calibration]", Recipe(scheme="w8a8", method="timestep-smoothquant"),
                  f"w8a8 timestep-smoothquant static per-bucket-scale [{name} calibration]")
                 for name, cal in extra.items()]
        # rows of version 2 carry the decoded-audio SNR and the exact/fused split
        cache_key = json.dumps([3, loaded.identity, dataclasses.asdict(settings), calibration.meta["artifact_sha256"],
                                args.modelopt_prompts, prompts, args.fused], sort_keys=True)
        cached = {}
        if args.cache and Path(args.cache).is_file():
            for line in Path(args.cache).read_text().splitlines():
                entry = json.loads(line)
                if entry["key"] == cache_key:
                    cached[entry["row"]["name"]] = entry["row"]

        def reuse(name: str) -> bool:
            """True when the row needs no work: it is in --cache (then it is kept), or --cached-only is set
            (then it is listed as not measured)."""
            if name in cached:
                rows.append(cached[name])
                return True
            if args.cached_only:
                missing.append(name)
            return args.cached_only

        def keep(row: dict) -> None:
            rows.append(row)
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps({"key": cache_key, "row": row}, default=str) + "\n")

        def calibration_trajectories() -> list:
            if not cal_traj:
                st = fp32_state()
                cal_traj.extend(capture(st["pipeline"], st["reference"], calibration.meta["prompts"]["list"][:count],
                                        settings))
            return cal_traj

        def measure(name: str, make, int8_static: bool) -> dict:
            """Evaluate a graph candidate; `make(session_config)` -> (session, size, info). Static Q/DQ runs
            with exact Q/DQ arithmetic, and where its activations are INT8, also with ORT's fused kernels."""
            session, size, info = make(EXACT_QDQ if int8_static is not None else None)
            row = run_eval(name, session)
            row.update({"size_ratio": size / fp32_state()["fp32_bytes"], **info,
                        "arithmetic": EXACT_NOTE if int8_static is not None else "ONNX Runtime kernels"})
            if int8_static and args.fused != "none":
                session, _, _ = make(None)
                fused = run_eval(name, session, sampler=args.fused == "full")
                row["fused"] = fused_columns(fused)
            return row

        for i, (cal, _tag, recipe, name) in enumerate(jobs):
            log.info("[%d/%d] %s", i + 1, len(jobs), name)
            if name in cached and not _same_recipe(cached[name].get("recipe"), recipe):
                del cached[name]  # the row's recipe changed (a recipe file, or Recipe's defaults): measure again
            if reuse(name):
                continue

            def make(config, cal=cal, recipe=recipe, i=i):
                st = fp32_state()
                session, size = graph_candidate(st["fp32"], loaded, cal, recipe, scratch / f"cand{i}.onnx",
                                                session_config=config)
                graphs = len(cal.edges) - 1 if recipe.bucket_policy == "per-bucket-graph" else 1
                return session, size, {"recipe": recipe.to_json(), "graphs": graphs,
                                       "total_size_ratio": graphs * size / st["fp32_bytes"]}

            static = recipe.activations == "static"
            # fp8's activations are not INT8: ORT has no fused kernel to compare (exact Q/DQ only)
            keep(measure(name, make, (recipe.scheme not in ("w4a16", "fp8")) if static else None))
        if not args.no_modelopt:
            from engines.evaluation.modelopt_baseline import MODELOPT_CONFIGS

            for scheme in schemes:
                name = f"ModelOpt {scheme} {MODELOPT_CONFIGS[scheme]}"
                log.info("%s", name)
                if reuse(name):
                    continue
                session, info = modelopt_candidate(loaded, scheme, calibration_trajectories())
                row = run_eval(name, session)
                row.update({"modelopt": info, "arithmetic": "PyTorch fake quantization"})
                keep(row)
        for i, peer in enumerate(peers):
            name = f"ORT {peer.label()}"
            log.info("[ORT %d/%d] %s", i + 1, len(peers), name)
            if reuse(name):
                continue

            def make(config, peer=peer, i=i):
                session, size, record = ort_quantizer_candidate(fp32_state()["fp32"], loaded, peer,
                                                                calibration_trajectories(), scratch / f"ort{i}.onnx",
                                                                config)
                return session, size, {"onnxruntime_quantizer": record}

            try:
                keep(measure(name, make, True if peer.mode == "static" else None))
            except Exception as exc:  # noqa: BLE001 (a peer that does not run on these graphs is a finding)
                log.warning("%s did not run on this graph: %s", name, exc)
                rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300], "buckets": [],
                             "mean_step_sqnr_db": None, "min_step_sqnr_db": None, "mean_cosine": None})
        with atomic_dir(Path(args.out)) as tmp:
            context = {"model": loaded.identity, "prompts": prompts, "settings": dataclasses.asdict(settings),
                       "calibration_sha256": calibration.meta["artifact_sha256"], "rows": rows, "grid": args.grid,
                       "calibration_prompts_for_peers": count, "not_measured": missing,
                       "seconds": round(time.time() - started, 1),
                       "extra_calibrations": {k: v.meta["artifact_sha256"] for k, v in extra.items()}}
            (tmp / "comparison.json").write_text(json.dumps(context, indent=1, default=str) + "\n")
            table = markdown([r for r in rows if "error" not in r],
                             f"Method comparison on {loaded.identity['model']} ({loaded.identity['weights']})")
            failed = [f"- {r['name']}: did not run ({r['error']})" for r in rows if "error" in r] + \
                     [f"- {name}: not measured (not in --cache)" for name in missing]
            (tmp / "comparison.md").write_text(table + ("\n" + "\n".join(failed) + "\n" if failed else ""))
            chart([r for r in rows if "error" not in r], tmp / "comparison.png", bed_title(loaded.identity))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table)
    return 0


def recipe_file(item: str):
    """`NAME=FILE` -> (NAME, the Recipe in FILE); a bad item or file is an InputError (one line, exit 2)."""
    from exporter.errors import InputError
    from exporter.passes.recipe import read_recipe

    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--recipe-row wants NAME=FILE, got {item!r}")
    return name, read_recipe(path)


def bed_title(identity: dict) -> str:
    return f"{identity['model']} ({identity['weights']})"
