"""Accuracy checks of a deployed DiT against FP32 with Polygraphy, on DiT inputs saved by the export.

A quantized export's report stage keeps, in `check/`, `per_bucket` DiT inputs of every timestep bucket taken
from the FP32 sampler trajectories of its held-out prompts (`inputs.json`, Polygraphy's saved-inputs format:
`polygraphy run --load-inputs` or `--data-loader-script engines/evaluation/polygraphy_loader.py` read it), the bucket of
each (`buckets.json`) and the FP32 graph's outputs on them (`reference_outputs.json`, a Polygraphy
`RunResults` of runner `fp32-onnxrt`, for `--load-outputs`). The FP32 graph itself is not in the export.

`run_checks` runs the export's DiT in ONNX Runtime (and, given engines and TensorRT, its engines) on those
inputs with Polygraphy's `Comparator` and compares each with the FP32 outputs: Polygraphy's error statistics,
SNR and cosine (its verdict: the means reach the thresholds, no NaN), and, computed here, SQNR and cosine per
timestep bucket. A comparison passes when the mean SQNR / cosine over all inputs and over each bucket's
inputs reach the recipe's `check_thresholds()`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, RunResults, SimpleCompareFunc, SnrCompareFunc
from polygraphy.datatype import DataType
from polygraphy.exception import PolygraphyException
from polygraphy.json import load_json, save_json
from polygraphy.logger import G_LOGGER

from calibration.collector import BucketSpec
from engines.evaluation.accuracy import Trajectory, cosine, sqnr_db
from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_file, read_manifest

log = logging.getLogger(__name__)

CHECK_DIR, INPUTS, BUCKETS, REFERENCE = "check", "inputs.json", "buckets.json", "reference_outputs.json"
REPORT = "check_report.json"
SCHEMA = 1
REFERENCE_RUNNER = "fp32-onnxrt"
FEEDS = ("x", "t", "cross_attn_cond", "global_embed")


def write_check_data(directory: Path, reference_session: Any, trajectories: Sequence[Trajectory],
                     edges: Sequence[float], per_bucket: int = 2) -> dict[str, Any]:
    """Save `per_bucket` inputs of every bucket (evenly spread over the bucket's steps, all trajectories in
    order) and the FP32 `reference_session`'s outputs on them under `directory/check/`; returns the
    manifest's `check` entry."""
    if per_bucket < 1:
        raise ValueError("per_bucket must be >= 1")
    spec = BucketSpec(tuple(float(e) for e in edges))
    steps: dict[int, list[tuple[int, int, dict[str, np.ndarray]]]] = {k: [] for k in range(spec.count)}
    for i, traj in enumerate(trajectories):
        for s, feeds in enumerate(traj.feeds):
            steps[spec.bucket_of(float(feeds["t"][0]))].append((i, s, feeds))
    chosen, buckets, sources, outputs = [], [], [], []
    for k, rows in steps.items():
        if not rows:
            log.warning("check data: no sampler step falls in timestep bucket %d (t %.4g..%.4g)", k,
                        spec.edges[k], spec.edges[k + 1])
            continue
        for j in sorted({int(round(v)) for v in np.linspace(0, len(rows) - 1, min(per_bucket, len(rows)))}):
            i, s, feeds = rows[j]
            feed = OrderedDict((n, np.ascontiguousarray(feeds[n], dtype=np.float32)) for n in FEEDS)
            chosen.append(feed)
            outputs.append({"v": np.asarray(reference_session.run(["v"], dict(feed))[0], dtype=np.float32)})
            buckets.append(k)
            sources.append({"prompt": trajectories[i].prompt, "seed": trajectories[i].seed, "step": s,
                            "t": float(feeds["t"][0])})
    if not chosen:
        raise ValueError("check data: the trajectories have no DiT inputs")
    out = Path(directory) / CHECK_DIR
    out.mkdir(parents=True, exist_ok=True)
    reference = RunResults()
    reference.add(outputs, runner_name=REFERENCE_RUNNER)
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        save_json(chosen, str(out / INPUTS), description="quadit check inputs")
        reference.save(str(out / REFERENCE))
    (out / BUCKETS).write_text(json.dumps({
        "schema_version": SCHEMA, "kind": "quadit-check-inputs", "edges": list(spec.edges), "buckets": buckets,
        "inputs": sources, "reference": {"runner": REFERENCE_RUNNER, "graph": "FP32 DiT graph, ONNX Runtime"}},
        indent=1) + "\n")
    log.info("check data: %d DiT inputs over %d bucket(s) in %s", len(chosen), len(set(buckets)), out)
    return {"dir": f"{CHECK_DIR}/", "inputs": len(chosen), "per_bucket": per_bucket, "reference": REFERENCE_RUNNER}


