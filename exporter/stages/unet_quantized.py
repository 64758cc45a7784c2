"""Quantize a UNet export's `unet.onnx` (W8A8: INT8 Conv2d and Linear, timestep-aware, `exporter.passes.conv_quant`).

The ONNX Runtime target quantizes the FP32 graph the export just wrote. The TensorRT target quantizes an FP16
base graph (`exporter.onnx.fp16.fp16_unet`: FP16 convolutions, GEMMs, attention and timestep MLP, FP32
GroupNorm/LayerNorm), so that under strong typing an INT8 convolution writes FP16 and nothing around it falls back
to FP32 (ARCHITECTURE.md section 3). Both keep the graph interface (float32 inputs and `noise_pred`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from calibration.artifact import sha256_file
from exporter.errors import InputError
from exporter.onnx import graph_edit, torch_export, unet_graphs
from exporter.passes.conv_quant import METHODS, locate_sites, quantize_unet
from exporter.passes.recipe import TARGETS

log = logging.getLogger(__name__)
UNET_QUANT_SCHEMES = ("w8a8", "w4a16", "w4a8")


@dataclass(frozen=True)
class UNetQuantOptions:
    scheme: str = "w8a8"
    method: str = "timestep-smoothquant"
    alpha: float = 0.5
    target: str = "onnxruntime"
    calib_prompts: int = 8
    calib_steps: int = 10
    calib_buckets: int = 3
    report_prompts: int = 2
    report_steps: int = 10
    calib_seconds: float | None = None  # None: the model's default length
    report_seconds: float | None = None
    lowrank: int = 0
    weight_rounding: str = "nearest"
    block_size: int = 64
    # w4a8: globs of the layers that take 4-bit weights (the others stay w8a8); empty: every Conv2d
    w4_layers: tuple[str, ...] = ()
    auto_precision: bool = False
    size_budget: float | None = None
    residual_qdq: bool = False

    @property
    def mixed(self) -> bool:
        """Whether exporter.passes.conv_lowbit quantizes (anything but plain nearest-rounded W8A8)."""
        return (self.scheme != "w8a8" or self.lowrank > 0 or self.weight_rounding != "nearest"
                or self.auto_precision)

    def __post_init__(self) -> None:
        if self.scheme not in UNET_QUANT_SCHEMES:
            raise InputError(f"scheme '{self.scheme}' is not available for the UNet family (choose from: fp32, "
                             f"{', '.join(UNET_QUANT_SCHEMES)})")
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r} is not available for the UNet family (choose from: "
                             f"{', '.join(METHODS)})")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--alpha must be within 0..1, got {self.alpha}")
        if self.target not in TARGETS:
            raise InputError(f"unknown target '{self.target}' (choose from: {', '.join(TARGETS)})")
        if self.weight_rounding not in ("nearest", "gptq"):
            raise InputError(f"--weight-rounding must be nearest or gptq, got {self.weight_rounding!r}")
        if self.lowrank < 0 or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"need --lowrank >= 0 and --block-size a power of two >= 16 (got {self.lowrank}, "
                             f"{self.block_size})")
        if self.scheme == "w4a8" and self.target == "tensorrt":
            raise InputError("w4a8 does not run in TensorRT (W4A8 is TensorRT-LLM only; ARCHITECTURE.md section 3): "
                             "use --target onnxruntime")
        if self.w4_layers and self.scheme != "w4a8":
            raise InputError("--w4-layers selects the 4-bit layers of --scheme w4a8")
        if self.auto_precision != (self.size_budget is not None):
            raise InputError("--auto-precision and --size-budget go together")
        if self.size_budget is not None and not 0 < self.size_budget <= 1:
            raise InputError(f"--size-budget must be within (0, 1], got {self.size_budget}")
        if self.residual_qdq and self.target != "tensorrt":
            raise InputError("--residual-qdq places TensorRT's residual-Add Q/DQ: use it with --target tensorrt")
        for name, value, least in (("--calib-prompts", self.calib_prompts, 1), ("--calib-steps", self.calib_steps, 2),
                                   ("--report-prompts", self.report_prompts, 0),
                                   ("--report-steps", self.report_steps, 2)):
            if not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an integer >= {least}, got {value}")


class FP16UNetGraph(unet_graphs.UNetGraph):
    """The FP16 UNet behind the graph's float32 interface (inputs cast in, `noise_pred` cast out); the
    timestep stays float32 (diffusers computes its sinusoidal features in FP32). A subclass, not a wrapper,
    so the module scopes stay `unet.*` (what `locate_sites` matches)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = cond_mask.half() if cond_mask is not None else None
        return super().forward(sample.half(), timestep, cond.half(), mask).float()


