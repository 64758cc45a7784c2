"""The quantization stage of an export: FP32 DiT graph + calibration artifact + recipe -> quantized graph(s).

Runs inside `export_model`'s temporary directory after the FP32 graphs passed parity, so a failed
quantization (or a TensorRT rule the result breaks) leaves no export behind.

The graph that is quantized depends on the target. ONNX Runtime's CPU kernels (MatMulIntegerToFloat,
MatMulNBits) take FP32 activations, so its target quantizes the FP32 graph. A TensorRT engine built strongly
typed runs every layer in the type the graph gives it (a DequantizeLinear outputs its scale's type, a MatMul
runs in its inputs' type), so the TensorRT target quantizes the FP16 graph of `--scheme fp16` (FP32 only in
LayerNorm, RoPE and the timestep path) with FP16 scales: the INT8/INT4 GEMMs write FP16 and attention,
Softmax and the elementwise ops stay FP16. The precision map (exporter/tensorrt/precision_map.py) verifies that on
the finished graph and fails the export naming the node otherwise. The manifest records the
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
from exporter.errors import InputError
from exporter.models import LoadedModel
from exporter.models.layers import quantizable_linears
from exporter.onnx import graph_edit
from exporter.onnx.artifacts import link_or_copy
from exporter.onnx.linear_nodes import locate_linears
from exporter.onnx.torch_export import PROTOBUF_LIMIT
from exporter.passes.fp8_attention import quantize_attention_fp8
from exporter.passes.int8_attention import quantize_attention_scores
from exporter.passes.ort_fusion import ATTENTION_OPS, ORT_SESSION_CONFIG, fuse_attention
from exporter.passes.quantize import DYNAMIC_KERNELS, LayerStats, float_type, quantize_dit
from exporter.passes.recipe import Recipe
from exporter.stages.export import dit_spec
from exporter.tensorrt.checker import TRT_INT4_BLOCKS, check_graph
from exporter.tensorrt.precision_map import precision_map
from exporter.tensorrt.speed_model import predict_all

log = logging.getLogger(__name__)
# ORT fuses DQ(INT4)->MatMul into MatMulNBits with int8 activations unless told otherwise (its default
# accuracy level is 4): w4a16 must compute with float activations to mean what it says.
W4A16_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
# ORT's CPU QDQ fusion rewrites a MatMul fed by two activation DQs (an FP8 attention core's) as MatMulIntegerToFloat,
# which has no FP8 type, and refuses the graph: such a graph runs its Q/DQ as float math (E4M3 rounding, exact)
FP8_ATTENTION_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
# the latent length the export's precision map weighs FLOPs at (SAO 1.0's 47.55 s window)
PRECISION_MAP_LATENTS = 1024


@dataclass(frozen=True)
class QuantizeOptions:
    recipe: Recipe
    target: str = "onnxruntime"
    dynamic_kernel: str = "dql"
    # fused attention core of the ONNX Runtime target (exporter/passes/ort_fusion.py); 'none' keeps the plain ops
    attention: str = "mha"

    def __post_init__(self) -> None:
        self.recipe.check_target(self.target)
        if self.dynamic_kernel not in DYNAMIC_KERNELS:
            raise InputError(f"unknown dynamic kernel '{self.dynamic_kernel}' (choose from: {', '.join(DYNAMIC_KERNELS)})")
        if self.attention not in ("none", *ATTENTION_OPS):
            raise InputError(f"unknown fused attention '{self.attention}' (choose from: none, {', '.join(ATTENTION_OPS)})")


@dataclass(frozen=True)
class Calibration:
    directory: Path
    meta: dict[str, Any]
    stats: dict[str, LayerStats]
    edges: tuple[float, ...]
    # per attention module and part ("<module>.q|k|v"): per-bucket abs-max [K]; None when the artifact predates
    # attention statistics (exporter/passes/fp8_attention.py refuses --attention fp8 then)
    attention: dict[str, np.ndarray] | None = None


def read_calibration(directory: Path, loaded: LoadedModel) -> Calibration:
    """The artifact's per-bucket ranges for every quantizable layer; refused when made for another model."""
    meta, tensors = artifact.read(Path(directory))
    layers = quantizable_linears(loaded.dit)
    artifact.check_matches(meta, loaded.identity, {n: m.in_features for n, m in layers.items()})
    def get(key: str) -> Any:
        return tensors[key].float().numpy() if key in tensors else None

    stats = {n: LayerStats(tensors[f"{n}.ch_absmax"].numpy(), tensors[f"{n}.absmax"].numpy(), get(f"{n}.xtx"),
                           get(f"{n}.rows")) for n in layers}
    return Calibration(Path(directory), meta, stats, tuple(meta["buckets"]["edges"]), attention_ranges(meta, tensors))


