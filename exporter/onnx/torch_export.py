"""torch -> ONNX for the DiT, the text encoder, the number conditioners and the VAE decoder.

Uses the dynamo exporter (`torch.onnx.export(dynamo=True)`): the legacy TorchScript exporter cannot
trace stable-audio-tools' `F.layer_norm(x, x.shape[-1:])` with a dynamic length. Opset 21 (INT4
block-wise Q/DQ needs it later), IR version capped at 10 (onnx 1.23 writes IR 14 by default, which
onnxruntime 1.31 refuses), external data when a graph's weights pass 2 GB (the protobuf limit), and no
value_info for initializers (graph_edit.drop_stale_value_info: ONNX Runtime's quantizer fails on them).
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from exporter.onnx import fp4_emulation

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave room for the graph itself


@dataclass(frozen=True)
class GraphSpec:
    """One graph to export: module, example inputs, names, and which input dims are dynamic."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    dynamic: dict[str, dict[int, str]]
    # per dynamic-dim label, (min, max, multiple_of) where the default (1, 65536, 1) does not hold: a UNet's
    # frame axis must divide by its total down-sampling factor, and its batch stays below 64 (diffusers'
    # nearest upsampling switches code path there), guards torch.export would otherwise refuse
    dim_ranges: dict[str, tuple[int, int, int]] | None = None


def weight_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _dynamic_shapes(spec: GraphSpec) -> tuple[Any, ...]:
    """Positional dynamic-shape specs; a module with `*values` gets them nested as one argument."""
    import inspect

    from torch.export import Dim

    dims: dict[str, Any] = {}
    for label, (low, high, multiple) in (spec.dim_ranges or {}).items():
        dims[label] = Dim(label, min=low, max=high) if multiple == 1 else \
            multiple * Dim(f"{label}_over_{multiple}", min=-(-low // multiple), max=high // multiple)
    shapes = tuple({axis: dims.setdefault(label, Dim(label, min=1, max=1 << 16))
                    for axis, label in spec.dynamic.get(name, {}).items()} or None
                   for name in spec.input_names)
    params = inspect.signature(spec.module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return (shapes,)
    return shapes


def export_graph(spec: GraphSpec, path: Path) -> dict[str, Any]:
    """Export one graph to `path`; returns its manifest entry (external data, weight bytes)."""
    import onnx

    external = weight_bytes(spec.module) > PROTOBUF_LIMIT
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.example, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), opset_version=OPSET, dynamo=True,
                          dynamic_shapes=_dynamic_shapes(spec), external_data=external, verbose=False)
    from exporter.onnx.graph_edit import drop_stale_value_info
    from exporter.onnx.graph_edit import weight_bytes as graph_weight_bytes

    model = onnx.load(str(path), load_external_data=False)
    dropped = drop_stale_value_info(model)  # other ONNX tools' shape inference trips over them
    if model.ir_version > IR_VERSION or dropped:
        model.ir_version = min(model.ir_version, IR_VERSION)
        onnx.save(model, str(path))  # external data, if any, stays where the exporter wrote it

    graph_bytes = graph_weight_bytes(model)
    files = [path.name] + ([p.name for p in path.parent.glob(path.name + ".data")] if external else [])
    return {"file": path.name, "files": files, "external_data": external, "weight_bytes": graph_bytes,
            "inputs": list(spec.input_names), "outputs": list(spec.output_names),
            "dynamic_axes": {k: {str(a): lbl for a, lbl in v.items()} for k, v in spec.dynamic.items()},
            "opset": OPSET, "ir_version": min(model.ir_version, IR_VERSION)}


# `ort_session_config` keys that name SessionOptions attributes (values are strings in the manifest); every
# other key is a session config entry ("session.*", "mlas.*"), passed to add_session_config_entry
SESSION_OPTIONS = {"intra_op_num_threads": int, "inter_op_num_threads": int, "enable_cpu_mem_arena": bool,
                   "enable_mem_pattern": bool, "graph_optimization_level": str}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def apply_session_config(options: Any, config: dict[str, str]) -> None:
    """Set a manifest's `ort_session_config` on `options`: SessionOptions attributes by name (the
    settings chosen by measurement: threads, arena, graph optimisation level), config entries otherwise."""
    import onnxruntime as ort

    for key, value in config.items():
        kind = SESSION_OPTIONS.get(key)
        if kind is None:
            options.add_session_config_entry(key, str(value))
        elif key == "graph_optimization_level":
            if str(value) not in _OPT_LEVELS:
                raise ValueError(f"ort_session_config: unknown graph_optimization_level {value!r} "
                                 f"(choose from: {', '.join(_OPT_LEVELS)})")
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[str(value)])
        elif kind is bool:
            setattr(options, key, str(value).lower() in ("1", "true"))
        else:
            setattr(options, key, int(value))


def ort_session(path: Path, config: dict[str, str] | None = None, profile_prefix: str | None = None,
                providers: Sequence[Any] | None = None):
    """A session (CPU unless `providers` says otherwise: `engines.runtime.providers` picks them for a device);
    `config` holds session config entries a graph needs (its manifest entry's `ort_session_config`, e.g.
    the MatMulNBits accuracy level of a w4a16 graph). `profile_prefix` turns on ORT's profiler, writing
    `<prefix>_<date>.json` at `end_profiling()`."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    apply_session_config(options, config or {})
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = list(providers or ["CPUExecutionProvider"])
    if fp4_emulation.needs_emulation(Path(path)):
        # TensorRT's NVFP4 form has no ONNX Runtime kernels: run the same arithmetic in standard ops
        emulated = fp4_emulation.emulate(onnx.load(str(path)))
        if emulated.ByteSize() < 2 ** 31 - 2 ** 24:
            return ort.InferenceSession(emulated.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="quadit-fp4-") as tmp:
            onnx.save(emulated, str(Path(tmp) / "emulated.onnx"), save_as_external_data=True, location="emulated.data")
            return ort.InferenceSession(str(Path(tmp) / "emulated.onnx"), options, providers=providers)
    return ort.InferenceSession(str(path), options, providers=providers)


def relative_error(out: Any, ref: Any) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, max |out - ref|): error relative to the output's scale, which does
    not blow up on the near-zero elements that an elementwise relative error would divide by."""
    import numpy as np

    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {out.shape} != PyTorch {ref.shape}")
    abs_err = float(np.abs(out - ref).max())
    return abs_err / max(float(np.abs(ref).max()), 1e-30), abs_err


def parity(session: Any, module: nn.Module, cases: Sequence[tuple[torch.Tensor, ...]],
           input_names: Sequence[str], reference: nn.Module | None = None) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on the same inputs; report the worst relative error.

    `reference` (default `module`) is what the graph is compared with: an FP16 graph is compared with
    the FP32 model, so its figure is the error a user of the graph gets.
    """
    reference = reference or module
    rows = []
    for case in cases:
        with torch.no_grad():
            ref = reference(*case)
        feeds = {n: c.numpy() for n, c in zip(input_names, case)}
        out = session.run(None, feeds)
        refs = ref if isinstance(ref, tuple) else (ref,)
        errs = [relative_error(o, r.float().numpy()) for o, r in zip(out, refs)]
        rows.append({"shape": list(case[0].shape), "max_rel_error": max(e[0] for e in errs),
                     "max_abs_error": max(e[1] for e in errs)})
    return {"max_rel_error": max(r["max_rel_error"] for r in rows),
            "max_abs_error": max(r["max_abs_error"] for r in rows), "cases": rows}
