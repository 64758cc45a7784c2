"""`--auto-precision` for a UNet: a precision per Conv2d / Linear layer from its sensitivity, within a size budget.

The choice is the DiT's (`engines.evaluation.auto_precision.choose`: an exact multiple-choice knapsack over the
weight bytes, minimising the summed noise share, one precision per activation tensor since its readers share
one quantizer). What differs is how a layer's cost is found. The DiT quantizes each layer alone in the graph
and runs sampler steps (117 layers x 3-4 precisions would be 400 graph builds and runs here, an hour of the
2-core CPU). For a UNet layer the cost is its own output noise share on the calibration data, from the
statistics calibration already holds:

- weight part, exact on the calibration inputs: tr(D^T H D) / tr(W^T H W), H = E[p p^T] over the layer's
  (im2col'd) inputs (`engines.calibrate.unet_moments`), D the rounding error of the weights as the export
  rounds them (same smoothing, scheme, block, rank and rounding);
- activation part (w8a8, w4a8), a model: uniform rounding noise of step range_b / 127 per input element,
  power mean_b(step_b^2) / 12 per element, through the weight: ||W||_F^2 step^2 / 12 over tr(W^T H W).

A layer-local noise share is not the model-output share the DiT measures (it leaves out how much each layer's
error is amplified downstream), so the chosen assignment is then measured end to end like every export (the
report). `sensitivity.json` in the export lists every layer's costs and bytes and the choice.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.errors import InputError
from exporter.passes import qdq
from exporter.passes.conv_lowbit import BITS, FLOAT, conv_channels, int4_block, weight_kn
from exporter.passes.conv_quant import initializer, locate_sites, per_channel_view, smoothing_factors
from exporter.passes.gptq import WeightQuant, output_error, quantize_weight
from exporter.passes.lowrank import svd_split
from exporter.passes.recipe import ORT_INT4_BLOCKS, TRT_INT4_BLOCKS

log = logging.getLogger(__name__)
OPTIONS = {"onnxruntime": ("w8a8", "w4a8", "w4a16", "w4a16+r16"), "tensorrt": ("w8a8", "w4a16", "w4a16+r16")}


def _bytes(k: int, n: int, precision: str, block: int, fsize: int, channels: int) -> float:
    scheme, _, rank = precision.partition("+r")
    r = int(rank or 0)
    lowrank = 2.0 * r * (k + n)
    if scheme == "w8a8":
        return k * n + n * fsize + channels * fsize + lowrank
    body = k * n / 2 + (k // block) * n * fsize + lowrank
    return body + (channels * fsize if scheme == "w4a8" else 0)


def layer_costs(model: onnx.ModelProto, sites: Mapping[str, Any], ch_absmax: Mapping[str, np.ndarray],
                xtx: Mapping[str, np.ndarray], options: Any) -> list[dict[str, Any]]:
    """Per layer: its group (activation tensor) and, per precision it can take on the target, the noise share
    and the weight bytes it changes against the base graph (see the module docstring)."""
    allowed = TRT_INT4_BLOCKS if options.target == "tensorrt" else ORT_INT4_BLOCKS
    groups: dict[str, list[str]] = {}
    for layer, site in sites.items():
        groups.setdefault(site.activation, []).append(layer)
    rows = []
    for tensor, members in groups.items():
        weights = {m: numpy_helper.to_array(initializer(model, sites[m].weight)).astype(np.float64) for m in members}
        amax = np.max([np.asarray(ch_absmax[m], np.float64) for m in members], axis=0)
        factors = smoothing_factors(amax.max(axis=0), [per_channel_view(weights[m], sites[m].k_axis) for m in members],
                                    options.alpha) if options.method != "minmax" else np.ones(amax.shape[1])
        steps2 = float(np.mean(((amax / factors[None, :]).max(axis=1) / 127.0) ** 2))
        for m in members:
            site, w = sites[m], weights[m]
            shape = list(w.shape)
            fsize = 2 if initializer(model, site.weight).data_type == onnx.TensorProto.FLOAT16 else 4
            raw = weight_kn(w, site)
            k, n = raw.shape
            h = xtx.get(m)
            if h is None:
                raise InputError(f"layer {m} has no second moments; calibrate with second moments for --auto-precision")
            taps = k // int(factors.shape[0])
            smooth = np.tile(factors, taps)
            costs: dict[str, dict[str, Any]] = {}
            for precision in OPTIONS[options.target]:
                scheme, _, rank = precision.partition("+r")
                block = options.block_size
                if BITS[scheme] == 4:
                    if options.target == "tensorrt" and site.op_type == "Conv":
                        continue  # TensorRT's INT4 weight-only path is GEMM-only (exporter.passes.conv_lowbit)
                    block = int4_block(conv_channels(site, shape), n, options.block_size, allowed)
                    if block is None:
                        continue
                act = scheme in ("w8a8", "w4a8")
                w_kn = raw * smooth[:, None] if act else raw
                hs = np.asarray(h, np.float64) / smooth[:, None] / smooth[None, :] if act else np.asarray(h, np.float64)
                resid = w_kn
                if rank:
                    _, _, resid = svd_split(w_kn, int(rank))
                q, s = quantize_weight(resid, BITS[scheme], None if BITS[scheme] == 8 else block, np.float32,
                                       WeightQuant(options.weight_rounding), hs)
                deq = w_kn - resid + qdq.dequantize(q, s)
                nsr = output_error(w_kn, deq, hs)
                if act:
                    power = max(float(np.sum(w_kn * (hs @ w_kn))), 1e-300)
                    nsr += float(np.sum(w_kn ** 2)) * steps2 / 12.0 / power
                size = _bytes(k, n, precision, block, fsize, int(factors.shape[0]))
                costs[precision] = {"step_nsr": nsr, "final_nsr": nsr, "weight_bytes_delta": size - k * n * fsize}
            rows.append({"name": m, "group": tensor, "op": site.op_type, "schemes": costs})
    return rows


def choose_unet_precisions(base: Path, layers: Sequence[str], calibration: Any, options: Any, out_dir: Path
                           ) -> dict[str, str]:
    """The per-layer precisions for `--auto-precision --size-budget` (see the module docstring); writes
    `sensitivity.json` into the export directory."""
    from engines.evaluation.auto_precision import choose

    model = onnx.load(str(base))
    sites = locate_sites(model, list(layers))
    rows = layer_costs(model, sites, calibration.ch_absmax, calibration.xtx, options)
    # a group takes one precision: only the precisions every member can take are offered
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    for members in by_group.values():
        common = set.intersection(*(set(r["schemes"]) for r in members))
        for r in members:
            r["schemes"] = {p: c for p, c in r["schemes"].items() if p in common}
    schemes = sorted({p for r in rows for p in r["schemes"]})
    from exporter.onnx import graph_edit

    base_bytes = graph_edit.weight_bytes(model)
    fp32_bytes = base_bytes if all(i.data_type != onnx.TensorProto.FLOAT16 for i in model.graph.initializer) else None
    if fp32_bytes is None:
        manifest = json.loads((out_dir / "manifest.json").read_text()) if (out_dir / "manifest.json").exists() else None
        fp32_bytes = int(manifest["graphs"]["unet"]["weight_bytes"]) if manifest else 2 * base_bytes
    for r in rows:  # a layer missing a precision (TensorRT Conv: no INT4) gets it as "stay float" in the knapsack
        for p in schemes:
            r["schemes"].setdefault(p, {"step_nsr": 0.0, "final_nsr": 0.0, "weight_bytes_delta": 0.0, "absent": True})
    doc = {"layers": rows, "schemes": schemes, "base_weight_bytes": base_bytes, "fp32_weight_bytes": fp32_bytes}
    choice = choose(doc, float(options.size_budget), "step_nsr", schemes)
    assignment = {name: (FLOAT if _absent(doc, name, p) else p) for name, p in choice.assignment.items()}
    counts: dict[str, int] = {}
    for p in assignment.values():
        counts[p] = counts.get(p, 0) + 1
    log.info("auto-precision at budget %.3f of FP32: predicted size %.3f, %s", options.size_budget,
             choice.size_ratio, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    (out_dir / "sensitivity.json").write_text(json.dumps({
        "kind": "quadit-unet-sensitivity", "schema": 1, "target": options.target, "budget": options.size_budget,
        "cost": "layer-local output noise share on the calibration's second moments (weights exact, activations "
                "modelled); see engines/evaluation/unet_sensitivity.py",
        "predicted_size_ratio": round(choice.size_ratio, 4), "counts": counts, "assignment": assignment,
        "layers": rows, "base_weight_bytes": base_bytes, "fp32_weight_bytes": fp32_bytes}, indent=1) + "\n")
    return assignment


def _absent(doc: Mapping[str, Any], name: str, precision: str) -> bool:
    if precision == FLOAT:
        return False
    row = next(r for r in doc["layers"] if r["name"] == name)
    return bool(row["schemes"][precision].get("absent"))