def attention_ranges(meta: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """`<module>.q|k|v` -> per-bucket abs-max of an artifact with attention statistics, else None."""
    info = meta.get("attention")
    if not info:
        return None
    return {f"{m}.{p}": tensors[f"attn.{m}.{p}.absmax"].float().numpy() for m in info["modules"] for p in info["parts"]}


def check_int4_blocks(loaded: LoadedModel, recipe: Recipe, target: str) -> dict[str, int | None]:
    """The per-layer INT4 block decisions for this model, made (and logged) before calibration starts."""
    from exporter.passes.quantize import int4_plan
    from exporter.passes.recipe import ORT_INT4_BLOCKS, TRT_INT4_BLOCKS, WEIGHT_BITS

    layers = quantizable_linears(loaded.dit)
    shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    plan = int4_plan(shapes, recipe.resolve(layers), TRT_INT4_BLOCKS if target == "tensorrt" else ORT_INT4_BLOCKS)
    if WEIGHT_BITS[recipe.scheme] == 4 and len([b for b in plan.values() if b is None]) == len(layers):
        raise InputError(f"no layer of this model splits into INT4 blocks of {recipe.block_size} or smaller; "
                         "use --scheme w8a8")
    return plan


def base_graph(scratch: Path, target: str) -> Path:
    """Where `quantize_stage` leaves the unquantized graph it quantized (the report's baselines use it)."""
    return Path(scratch) / ("dit.fp16.onnx" if target == "tensorrt" else "dit.fp32.onnx")


def export_fp16_base(loaded: LoadedModel, dims: dict[str, int], path: Path) -> None:
    from exporter.onnx.torch_export import export_graph

    log.info("exporting the FP16 DiT graph the TensorRT target quantizes")
    export_graph(dit_spec(loaded, dims, fp16=True), path)


def session_config(recipe: Recipe, layers: Sequence[str], target: str | None = None) -> dict[str, str]:
    """The manifest's `ort_session_config`: what the graph needs to mean what it says (W4A16_SESSION_CONFIG
    when any layer is w4a16: a mixed recipe's w4a16 layers too, whatever its top-level scheme) plus, for the
    ONNX Runtime target, the session options chosen by measurement (exporter/passes/ort_fusion.py)."""
    # nvfp4's INT4 fallback (exporter/passes/nvfp4_fallback.py) may turn any nvfp4 layer into w4a16
    w4a16 = any(s and (s["scheme"] == "w4a16" or (s["scheme"] == "nvfp4" and recipe.nvfp4_fallback_db > 0))
                for s in recipe.resolve(layers).values())
    return {**(ORT_SESSION_CONFIG if target == "onnxruntime" else {}), **(W4A16_SESSION_CONFIG if w4a16 else {}),
            **(FP8_ATTENTION_SESSION_CONFIG if recipe.attention_quant == "fp8" else {})}


def quantize_graph(fp32_path: Path, layers: Sequence[str], calibration: Calibration, recipe: Recipe,
                   bucket: int | None = None, dynamic_kernel: str = "dql") -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(fp32_path))
    sites = locate_linears(model, list(layers))
    ftype = float_type(model, sites[next(iter(sites))].weight) if sites else np.float32
    model, record = quantize_dit(model, sites, calibration.stats, calibration.edges, recipe, bucket, dynamic_kernel)
    if recipe.attention_quant == "fp8":
        model, attention = quantize_attention_fp8(model, calibration.attention, ftype, bucket)
        record.update(attention)
    if recipe.attention_int8 == "dynamic-qk":
        model, cores = quantize_attention_scores(model)
        log.info("attention scores in INT8 (dynamic) in %d cores", cores)
    return model, record


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
        base = base_graph(scratch, options.target)
        if base != fp32:
            export_fp16_base(loaded, manifest["dims"], base)
        for f in entry["files"]:
            (tmp / f).unlink(missing_ok=True)
        fp32_bytes = entry["weight_bytes"]
        k = len(calibration.edges) - 1
        targets = [(None, "dit.onnx")] if recipe.bucket_policy != "per-bucket-graph" else \
            [(b, f"dit.bucket{b}.onnx") for b in range(k)]
        files, records, graph_bytes, buckets, precision_summaries, prediction = [], {}, [], [], {}, {}
        fusion = None
        for bucket, name in targets:
            log.info("quantizing %s (%s, %s%s)", name, recipe.scheme, recipe.method,
                     "" if bucket is None else f", bucket {bucket}")
            model, record = quantize_graph(base, layers, calibration, recipe, bucket, options.dynamic_kernel)
            if options.target == "tensorrt":
                problems = check_graph(model, block_sizes=TRT_INT4_BLOCKS)
                if problems:
                    raise InputError(f"{name} breaks {len(problems)} TensorRT rule(s), first: {problems[0]}")
                pmap = precision_map(model, latents=PRECISION_MAP_LATENTS)
                if pmap.violations:
                    raise InputError(f"{name}: {len(pmap.violations)} layer(s) would run in FP32 under TensorRT's "
                                     f"strong typing, first: {pmap.violations[0]}")
                precision_summaries[name] = pmap.summary()
                if not prediction:
                    base_map = precision_map(onnx.load(str(base), load_external_data=False), latents=PRECISION_MAP_LATENTS)
                    prediction.update(predict_all({"fp16": base_map, recipe.scheme: pmap}))
            elif options.attention != "none":  # the ONNX Runtime target: the com.microsoft fusions
                model, fused = fuse_attention(model, options.attention)
                fusion = {"attention": options.attention, "sites": fused}
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
                      "base_precision": "fp16" if base != fp32 else "fp32",
                      "ort_session_config": session_config(recipe, layers, options.target)})
        if fusion is not None:
            entry["ort_fusion"] = fusion
        entry.pop("parity", None)
        if buckets:
            entry["buckets"] = buckets
            entry["bucket_edges"] = list(calibration.edges)
        shutil.copytree(calibration.directory, tmp / "calibration", copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns("*.png", "summary.*", ".*"))
        manifest["scheme"] = recipe.scheme
        manifest["parity"]["graph"] = "dit before quantization (FP32); quantized accuracy: report.json"
        manifest["quantization"] = {
            "recipe": recipe.to_json(), "recipe_sha256": recipe.digest(), "target": options.target,
            "dynamic_kernel": options.dynamic_kernel if recipe.activations == "dynamic" else None,
            "calibration": {"artifact_sha256": calibration.meta["artifact_sha256"], "copy": "calibration/",
                            "buckets": list(calibration.edges)},
            "tensorrt_rules": "checked" if options.target == "tensorrt" else "not checked (target onnxruntime)",
            "tensorrt_precision": next(iter(precision_summaries.values())) if precision_summaries else None,
            "predicted_speed": ({"latents": PRECISION_MAP_LATENTS, "batch": 2, **prediction} if prediction else None),
            "layers": records[targets[0][1]] if len(records) == 1 else records,
        }
        log.info("DiT weights %.1f MB -> %.1f MB per graph (%.3fx FP32)%s", fp32_bytes / 1e6, graph_bytes[0] / 1e6,
                 graph_bytes[0] / fp32_bytes, f", {len(targets)} graphs" if len(targets) > 1 else "")

    return stage