def export_fp16_unet(model: Any, path: Path) -> dict[str, Any]:
    """The TensorRT target's FP16 base graph of the UNet (see the module docstring)."""
    from exporter.onnx.fp16 import fp16_unet
    from exporter.stages.unet_export import unet_spec

    half = fp16_unet(model.unet)
    module = FP16UNetGraph(model.family, half).eval()
    log.info("exporting the FP16 UNet graph the TensorRT target quantizes")
    with unet_graphs.exportable_masks(half):
        return torch_export.export_graph(unet_spec(model, module), Path(path))


def quantize_unet_graph(base: Path, layers: Sequence[str], edges: Sequence[float], ch_absmax: Mapping[str, np.ndarray],
                        options: UNetQuantOptions, xtx: Mapping[str, np.ndarray] | None = None,
                        precisions: Mapping[str, str] | None = None) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]]]:
    """Quantize the base graph: plain W8A8 by conv_quant, anything else by conv_lowbit with a plan per layer
    (`precisions` from --auto-precision, else the scheme's own; see `layer_plans`)."""
    model = onnx.load(str(base))
    sites = locate_sites(model, list(layers))
    if not options.mixed:
        record = quantize_unet(model, sites, ch_absmax, edges, options.method, options.alpha)
    else:
        from exporter.passes.conv_lowbit import plan_layers, quantize_unet_mixed

        try:
            plans, notes = plan_layers(model, sites, layer_plans(sites, options, precisions), options.target)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        record = quantize_unet_mixed(model, sites, plans, ch_absmax, edges, options.method, options.alpha,
                                     options.weight_rounding, xtx)
        for note in notes:
            record[note.split(":")[0].split(" ")[0]]["note"] = note
    return model, record


def layer_plans(sites: Mapping[str, Any], options: UNetQuantOptions, precisions: Mapping[str, str] | None = None
                ) -> dict[str, Any]:
    """The wanted precision per layer: `precisions` (e.g. "w4a16+r32") where given, else the scheme's; w4a8 puts
    4-bit weights on the --w4-layers globs (default: every Conv2d, seed 002's Conv2d study) and W8A8 elsewhere."""
    import fnmatch

    from exporter.passes.conv_lowbit import LayerPlan

    if precisions is not None:
        out = {}
        for layer in sites:
            scheme, _, rank = precisions[layer].partition("+r")
            out[layer] = LayerPlan(scheme, int(rank or 0), options.block_size)
        return out
    if options.scheme != "w4a8":
        return {layer: LayerPlan(options.scheme, options.lowrank, options.block_size) for layer in sites}
    globs = options.w4_layers
    for pattern in globs:
        if not any(fnmatch.fnmatchcase(layer, pattern) for layer in sites):
            raise InputError(f"--w4-layers pattern {pattern!r} matches no quantizable UNet layer")
    chosen = {layer for layer, site in sites.items()
              if (any(fnmatch.fnmatchcase(layer, p) for p in globs) if globs else site.op_type == "Conv")}
    return {layer: LayerPlan("w4a8" if layer in chosen else "w8a8", options.lowrank, options.block_size)
            for layer in sites}


def write_quantized_unet(model: onnx.ModelProto, record: Mapping[str, dict[str, Any]], tmp: Path,
                         manifest: dict[str, Any], options: UNetQuantOptions, calibration: dict[str, Any]) -> None:
    """Replace `unet.onnx` in the export directory `tmp` and its manifest entry (sizes, record, hashes)."""
    entry = manifest["graphs"]["unet"]
    fp32_bytes = int(entry["weight_bytes"])
    path = tmp / entry["file"]
    for stale in entry["files"]:
        (tmp / stale).unlink(missing_ok=True)
    files = graph_edit.save(model, path, torch_export.PROTOBUF_LIMIT)
    quant_bytes = graph_edit.weight_bytes(model)
    residual = record.pop("__residual_qdq__", None)
    convs = sum(r["op"] == "Conv" for r in record.values())
    entry.update({
        "precision": options.scheme, "files": files, "weight_bytes": quant_bytes,
        "size_ratio": round(quant_bytes / fp32_bytes, 4), "fp32_weight_bytes": fp32_bytes,
        "sha256": {f: sha256_file(tmp / f) for f in files},
        "quantization": {"options": asdict(options), "layers": len(record), "conv_layers": convs,
                         "linear_layers": len(record) - convs, "calibration": calibration, "per_layer": dict(record),
                         "precisions": _precision_counts(record), **({"residual_qdq": residual} if residual else {})},
    })
    entry.pop("parity", None)  # FP32 parity no longer describes this graph: report.json does
    manifest["scheme"] = options.scheme
    manifest["target"] = options.target
    log.info("unet.onnx quantized (%s, %s target): %d layers (%d Conv2d), weights %.1f -> %.1f MB (%.2fx)",
             options.scheme, options.target, len(record), convs, fp32_bytes / 1e6, quant_bytes / 1e6,
             quant_bytes / fp32_bytes)


def _precision_counts(record: Mapping[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in record.values():
        key = rec.get("scheme", "w8a8") + (f"+r{rec['rank']}" if rec.get("rank") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts
