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
UNET_QUANT_SCHEMES = ("w8a8",)


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
                        options: UNetQuantOptions) -> tuple[onnx.ModelProto, dict[str, dict[str, Any]]]:
    model = onnx.load(str(base))
    sites = locate_sites(model, list(layers))
    record = quantize_unet(model, sites, ch_absmax, edges, options.method, options.alpha)
    return model, record


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
    convs = sum(r["op"] == "Conv" for r in record.values())
    entry.update({
        "precision": options.scheme, "files": files, "weight_bytes": quant_bytes,
        "size_ratio": round(quant_bytes / fp32_bytes, 4), "fp32_weight_bytes": fp32_bytes,
        "sha256": {f: sha256_file(tmp / f) for f in files},
        "quantization": {"options": asdict(options), "layers": len(record), "conv_layers": convs,
                         "linear_layers": len(record) - convs, "calibration": calibration, "per_layer": dict(record)},
    })
    entry.pop("parity", None)  # FP32 parity no longer describes this graph: report.json does
    manifest["scheme"] = options.scheme
    manifest["target"] = options.target
    log.info("unet.onnx quantized (%s, %s target): %d layers (%d Conv2d), weights %.1f -> %.1f MB (%.2fx)",
             options.scheme, options.target, len(record), convs, fp32_bytes / 1e6, quant_bytes / 1e6,
             quant_bytes / fp32_bytes)
