"""`scripts/bench.py --predict`: the roofline PREDICTION of TensorRT FP16, w8a8, fp8 (GEMMs only, and with FP8 attention),
w4a16 and nvfp4 (with and without a rank-32 branch; Blackwell only) DiT engines per GPU (a UNet-family model,
AudioLDM / TANGO: FP16 and w8a8 UNet engines, `predict_unet_main`).

Nothing is timed. The TensorRT-target graphs are built as `scripts/export.py --target tensorrt` builds them
(the FP16 DiT, quantized with FP16 scales), read by the precision map (what a strongly typed build runs each
layer in, and its FLOPs and bytes at each latent length) and costed by exporter/tensorrt/speed_model.py. Without
`--calibration` the graphs are quantized from flat statistics: types, shapes and the per-bucket scale ops do
not depend on the calibrated values, so the prediction is the same.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from exporter.passes.recipe import ROUND_TO_NEAREST

log = logging.getLogger("bench.predict")
# The prediction reads only the graph's structure (precisions, shapes), which the weight and smoothing passes
# do not change: weights are rounded to nearest, which needs no second moments and is quick at full size.
RECIPES = {"w8a8": dict(scheme="w8a8", **ROUND_TO_NEAREST),
           "fp8": dict(scheme="fp8", **ROUND_TO_NEAREST),
           "fp8 + fp8 attention": dict(scheme="fp8", attention_quant="fp8", **ROUND_TO_NEAREST),
           "w4a16": dict(scheme="w4a16", block_size=128, **ROUND_TO_NEAREST),
           # NVFP4 (Blackwell only: the other GPUs' rows say "not supported"); the fallback rule needs input rows
           "nvfp4": dict(scheme="nvfp4", nvfp4_fallback_db=0.0, **ROUND_TO_NEAREST),
           "nvfp4 + lowrank 32": dict(scheme="nvfp4", lowrank=32, nvfp4_fallback_db=0.0, **ROUND_TO_NEAREST)}


def flat_calibration(loaded, buckets: int = 4):
    """Unit ranges for every quantizable layer over `buckets` equal-width timestep buckets."""
    from engines.calibrate.attention_stats import attention_modules
    from exporter.models.layers import quantizable_linears
    from exporter.passes.quantize import LayerStats
    from exporter.stages.quantized import Calibration

    stats = {n: LayerStats(np.ones((buckets, m.in_features), np.float32), np.ones(buckets, np.float32))
             for n, m in quantizable_linears(loaded.dit).items()}
    edges = tuple(float(e) for e in np.linspace(1.0, 0.0, buckets + 1))
    attention = {f"{m}.{p}": np.ones(buckets, np.float32) for m in attention_modules(loaded.dit) for p in "qkv"}
    return Calibration(Path("."), {"artifact_sha256": "flat"}, stats, edges, attention)


def _chart(doc: dict[str, Any], path: Path, length: int, subject: str = "DiT call", unit: str = "latents") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = doc["lengths"][str(length)]["gpus"]
    gpus, cands = list(table), list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(cands)
    for i, c in enumerate(cands):
        # a precision a GPU has no tensor cores for (NVFP4 before Blackwell) has no bar
        ax.bar([g + i * width for g in range(len(gpus))], [table[g][c].get("total_ms", 0.0) for g in gpus], width,
               label=c)
    ax.set_xticks([g + width * (len(cands) - 1) / 2 for g in range(len(gpus))], gpus)
    ax.set_ylabel(f"ms per {subject} (CFG batch 2)")
    ax.set_title(f"PREDICTION (roofline, not measured), {length} {unit}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predict_main(loaded, calibration, lengths: list[int], out: Path) -> dict[str, Any]:
    import onnx

    from exporter.models.layers import quantizable_linears
    from exporter.onnx.artifacts import atomic_dir
    from exporter.passes.recipe import Recipe
    from exporter.stages.export import runtime_spec
    from exporter.stages.quantized import export_fp16_base, quantize_graph
    from exporter.tensorrt.precision_map import precision_map
    from exporter.tensorrt.speed_model import markdown, predict_all

    calibration = calibration or flat_calibration(loaded)
    dims = runtime_spec(loaded)["dims"]
    layers = list(quantizable_linears(loaded.dit))
    with tempfile.TemporaryDirectory(prefix="quadit-predict-") as scratch:
        base = Path(scratch) / "dit.fp16.onnx"
        export_fp16_base(loaded, dims, base)
        # one graph in memory at a time: each is read into its precision maps and dropped (a full-size
        # FP16 DiT and its quantized copies do not fit 24 GB together)
        maps: dict[int, dict[str, Any]] = {length: {} for length in lengths}
        for name, fields in {"fp16": None, **RECIPES}.items():
            if fields is None:
                graph = onnx.load(str(base), load_external_data=False)
            else:
                log.info("quantizing the FP16 graph: %s", name)
                graph, _ = quantize_graph(base, layers, calibration, Recipe(**fields))
            for length in lengths:
                maps[length][name] = precision_map(graph, latents=length)
            del graph
        doc: dict[str, Any] = {"kind": "PREDICTION (roofline from the precision map; not a measurement)",
                               "model": loaded.identity, "calibration": calibration.meta.get("artifact_sha256"),
                               "recipes": RECIPES, "lengths": {}}
        lines: list[str] = []
        for length in lengths:
            pred = predict_all(maps[length])
            pred["precision"] = {n: m.summary() for n, m in maps[length].items()}
            doc["lengths"][str(length)] = pred
            lines += [markdown(pred, length, 2), ""]
    first = pred["precision"]
    lines += ["FLOP share by precision (strongly typed TensorRT, from the precision map): " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["flop_share"].items()) for n, s in first.items()), "",
        "Published TensorRT figures to hold it against: " + "; ".join(f"{p['what']}: {p['speedup']}"
                                                                    for p in pred["published"])]
    with atomic_dir(Path(out)) as tmp:
        (tmp / "predict.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "predict.md").write_text("\n".join(lines) + "\n")
        _chart(doc, tmp / "predict.png", lengths[-1])
    print("\n".join(lines))
    return doc


UNET_BUCKETS = 3  # the UNet export's default --calib-buckets: the per-bucket scale ops the w8a8 graph carries


def flat_unet_calibration(model: Any, buckets: int = UNET_BUCKETS) -> tuple[list[str], tuple[float, ...],
                                                                           dict[str, np.ndarray]]:
    """(quantized layers, bucket edges in the UNet's t, unit [K, C] channel ranges): what `quantize_unet_graph`
    reads, with flat values. Types, shapes and the per-bucket ops do not depend on the values."""
    from torch import nn

    from calibration.collector import BucketSpec
    from engines.calibrate.unet import schedule_timesteps
    from exporter.models.unet_layers import quantizable_unet_layers

    layers = dict(quantizable_unet_layers(model.unet))
    edges = BucketSpec.by_step(schedule_timesteps(model.scheduler_config, 10), buckets).edges
    width = {n: m.in_channels if isinstance(m, nn.Conv2d) else m.in_features for n, m in layers.items()}
    return list(layers), tuple(edges), {n: np.ones((buckets, c)) for n, c in width.items()}


def unet_frames(dims: dict[str, Any], seconds: float) -> int:
    from exporter.models.unet_sampling import latent_shape

    return latent_shape(dims, seconds)[1]


def predict_unet_main(model: Any, frames: list[int] | None, out: Path) -> dict[str, Any]:
    """The PREDICTION for a UNet-family model: its TensorRT-target graphs built as `scripts/export.py --scheme w8a8
    --target tensorrt` builds them (the FP16 base graph of `exporter.stages.unet_quantized`, INT8 Conv2d/Linear with
    FP16 scales, timestep-bucketed pre-scales), from flat statistics, costed at each latent frame count in `frames`
    (default: the model's default and longest lengths) with CFG batch 2. Writes predict.json/.md/.png to `out`."""
    import onnx

    from exporter.errors import InputError
    from exporter.onnx.artifacts import atomic_dir
    from exporter.stages.unet_quantized import UNetQuantOptions, export_fp16_unet, quantize_unet_graph
    from exporter.tensorrt.precision_map import precision_map
    from exporter.tensorrt.speed_model import markdown, predict_all

    dims = model.dims()
    multiple = int(dims["latent_frame_multiple"])
    longest = unet_frames(dims, float(dims["max_seconds"]))
    frames = frames or [unet_frames(dims, float(dims["default_seconds"])), longest]
    if bad := [n for n in frames if n < multiple or n % multiple or n > longest]:
        raise InputError(f"--lengths {bad}: a UNet's latent frames are multiples of {multiple} up to {longest} "
                         f"({dims['max_seconds']} s) for this model")
    seconds = {n: n * int(dims["vae_scale"]) * float(dims["hop_seconds"]) for n in frames}
    maps: dict[int, dict[str, Any]] = {n: {} for n in frames}
    with tempfile.TemporaryDirectory(prefix="quadit-predict-") as scratch:
        base = Path(scratch) / "unet.fp16.onnx"
        export_fp16_unet(model, base)
        layers, edges, ch_absmax = flat_unet_calibration(model)
        graphs = {"fp16": onnx.load(str(base), load_external_data=False),
                  "w8a8": quantize_unet_graph(base, layers, edges, ch_absmax, UNetQuantOptions(target="tensorrt"))[0]}
        for name, graph in graphs.items():
            for n in frames:
                maps[n][name] = precision_map(graph, latents=n, extra_dims={"frames": n})
    doc: dict[str, Any] = {"kind": "PREDICTION (roofline from the precision map; not a measurement)",
                           "model": model.identity, "family": "unet", "calibration": "flat", "unit": "latent frames",
                           "recipes": {"w8a8": asdict(UNetQuantOptions(target="tensorrt"))}, "lengths": {}}
    lines: list[str] = []
    for n in frames:
        pred = predict_all(maps[n])
        pred["precision"] = {k: m.summary() for k, m in maps[n].items()}
        pred["seconds"] = seconds[n]
        doc["lengths"][str(n)] = pred
        lines += [markdown(pred, n, 2, f"UNet step at {n} latent frames ({seconds[n]:.2f} s of audio)"), ""]
    first = doc["lengths"][str(frames[0])]["precision"]
    lines += ["FLOP share by precision (strongly typed TensorRT, from the precision map): " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {100 * v:.1f}%" for p, v in m["flop_share"].items()) for k, m in first.items()), "",
        "Launch overheads are left out (the figures are lower bounds): for a model this small they can outweigh the "
        "predicted milliseconds, so hold the ratios, not the times, against a measurement."]
    with atomic_dir(Path(out)) as tmp:
        (tmp / "predict.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "predict.md").write_text("\n".join(lines) + "\n")
        _chart(doc, tmp / "predict.png", frames[-1], "UNet call", "latent frames")
    print("\n".join(lines))
    return doc
