"""The quantization stage of an export: FP32 DiT graph + calibration artifact + recipe -> quantized graph(s).

Runs inside `export_model`'s temporary directory after the FP32 graphs passed parity, so a failed
quantization (or a TensorRT rule the result breaks) leaves no export behind. The manifest records the
recipe and its hash, the calibration artifact's hash, the ORT session settings the graph needs, and per
layer whether it was smoothed, its rank, kernel and scales.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from calibration import artifact
from calibration.artifact import sha256_file
from exporter import graph_edit
from exporter.errors import InputError
from exporter.layers import quantizable_linears
from exporter.models import LoadedModel
from exporter.onnx_export import PROTOBUF_LIMIT
from exporter.onnx_layers import locate_linears
from exporter.quantize import DYNAMIC_KERNELS, LayerStats, quantize_dit
from exporter.recipe import Recipe
from exporter.trt_check import check_graph

log = logging.getLogger(__name__)
# ORT fuses DQ(INT4)->MatMul into MatMulNBits with int8 activations unless told otherwise (its default
# accuracy level is 4): w4a16 must compute with float activations to mean what it says.
W4A16_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


@dataclass(frozen=True)
class QuantizeOptions:
    recipe: Recipe
    target: str = "onnxruntime"
    dynamic_kernel: str = "dql"

    def __post_init__(self) -> None:
        self.recipe.check_target(self.target)
        if self.dynamic_kernel not in DYNAMIC_KERNELS:
            raise InputError(f"unknown dynamic kernel '{self.dynamic_kernel}' (choose from: {', '.join(DYNAMIC_KERNELS)})")


@dataclass(frozen=True)
class Calibration:
    directory: Path
    meta: dict[str, Any]
    stats: dict[str, LayerStats]
    edges: tuple[float, ...]


def read_calibration(directory: Path, loaded: LoadedModel) -> Calibration:
    """The artifact's per-bucket ranges for every quantizable layer; refused when made for another model."""
    meta, tensors = artifact.read(Path(directory))
    layers = quantizable_linears(loaded.dit)
    artifact.check_matches(meta, loaded.identity, {n: m.in_features for n, m in layers.items()})
    stats = {n: LayerStats(tensors[f"{n}.ch_absmax"].numpy(), tensors[f"{n}.absmax"].numpy()) for n in layers}
    return Calibration(Path(directory), meta, stats, tuple(meta["buckets"]["edges"]))


def quantize_graph(fp32_path: Path, layers: Sequence[str], calibration: Calibration, recipe: Recipe,
                   bucket: int | None = None, dynamic_kernel: str = "dql") -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(fp32_path))
    sites = locate_linears(model, list(layers))
    return quantize_dit(model, sites, calibration.stats, calibration.edges, recipe, bucket, dynamic_kernel)


def _json_record(record: Mapping[str, dict]) -> dict[str, dict]:
    return {n: {k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()} for n, r in record.items()}


def quantize_stage(loaded: LoadedModel, calibration: Calibration, options: QuantizeOptions, scratch: Path,
                   source: Path | None = None) -> Callable[[Path, dict[str, Any]], None]:
    """A stage for `export_model`: replaces the FP32 dit graph in the export by the quantized one(s).
    The FP32 graph is kept at `scratch/dit.fp32.onnx` for the accuracy report. `source`: read the FP32
    graph from this export directory instead (several quantized exports sharing one FP32 export)."""
    recipe = options.recipe
    layers = list(quantizable_linears(loaded.dit))

    def stage(tmp: Path, manifest: dict[str, Any]) -> None:
        entry = manifest["graphs"]["dit"]
        fp32 = Path(scratch) / "dit.fp32.onnx"
        model = onnx.load(str((source or tmp) / entry["file"]))
        graph_edit.save(model, fp32, PROTOBUF_LIMIT)
        del model
        for f in entry["files"]:
            (tmp / f).unlink(missing_ok=True)
        fp32_bytes = entry["weight_bytes"]
        k = len(calibration.edges) - 1
        targets = [(None, "dit.onnx")] if recipe.bucket_policy != "per-bucket-graph" else \
            [(b, f"dit.bucket{b}.onnx") for b in range(k)]
        files, records, graph_bytes, buckets = [], {}, [], []
        for bucket, name in targets:
            log.info("quantizing %s (%s, %s%s)", name, recipe.scheme, recipe.method,
                     "" if bucket is None else f", bucket {bucket}")
            model, record = quantize_graph(fp32, layers, calibration, recipe, bucket, options.dynamic_kernel)
            if options.target == "tensorrt":
                problems = check_graph(model)
                if problems:
                    raise InputError(f"{name} breaks {len(problems)} TensorRT rule(s), first: {problems[0]}")
            onnx.checker.check_model(model)
            written = graph_edit.save(model, tmp / name, PROTOBUF_LIMIT)
            files += written
            graph_bytes.append(graph_edit.weight_bytes(model))
            records[name] = _json_record(record)
            if bucket is not None:
                buckets.append({"index": bucket, "file": name, "t_max": calibration.edges[bucket],
                                "t_min": calibration.edges[bucket + 1]})
            del model
        entry.update({"file": targets[0][1], "files": files, "precision": recipe.scheme,
                      "weight_bytes": int(sum(graph_bytes)), "weight_bytes_per_graph": int(graph_bytes[0]),
                      "fp32_weight_bytes": int(fp32_bytes), "size_ratio": graph_bytes[0] / fp32_bytes,
                      "sha256": {f: sha256_file(tmp / f) for f in files},
                      "ort_session_config": W4A16_SESSION_CONFIG if recipe.scheme == "w4a16" else {}})
        entry.pop("parity", None)
        if buckets:
            entry["buckets"] = buckets
            entry["bucket_edges"] = list(calibration.edges)
        shutil.copytree(calibration.directory, tmp / "calibration",
                        ignore=shutil.ignore_patterns("*.png", "summary.*", ".*"))
        manifest["scheme"] = recipe.scheme
        manifest["parity"]["graph"] = "dit before quantization (FP32); quantized accuracy: report.json"
        manifest["quantization"] = {
            "recipe": recipe.to_json(), "recipe_sha256": recipe.digest(), "target": options.target,
            "dynamic_kernel": options.dynamic_kernel if recipe.activations == "dynamic" else None,
            "calibration": {"artifact_sha256": calibration.meta["artifact_sha256"], "copy": "calibration/",
                            "buckets": list(calibration.edges)},
            "tensorrt_rules": "checked" if options.target == "tensorrt" else "not checked (target onnxruntime)",
            "layers": records[targets[0][1]] if len(records) == 1 else records,
        }
        log.info("DiT weights %.1f MB -> %.1f MB per graph (%.3fx FP32)%s", fp32_bytes / 1e6, graph_bytes[0] / 1e6,
                 graph_bytes[0] / fp32_bytes, f", {len(targets)} graphs" if len(targets) > 1 else "")

    return stage
