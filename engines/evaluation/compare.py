"""Candidates for the accuracy report and the export stage that writes it.

At equal bits on the same model, layers and held-out prompts, a quadit export is compared with
- `minmax`: the same scheme without smoothing, low-rank branch or per-bucket scales (the naive baseline);
- ModelOpt: `mtq.quantize` with its INT8 SmoothQuant / INT4 AWQ / W4A8 AWQ config, evaluated in PyTorch
  (fake quantization), calibrated on the DiT inputs of the calibration prompts' trajectories;
- ONNX Runtime's own quantizer (`quantize_static` / `quantize_dynamic` / `MatMulNBitsQuantizer`,
  engines/evaluation/ort_quantizer_baseline.py), calibrated on the same trajectories.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from engines.evaluation.accuracy import (
    AccuracySettings,
    TorchSession,
    Trajectory,
    capture,
    evaluate,
    heldout_prompts,
    settings_json,
    write_report,
)
from engines.evaluation.check import write_check_data
from engines.runtime.backends import OrtBackend
from engines.runtime.estimate import log_estimate
from engines.runtime.pipeline import Pipeline
from engines.runtime.providers import providers_for, session
from exporter.errors import InputError
from exporter.models import LoadedModel
from exporter.models.layers import quantizable_linears
from exporter.onnx.graph_edit import save, weight_bytes
from exporter.onnx.torch_export import PROTOBUF_LIMIT
from exporter.passes.recipe import ROUND_TO_NEAREST, Recipe
from exporter.stages.quantized import Calibration, base_graph, quantize_graph
from exporter.stages.quantized import session_config as needed_config

log = logging.getLogger(__name__)


# ONNX Runtime session entry that keeps Q/DQ as float math instead of fusing it into its integer kernels
# (MatMulIntegerToFloat): what a TensorRT INT8 GEMM computes (int32 accumulation), without the error of
# MLAS's u8s8 AVX2 kernel (measured on sao-mini: 3.5 dB lower step SQNR fused than unfused, README)
EXACT_QDQ = {"session.disable_quant_qdq": "1"}


def graph_candidate(fp32: Path, loaded: LoadedModel, calibration: Calibration, recipe: Recipe, path: Path,
                    dynamic_kernel: str = "dql", device: str = "cpu", session_config: dict[str, str] | None = None
                    ) -> tuple[Any, float]:
    """Quantize the FP32 graph with `recipe` into `path` (one graph; per-bucket-graph uses bucket graphs
    through BucketedSession); returns (session on `device`, weight bytes of one graph)."""
    from engines.runtime.backends import BucketedSession

    def ort_session(file: Path, config: dict[str, str]) -> Any:
        return session(file, config, device, int8=True)

    layers = list(quantizable_linears(loaded.dit))
    config = {**needed_config(recipe, layers), **(session_config or {})}
    if recipe.bucket_policy == "per-bucket-graph":
        sessions, size = [], 0
        for b in range(len(calibration.edges) - 1):
            model, _ = quantize_graph(fp32, layers, calibration, recipe, b, dynamic_kernel)
            file = path.with_name(f"{path.stem}.bucket{b}.onnx")
            save(model, file, PROTOBUF_LIMIT)
            size = weight_bytes(model)
            sessions.append(ort_session(file, config))
        return BucketedSession(sessions, list(calibration.edges)), size
    model, _ = quantize_graph(fp32, layers, calibration, recipe, None, dynamic_kernel)
    save(model, path, PROTOBUF_LIMIT)
    return ort_session(path, config), weight_bytes(model)


def modelopt_candidate(loaded: LoadedModel, scheme: str, calibration_trajectories: Sequence[Trajectory],
                       device: str = "cpu", eval_steps: int = 0, shorten: str = ""
                       ) -> tuple[TorchSession, dict[str, Any]]:
    """ModelOpt's preset for `scheme` on a copy of the DiT on `device`, calibrated on the trajectories' DiT
    inputs. Its first calibration step is timed and the total of one calibration pass plus `eval_steps`
    evaluation steps (the caller's count) is logged: PyTorch fake quantization runs at its own speed, not
    the FP32 graph's the report's first estimate counted."""
    import copy
    import time

    import torch

    from engines.evaluation.modelopt_baseline import modelopt_quantize
    from exporter.onnx.graphs import DiTGraph

    steps = sum(len(traj.feeds) for traj in calibration_trajectories)
    first = [True]

    def forward_loop(model: torch.nn.Module) -> None:
        graph = DiTGraph(model)
        with torch.no_grad():
            for traj in calibration_trajectories:
                for feeds in traj.feeds:
                    t0 = time.perf_counter()
                    graph(*(torch.from_numpy(feeds[k]).to(device) for k in ("x", "t", "cross_attn_cond", "global_embed")))
                    if first[0]:
                        first[0] = False
                        log_estimate("accuracy report[ModelOpt]", time.perf_counter() - t0, steps + eval_steps,
                                     f"one calibration pass over {len(calibration_trajectories)} trajectories and "
                                     f"{eval_steps} evaluation steps; its algorithm may take more passes", shorten)

    dit = loaded.dit if device == "cpu" else copy.deepcopy(loaded.dit).to(device)
    quantized, info = modelopt_quantize(dit, scheme, forward_loop, list(quantizable_linears(loaded.dit)))
    return TorchSession(DiTGraph(quantized)), info


def ort_quantizer_candidate(fp32: Path, loaded: LoadedModel, settings: Any, calibration_trajectories: Sequence[Trajectory],
                            path: Path, session_config: dict[str, str] | None = None, device: str = "cpu"
                            ) -> tuple[Any, float, dict[str, Any]]:
    """ONNX Runtime's own quantizer (`engines.evaluation.ort_quantizer_baseline`, `settings` an OrtQuantSettings) on the
    FP32 graph and quadit's layers, calibrated on the trajectories' DiT inputs; returns (session, weight
    bytes, record of the run)."""
    import onnx

    from engines.evaluation.ort_quantizer_baseline import quantize, quantized_op_counts

    feeds = [f for traj in calibration_trajectories for f in traj.feeds]
    layers = list(quantizable_linears(loaded.dit))
    record = quantize(fp32, layers, settings, path, feeds)
    model = onnx.load(str(path))
    record["ops"] = quantized_op_counts(model)
    # what the graph needs to mean what it says, as for quadit's own graphs (a peer is measured like one)
    config = {**needed_config(Recipe(scheme=settings.scheme), layers), **(session_config or {})}
    return session(path, config, device, int8=True), weight_bytes(model), record


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The naive baseline at the recipe's bits: min-max ranges, no smoothing, no branch, one scale,
    weights rounded to nearest with abs-max scales."""
    return dataclasses.replace(recipe, method="minmax", lowrank=0, bucket_policy="shared", alpha=0.5,
                               act_clip="absmax", **ROUND_TO_NEAREST)


def _report_steps(settings: AccuracySettings, buckets: int, minmax: bool, modelopt_prompts: int) -> int:
    """DiT calls of the report: the reference trajectories, check data (2 per bucket), and per candidate
    its per-step comparison (reference + candidate) and its own sampler run; ModelOpt adds its calibration
    trajectories and (counted as) two calibration passes over them."""
    run = settings.prompts * settings.steps
    candidates = 1 + int(minmax) + int(modelopt_prompts > 0)
    return run + 2 * buckets + 3 * run * candidates + 3 * modelopt_prompts * settings.steps


def report_stage(loaded: LoadedModel, calibration: Calibration, recipe: Recipe, settings: AccuracySettings,
                 scratch: Path, modelopt: bool = True, dynamic_kernel: str = "dql", device: str = "cpu",
                 shorten: str = "", target: str = "onnxruntime") -> Callable[[Path, dict[str, Any]], None]:
    """An export stage writing report.json / report.md: this export, minmax and ModelOpt vs FP32. On a
    CUDA `device` ModelOpt runs on the GPU and the ONNX Runtime graphs on ORT's CUDA provider (on the CPU,
    with a warning, where this onnxruntime has none). The first reference step is timed and the stage's
    total logged, naming `shorten` (the caller's options that shorten it). The minmax baseline quantizes the
    same graph this export did (FP16 for the TensorRT target); a TensorRT-target report also has the same
    recipe on the FP32 graph with exact Q/DQ, which is what quantizing the FP16 graph costs."""
    ort_device = device
    if device != "cpu":
        try:
            providers_for(device)
        except InputError as exc:
            log.warning("accuracy report: %s; its ONNX Runtime graphs run on the CPU", exc)
            ort_device = "cpu"

    def stage(tmp: Path, manifest: dict[str, Any]) -> None:
        fp32 = Path(scratch) / "dit.fp32.onnx"
        base_path = base_graph(scratch, target)
        pipeline = Pipeline(OrtBackend(tmp, manifest, ort_device), manifest)
        reference = session(fp32, device=ort_device)
        cal_prompts = calibration.meta["prompts"]["list"]
        prompts = heldout_prompts(cal_prompts, settings.prompts, settings.heldout_seed)
        base = baseline_recipe(recipe)
        count = min(len(cal_prompts), 4) if modelopt else 0  # AWQ's search is slow on CPU; 4 prompts x all steps
        steps = _report_steps(settings, len(calibration.edges) - 1, base != recipe, count)
        detail = (f"{settings.prompts} prompts x {settings.steps} steps for the FP32 reference and "
                  f"{1 + int(base != recipe) + int(modelopt)} candidate(s), each counted at the FP32 step's speed")
        trajectories = capture(pipeline, reference, prompts, settings,
                               on_first_step=lambda s: log_estimate("accuracy report", s, steps, detail, shorten))
        edges = calibration.edges
        manifest["check"] = write_check_data(tmp, reference, trajectories, edges)
        fp32_bytes = manifest["graphs"]["dit"]["fp32_weight_bytes"]
        rows = []
        this = evaluate(f"quadit {recipe.scheme} {recipe.method} ({recipe.activations}, {recipe.bucket_policy}, "
                        f"rank {recipe.lowrank})", pipeline.backend.sessions["dit"], reference, trajectories, edges,
                        pipeline, settings)
        this["size_ratio"] = manifest["graphs"]["dit"]["size_ratio"]
        rows.append(this)
        if base != recipe:
            candidate, size = graph_candidate(base_path, loaded, calibration, base, Path(scratch) / "dit.minmax.onnx",
                                              dynamic_kernel, ort_device)
            row = evaluate(f"minmax {recipe.scheme} ({recipe.activations})", candidate, reference, trajectories, edges,
                           pipeline, settings)
            row["size_ratio"] = size / fp32_bytes
            rows.append(row)
        if base_path != fp32:
            candidate, size = graph_candidate(fp32, loaded, calibration, recipe, Path(scratch) / "dit.fp32q.onnx",
                                              dynamic_kernel, ort_device, EXACT_QDQ)
            row = evaluate(f"same recipe on the FP32 graph, Q/DQ as float math ({recipe.scheme} {recipe.method})",
                           candidate, reference, trajectories, edges, pipeline, settings)
            row["size_ratio"] = size / fp32_bytes
            rows.append(row)
        info = None
        from engines.evaluation.modelopt_baseline import NEEDS_CUDA

        if modelopt and device == "cpu" and recipe.scheme in NEEDS_CUDA:
            log.warning("ModelOpt's %s fake quantization runs on CUDA only; its row is left out (--device cuda adds it)",
                        recipe.scheme)
        elif modelopt:
            cal_traj = capture(pipeline, reference, cal_prompts[:count], settings)
            candidate, info = modelopt_candidate(loaded, recipe.scheme, cal_traj, device,
                                                 eval_steps=2 * settings.prompts * settings.steps,
                                                 shorten="--no-modelopt" + ("" if device != "cpu" else ", --device cuda"))
            rows.append(evaluate(f"ModelOpt {info['config']} (PyTorch fake-quant)", candidate, reference, trajectories,
                                 edges, pipeline, settings))
        table = write_report(tmp, rows, {"prompts": prompts, "settings": settings_json(settings),
                                         "reference": "FP32 DiT graph, ONNX Runtime", "buckets": list(edges),
                                         "device": device, "providers": pipeline.backend.providers,
                                         "recipe": recipe.to_json(), "modelopt": info})
        log.info("accuracy against FP32 (held-out prompts):\n%s", table)
        manifest["report"] = {"json": "report.json", "markdown": "report.md",
                              "mean_step_sqnr_db": rows[0]["mean_step_sqnr_db"],
                              "final_latent_snr_db": rows[0].get("final_latent_snr_db")}
        fp32_row = next((r for r in rows if r["name"].startswith("same recipe on the FP32 graph")), None)
        if fp32_row is not None:
            manifest["report"]["fp16_cost_db"] = {
                "mean_step_sqnr": fp32_row["mean_step_sqnr_db"] - rows[0]["mean_step_sqnr_db"],
                "final_latent_snr": (fp32_row.get("final_latent_snr_db") or float("nan"))
                - (rows[0].get("final_latent_snr_db") or float("nan"))}

    return stage
