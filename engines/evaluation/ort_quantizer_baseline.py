"""ONNX Runtime's own quantizer as a peer at equal bits: what a user on ONNX Runtime would pick instead.

`onnxruntime.quantization` is run the way its documentation recommends, on the same FP32 DiT graph and the
same Linears quadit quantizes (the MatMul/Gemm nodes of `exporter.models.layers.quantizable_linears`, found through
`exporter.onnx.linear_nodes.locate_linears`; attention MatMuls, the timestep/condition MLPs and the projections
stay float, as in quadit's graphs and ModelOpt's):
- `quant_pre_process` first (symbolic shape inference + ORT's basic optimizations), as the docs ask;
- `quantize_static`: QDQ format, per-channel symmetric INT8 weights, per-tensor INT8 activations with the
  calibration method of the settings (MinMax, Percentile, Entropy), calibrated by a `CalibrationDataReader`
  over the calibration prompts' DiT input trajectories (the same feeds ModelOpt calibrates on);
- `quantize_dynamic`: per-channel INT8 weights, activations quantized per tensor at run time (uint8);
- `MatMulNBitsQuantizer` (4-bit weight-only, block-wise, MatMulNBits with float activations): w4a16.

The optimizer of `quant_pre_process` may fuse MatMul + Add into Gemm and rename nodes, so the nodes to
quantize are found again after it by their weight initializers, which it keeps.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from exporter.errors import InputError

log = logging.getLogger(__name__)

MODES = ("static", "dynamic", "nbits")
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")
# Bounded calibration memory: the calibrators keep every calibrated tensor of every feed they are given in
# one collect_data call (the histogram ones the full tensors), so feeds go in strides of at most this many
# (`CalibStridedMinMax`, which quantize_static applies to every method; ranges and histograms are merged
# across strides). `CalibMaxIntermediateOutputs` is not used: in onnxruntime 1.31 MinMaxCalibrater drops the
# outputs it has collected when it reaches that count without merging their ranges.
MAX_STRIDE = 10


def calibration_stride(count: int) -> int:
    """The largest divisor of `count` up to MAX_STRIDE (quantize_static wants the strides to divide it)."""
    return max(d for d in range(1, min(count, MAX_STRIDE) + 1) if count % d == 0)


@dataclass(frozen=True)
class OrtQuantSettings:
    """One ONNX Runtime quantizer configuration. `extra_options` are `quantize_static`'s / `quantize_dynamic`'s
    documented extra options, as (key, value) pairs so the settings stay hashable and JSON-friendly."""

    scheme: str = "w8a8"
    mode: str = "static"
    calibrate_method: str = "MinMax"
    activation_type: str = "QInt8"
    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    block_size: int = 128
    is_symmetric: bool = False
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    # options of ORT's calibrator itself (`create_calibrator`'s extra_options, e.g. num_bins) that
    # quantize_static does not forward: when given, the ranges are computed with them first and handed to
    # quantize_static as its calibration cache
    calibrator_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown ONNX Runtime quantizer mode '{self.mode}' (choose from: {', '.join(MODES)})")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise InputError(f"unknown calibration method '{self.calibrate_method}' "
                             f"(choose from: {', '.join(CALIBRATION_METHODS)})")
        if {self.activation_type, self.weight_type} - {"QInt8", "QUInt8"}:
            raise InputError("activation and weight types are QInt8 or QUInt8")
        expected = {"static": "w8a8", "dynamic": "w8a8", "nbits": "w4a16"}[self.mode]
        if self.scheme != expected:
            raise InputError(f"ONNX Runtime's {self.mode} quantizer is scheme {expected}, not {self.scheme}")

    def label(self) -> str:
        """The settings as the comparison table names them."""
        if self.mode == "nbits":
            return (f"MatMulNBitsQuantizer 4-bit block {self.block_size} "
                    f"{'symmetric' if self.is_symmetric else 'asymmetric'}, accuracy_level 0")
        parts = [f"quantize_{self.mode}", "QDQ" if self.mode == "static" else "QOperator",
                 "per-channel" if self.per_channel else "per-tensor", f"W {self.weight_type}"]
        if self.mode == "static":
            parts += [f"A {self.activation_type}", self.calibrate_method]
        if self.reduce_range:
            parts.append("reduce_range")
        parts += [f"{k}={','.join(v) if isinstance(v, (tuple, list)) else v}"
                  for k, v in self.extra_options + self.calibrator_options]
        return " ".join(parts)


class TrajectoryReader:
    """A `CalibrationDataReader` over recorded DiT feeds (x, t, cross_attn_cond, global_embed per step)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only feeds [start, end) next (quantize_static's strided calibration)."""
        self._it = iter(self.feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self.feeds)


def preprocess(fp32: Path, out: Path) -> Path:
    """`quant_pre_process` of the FP32 graph into `out` (what ONNX Runtime's docs ask before quantizing)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out))
    return out


def quantized_nodes(original: onnx.ModelProto, processed: onnx.ModelProto, layers: Sequence[str]) -> list[str]:
    """Names, in the pre-processed graph, of the MatMul/Gemm nodes of `layers` (found in the original graph
    by their module scope, then in the processed one by their weight initializer). ValueError when a layer
    cannot be found exactly once."""
    from exporter.onnx.linear_nodes import locate_linears

    sites = locate_linears(original, list(layers))
    inits = {i.name for i in processed.graph.initializer}
    by_weight: dict[str, list[str]] = {}
    for node in processed.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                if name in inits:
                    by_weight.setdefault(name, []).append(node.name)
    names = []
    for layer, site in sites.items():
        found = by_weight.get(site.weight, [])
        if len(found) != 1:
            raise ValueError(f"layer {layer}: weight {site.weight} feeds {len(found)} MatMul/Gemm nodes after "
                             "quant_pre_process (expected 1)")
        names.append(found[0])
    return names


def quantize(fp32: Path, layers: Sequence[str], settings: OrtQuantSettings, out: Path,
             calibration_feeds: Sequence[dict[str, np.ndarray]] = ()) -> dict[str, Any]:
    """Quantize `fp32` with ONNX Runtime's quantizer as `settings` say, into `out` (a single-file graph);
    returns a record of what was run (the label, the API calls' arguments, the node count)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory(prefix="quadit-ortq-") as tmp:
        pre = preprocess(fp32, Path(tmp) / "pre.onnx")
        processed = onnx.load(str(pre))
        nodes = quantized_nodes(onnx.load(str(fp32)), processed, layers)
        record: dict[str, Any] = {"label": settings.label(), "nodes": len(nodes), "preprocess": "quant_pre_process"}
        extra = dict(settings.extra_options)
        if settings.mode == "static":
            if not calibration_feeds:
                raise InputError("quantize_static needs calibration feeds")
            extra.setdefault("CalibStridedMinMax", calibration_stride(len(calibration_feeds)))
            cache = None
            if settings.calibrator_options:
                cache = _calibration_cache(pre, Path(tmp), settings, calibration_feeds, extra)
            quantize_static(str(pre), str(out), TrajectoryReader(calibration_feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm"], per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range,
                            activation_type=getattr(QuantType, settings.activation_type),
                            weight_type=getattr(QuantType, settings.weight_type), nodes_to_quantize=nodes,
                            calibrate_method=getattr(CalibrationMethod, settings.calibrate_method),
                            extra_options=extra, calibration_cache_path=cache)
            record["calibration_feeds"] = len(calibration_feeds)
            record["calibrator_options"] = dict(settings.calibrator_options)
        elif settings.mode == "dynamic":
            quantize_dynamic(str(pre), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                             weight_type=getattr(QuantType, settings.weight_type), nodes_to_quantize=nodes,
                             extra_options=extra)
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            included = set(nodes)
            gemms = [n.name for n in processed.graph.node if n.op_type == "Gemm" and n.name in included]
            if gemms:  # MatMulNBits replaces MatMul only: a fused Gemm would stay float
                raise ValueError(f"MatMulNBitsQuantizer quantizes MatMul only; {len(gemms)} layers are Gemm")
            # nodes_to_include only adds to op_types_to_quantize (every MatMul with a constant weight would be
            # quantized): the other MatMuls are excluded by name
            others = [n.name for n in processed.graph.node if n.op_type == "MatMul" and n.name not in included]
            quantizer = MatMulNBitsQuantizer(processed, bits=4, block_size=settings.block_size,
                                             is_symmetric=settings.is_symmetric, accuracy_level=0,
                                             nodes_to_include=nodes, nodes_to_exclude=others,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
            onnx.save(quantizer.model.model, str(out))
        record["extra_options"] = {k: v for k, v in extra.items()}
    log.info("ONNX Runtime quantizer: %s on %d nodes", record["label"], record["nodes"])
    return record


def _calibration_cache(pre: Path, tmp: Path, settings: OrtQuantSettings, feeds: Sequence[dict[str, np.ndarray]],
                       extra: dict[str, Any]) -> Path:
    """Tensor ranges from ORT's own calibrator built with `settings.calibrator_options` (and the Calib* extra
    options quantize_static would pass), fed in the same strides; saved as a quantize_static calibration cache."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    keys = {"CalibTensorRangeSymmetric": "symmetric", "CalibMovingAverage": "moving_average",
            "CalibMovingAverageConstant": "averaging_constant", "CalibPercentile": "percentile"}
    options = {keys[k]: v for k, v in extra.items() if k in keys} | dict(settings.calibrator_options)
    calibrator = create_calibrator(pre, ["MatMul", "Gemm"], augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, settings.calibrate_method),
                                   extra_options=options)
    reader, stride = TrajectoryReader(feeds), int(extra["CalibStridedMinMax"])
    for start in range(0, len(feeds), stride):
        reader.set_range(start_index=start, end_index=start + stride)
        calibrator.collect_data(reader)
    path = tmp / "calibration_cache.json"
    save_tensors_data(calibrator.compute_data(), path, smooth_quant=False)
    return path


def quantized_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each quantization-related op a graph holds (to check the peer quantized what it claims)."""
    kinds = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