def load_check_data(export_dir: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The saved inputs and `buckets.json`; InputError (saying how to make them) when absent."""
    directory = Path(export_dir) / CHECK_DIR
    make = "scripts/export.py --scheme w8a8|w4a16|w4a8 --report-prompts N (N >= 1) writes it"
    if "quantization" not in manifest:
        raise InputError(f"{export_dir} has no {CHECK_DIR}/ data: it is a '{manifest.get('scheme', 'fp32')}' "
                         f"export, and check compares a quantized DiT with FP32; {make}")
    if not (directory / INPUTS).is_file() or not (directory / BUCKETS).is_file():
        raise InputError(f"{export_dir} has no {CHECK_DIR}/ data (exported with --report-prompts 0 or by an "
                         f"older quadit): re-export it; {make}")
    try:
        meta = json.loads((directory / BUCKETS).read_text())
        inputs = list(load_json(str(directory / INPUTS), description="quadit check inputs"))
    except (OSError, ValueError, PolygraphyException) as exc:
        raise InputError(f"{directory} is unreadable ({type(exc).__name__}): re-export to rewrite it") from None
    if meta.get("schema_version") != SCHEMA or len(meta.get("buckets", ())) != len(inputs):
        raise InputError(f"{directory}: {BUCKETS} (schema {meta.get('schema_version')}, "
                         f"{len(meta.get('buckets', ()))} buckets) does not describe the {len(inputs)} saved inputs")
    return inputs, meta


class DiTSessionRunner(BaseRunner):
    """The export's DiT as quadit runs it in ONNX Runtime (`engines.runtime.backends.dit_session`: the manifest's
    `ort_session_config`, per-bucket graphs behind one `run`) as a Polygraphy runner."""

    def __init__(self, export_dir: Path, entry: dict[str, Any], name: str | None = None, device: str = "cpu") -> None:
        super().__init__(name=name, prefix="quadit-dit-onnxrt")
        self.export_dir, self.entry, self.device = Path(export_dir), entry, device
        self.providers: list[str] = []

    def activate_impl(self) -> None:
        from engines.runtime.backends import dit_session, session_providers

        try:
            self.session = dit_session(self.export_dir, self.entry, self.device)
            self.providers = session_providers(self.session)
        except InputError:
            raise
        except Exception as exc:  # onnxruntime's own error types: a graph it cannot load is bad input
            raise InputError(f"ONNX Runtime cannot load the DiT of {self.export_dir}: "
                             f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for node in getattr(self.session, "sessions", [self.session])[0].get_inputs():
            meta.add(node.name, dtype=DataType.from_dtype(node.type, "onnxruntime"), shape=node.shape)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        v = self.session.run(["v"], {n: np.asarray(a) for n, a in feed_dict.items()})[0]
        self.inference_time = time.perf_counter() - start
        return OrderedDict(v=v)

    def deactivate_impl(self) -> None:
        del self.session


class TrtDiTRunner(BaseRunner):
    """The DiT engine(s) of an engines directory through `engines.runtime.tensorrt` (metadata checked against this
    machine and export; per-bucket engines chosen from t by `TrtDiT`) as a Polygraphy runner."""

    def __init__(self, engines_dir: Path, export_dir: Path, name: str | None = None) -> None:
        super().__init__(name=name, prefix="quadit-dit-tensorrt")
        self.engines_dir, self.export_dir = Path(engines_dir), Path(export_dir)

    def activate_impl(self) -> None:
        from engines.runtime.tensorrt import ENGINES_JSON, EngineRunner, TrtDiT, check_engine_metadata, load_engine

        meta = check_engine_metadata(self.engines_dir / ENGINES_JSON, self.export_dir)
        entries = meta["engines"]
        names = sorted((n for n, e in entries.items() if e["graph"] == "dit"),
                       key=lambda n: (entries[n]["bucket"] or {}).get("index", 0))
        runners = [EngineRunner(load_engine(self.engines_dir / entries[n]["engine"]), n) for n in names]
        self.dit = TrtDiT(runners, BucketSpec(tuple(meta["bucket_edges"])) if len(names) > 1 else None)

    def get_input_metadata_impl(self) -> TensorMetadata:
        first, meta = self.dit.runners[0], TensorMetadata()
        for n in first.inputs:  # a dimension is fixed only where every profile's min and max agree on it
            bounds = [shape for profile in first.profiles for shape in (profile[n][0], profile[n][2])]
            shape = [dims[0] if len(set(dims)) == 1 else None for dims in zip(*bounds)]
            meta.add(n, dtype=DataType.from_dtype(first.dtypes[n], "torch"), shape=shape)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in FEEDS]
        start = time.perf_counter()
        v = self.dit.run(*args).cpu()  # CPU inputs: EngineRunner copies the output back, which waits for it
        self.inference_time = time.perf_counter() - start
        return OrderedDict(v=v.numpy())

    def deactivate_impl(self) -> None:
        del self.dit


def _compare(reference: RunResults, candidate: RunResults, buckets: Sequence[int], edges: Sequence[float],
             thresholds: dict[str, float]) -> dict[str, Any]:
    (ref_name, ref_iters), (name, iters) = next(iter(reference.items())), next(iter(candidate.items()))
    funcs = [SimpleCompareFunc(check_error_stat="max", atol=math.inf, rtol=math.inf),  # statistics (NaN fails)
             SnrCompareFunc(snr_threshold=thresholds["min_sqnr_db"]),
             CosineSimilarityCompareFunc(cosine_similarity_threshold=thresholds["min_cosine"])]
    accuracy = Comparator.compare_accuracy([reference, candidate], compare_func=funcs, check_average=True)
    simple, snr, cos = (a[(ref_name, name)] for a in accuracy)
    rows = []
    for i, (r, c) in enumerate(zip(ref_iters, iters)):
        ref, out, stats = np.asarray(r["v"]), np.asarray(c["v"]), simple[i]["v"]
        rows.append({"index": i, "bucket": int(buckets[i]), "sqnr_db": sqnr_db(ref, out), "cosine": cosine(ref, out),
                     "max_abs_err": stats.max_absdiff, "mean_abs_err": stats.mean_absdiff,
                     "median_abs_err": stats.median_absdiff, "max_rel_err": stats.max_reldiff,
                     "mean_rel_err": stats.mean_reldiff, "polygraphy_snr_db": snr[i]["v"].snr,
                     "polygraphy_cosine": cos[i]["v"].cosine_similarity})
    failures = []

    def summary(subset: list[dict[str, Any]], where: str) -> dict[str, Any]:
        s, c = float(np.mean([r["sqnr_db"] for r in subset])), float(np.mean([r["cosine"] for r in subset]))
        ok = bool(s >= thresholds["min_sqnr_db"] and c >= thresholds["min_cosine"])
        if not ok:
            failures.append(f"{where}: SQNR {s:.2f} dB (min {thresholds['min_sqnr_db']}), cosine {c:.5f} "
                            f"(min {thresholds['min_cosine']})")
        return {"inputs": len(subset), "sqnr_db": s, "cosine": c, "min_step_sqnr_db": min(r["sqnr_db"] for r in subset),
                "max_abs_err": max(r["max_abs_err"] for r in subset), "passed": ok}

    result = {"reference": ref_name, "candidate": name, "status": None, **summary(rows, "all inputs"),
              "buckets": [{"bucket": k, "t_max": edges[k], "t_min": edges[k + 1],
                           **summary([r for r in rows if r["bucket"] == k], f"bucket {k}")}
                          for k in sorted(set(int(b) for b in buckets))],
              "polygraphy_passed": bool(accuracy), "failures": failures, "iterations": rows}
    if not result["polygraphy_passed"] and not failures:
        failures.append("Polygraphy's comparison failed (NaN outputs or mean SNR / cosine below threshold)")
    result["status"] = "failed" if failures else "passed"
    return result


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else str(float(value))  # "inf": identical outputs; "nan"
    return value


def run_checks(export_dir: Path, engines_dir: Path | None = None, fp32_onnx: Path | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Compare the export's DiT (ONNX Runtime on `device`, see `engines.runtime.providers`; TensorRT engines when
    `engines_dir` is given and TensorRT runs here) with FP32 on the saved check inputs; writes and returns
    `check_report.json`, which records the ORT providers used.
    Polygraphy's own log is shown only when this module logs at DEBUG (`scripts/check.py -v`)."""
    from engines.runtime.providers import providers_for
    from exporter.passes.recipe import Recipe

    providers_for(device)  # a device this onnxruntime cannot run on is refused before any work

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(f"--export {export_dir} is not a directory")
    if engines_dir is not None and not Path(engines_dir).is_dir():
        raise InputError(f"--engines {engines_dir} is not a directory")
    if fp32_onnx is not None and not Path(fp32_onnx).is_file():
        raise InputError(f"--reference {fp32_onnx} is not a file")
    manifest = read_manifest(export_dir)
    with G_LOGGER.verbosity(G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.CRITICAL):
        inputs, meta = load_check_data(export_dir, manifest)
        thresholds = Recipe.from_json(manifest["quantization"]["recipe"]).check_thresholds()
        scheme = manifest["scheme"]
        if fp32_onnx is not None:
            from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

            reference = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(fp32_onnx)), name=REFERENCE_RUNNER)],
                                       data_loader=inputs)
        else:
            reference = RunResults.load(str(export_dir / CHECK_DIR / REFERENCE))
        if [len(v) for v in reference.values()] != [len(inputs)]:
            raise InputError(f"{export_dir / CHECK_DIR}: the reference holds {[len(v) for v in reference.values()]} "
                             f"iteration(s) for {len(inputs)} saved inputs; re-export to rewrite {CHECK_DIR}/")
        candidates = [("onnxruntime", DiTSessionRunner(export_dir, manifest["graphs"]["dit"], f"{scheme}-onnxrt",
                                                       device))]
        comparisons = []
        if engines_dir is not None:
            from engines.runtime.tensorrt import tensorrt_unavailable

            if reason := tensorrt_unavailable():
                log.warning("TensorRT comparison skipped: %s", reason)
                comparisons.append({"backend": "tensorrt", "reference": REFERENCE_RUNNER, "status": "skipped",
                                    "candidate": f"{scheme}-tensorrt", "reason": reason})
            else:
                candidates.append(("tensorrt", TrtDiTRunner(Path(engines_dir), export_dir, f"{scheme}-tensorrt")))
        for backend, runner in candidates:
            log.info("running %s on %d saved input(s)", runner.name, len(inputs))
            results = Comparator.run([runner], data_loader=inputs)
            comparisons.append({"backend": backend, **({"device": device, "providers": runner.providers}
                                                       if backend == "onnxruntime" else {}),
                                **_compare(reference, results, meta["buckets"], meta["edges"], thresholds)})
    comparisons.sort(key=lambda c: c["backend"] != "onnxruntime")
    report = json_safe({
        "schema_version": SCHEMA, "kind": "quadit-check", "export": str(export_dir.resolve()), "scheme": scheme,
        "recipe_sha256": manifest["quantization"].get("recipe_sha256"), "thresholds": thresholds,
        "rule": "mean SQNR (dB) and mean cosine over all saved inputs and over each bucket's inputs >= the thresholds",
        "reference": {"runner": REFERENCE_RUNNER,
                      "source": str(fp32_onnx) if fp32_onnx is not None else f"{CHECK_DIR}/{REFERENCE}"},
        "engines": str(engines_dir) if engines_dir is not None else None,
        "inputs": {"count": len(inputs), "buckets": meta["buckets"], "edges": meta["edges"]},
        "comparisons": comparisons,
        "passed": all(c["status"] != "failed" for c in comparisons)})
    with atomic_file(export_dir / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report
