"""Seed 002's (PTQ4ADM) two experiments on the UNet family, measured like quadit's report (`unet_report.measure`):
step SQNR, final-latent SNR and audio SNR against the FP32 graph on held-out prompts.

1. Conv2d bit-width sweep (its Figure 3): the UNet's Conv2d weights rounded to b bits (symmetric, per output
   channel, min-max: "uniform quantization without calibration"), every other layer and all activations float;
   weights are stored dequantized in an FP32 graph, so this measures the numerics of b-bit weights, not a
   deployable b-bit kernel (INT8 and INT4 are what the backends run).
2. Calibration sets (its Figure 4): W8A8 (quadit's default method) calibrated on a budget of (prompt, step)
   samples chosen by `random`, `normal` (timesteps around the middle of the trajectory) or PTQ4ADM's
   `activation-aware` selection (`calibration.selection`), from the seed prompts (vanilla) or the
   coverage-augmented ones (`calibration.prompts.select_prompts("augmented")`).

Writes `unet-study.json`, `unet-study.md` and `unet-study.png` into `--out`.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from calibration.prompts import select_prompts
from calibration.selection import select_samples
from engines.calibrate.unet import UNetCalibrationSettings, calibrate_unet
from engines.evaluation.accuracy import heldout_prompts
from engines.evaluation.unet_report import HELDOUT_SEED, ReportBed, measure
from exporter.models.unet_audio import load_unet_model
from exporter.models.unet_layers import quantizable_unet_layers
from exporter.onnx.torch_export import ort_session
from exporter.passes.conv_quant import int8_weight, locate_sites, quantize_unet
from exporter.stages.unet_export import UNetExportOptions, export_unet_model

log = logging.getLogger(__name__)
CONV_BITS = (8, 6, 5, 4, 3)
SELECTION_METHODS = ("random", "normal", "activation-aware")


class _Session:
    """An ONNX Runtime session of an in-memory graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(names), feed)


def conv_weight_graph(fp32: onnx.ModelProto, layers: Sequence[str], bits: int) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the FP32 UNet graph whose Conv2d weights are rounded to `bits` (see the module docstring)."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    sites = {k: v for k, v in locate_sites(model, list(layers)).items() if v.op_type == "Conv"}
    inits = {t.name: t for t in model.graph.initializer}
    params = 0
    for site in sites.values():
        w = numpy_helper.to_array(inits[site.weight]).astype(np.float64)
        codes, scale = int8_weight(w, site.n_axis, np.float32, bits)
        shape = [1] * w.ndim
        shape[site.n_axis] = -1
        inits[site.weight].CopyFrom(numpy_helper.from_array(
            (codes.astype(np.float64) * scale.astype(np.float64).reshape(shape)).astype(np.float32), site.weight))
        params += w.size
    return model, {"conv_layers": len(sites), "conv_params": params}


def _bits_study(bed: ReportBed, reference: Any, fp32: onnx.ModelProto, layers: Sequence[str],
                prompts: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for bits in CONV_BITS:
        graph, info = conv_weight_graph(fp32, layers, bits)
        row = measure(bed, reference, {f"Conv2d W{bits}": _Session(graph)}, prompts)[0]
        rows.append({"bits": bits, **info, **row})
        log.info("Conv2d W%d: step SQNR %.2f dB, final-latent SNR %.2f dB, audio SNR %.2f dB", bits,
                 row["step_sqnr_db"], row["latent_snr_db"], row["audio_snr_db"])
    return rows


def _selection_study(model: Any, bed: ReportBed, reference: Any, fp32: onnx.ModelProto, layers: Sequence[str],
                     prompts: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    settings = UNetCalibrationSettings(steps=args.calib_steps, buckets=args.buckets, seconds=bed.seconds)
    for pool in ("vanilla", "augmented"):
        source = "seed" if pool == "vanilla" else "augmented"
        calib_prompts = [p for p in select_prompts(source, args.calib_prompts + len(prompts)) if p not in prompts]
        calibration = calibrate_unet(model, calib_prompts[:args.calib_prompts], settings, record_samples=True)
        for method in SELECTION_METHODS:
            chosen = select_samples(method, calibration.samples, calibration.full, args.budget, args.calib_prompts,
                                    args.calib_steps, seed=0)
            subset = calibration.from_samples(chosen)
            graph = onnx.ModelProto()
            graph.CopyFrom(fp32)
            quantize_unet(graph, locate_sites(graph, list(layers)), subset.ch_absmax, subset.edges)
            row = measure(bed, reference, {f"w8a8 {method} / {pool}": _Session(graph)}, prompts)[0]
            rows.append({"prompts": pool, "selection": method, "samples": len(chosen), **row})
            log.info("W8A8 calibrated on %d %s samples of %s prompts: final-latent SNR %.2f dB", len(chosen), method,
                     pool, row["latent_snr_db"])
    return rows


def _markdown(result: dict[str, Any]) -> str:
    lines = ["# UNet studies (seed 002: PTQ4ADM Figures 3 and 4)", ""]
    for bed in result["beds"]:
        ctx = bed["context"]
        lines += [f"## {bed['model']}", "", f"{ctx['prompts']} held-out prompts, {ctx['steps']} steps, "
                  f"{ctx['seconds']} s; dB against FP32, higher is better.", "",
                  "| Conv2d weights | step SQNR | final-latent SNR | audio SNR |", "|---|---|---|---|"]
        lines += [f"| {r['bits']} bit | {r['step_sqnr_db']:.2f} | {r['latent_snr_db']:.2f} | {r['audio_snr_db']:.2f} |"
                  for r in bed["conv_bits"]]
        lines += ["", f"W8A8 calibrated on {ctx['budget']} of {ctx['calib_prompts']} x {ctx['calib_steps']} "
                  "(prompt, step) samples:", "", "| prompts | selection | step SQNR | final-latent SNR | audio SNR |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['prompts']} | {r['selection']} | {r['step_sqnr_db']:.2f} | {r['latent_snr_db']:.2f} | "
                  f"{r['audio_snr_db']:.2f} |" for r in bed["calibration_sets"]]
        lines.append("")
    return "\n".join(lines)


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for bed in result["beds"]:
        bits = [r["bits"] for r in bed["conv_bits"]]
        axes[0].plot(bits, [r["latent_snr_db"] for r in bed["conv_bits"]], marker="o", label=bed["model"])
        labels = [f"{r['selection']}\n{r['prompts']}" for r in bed["calibration_sets"]]
        axes[1].plot(labels, [r["latent_snr_db"] for r in bed["calibration_sets"]], marker="s", label=bed["model"])
    axes[0].set(xlabel="Conv2d weight bits", ylabel="final-latent SNR vs FP32 (dB)", title="Conv2d bit-width")
    axes[0].invert_xaxis()
    axes[1].set(ylabel="final-latent SNR vs FP32 (dB)", title="W8A8 calibration sets")
    axes[1].tick_params(axis="x", labelsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bed(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    model = load_unet_model(name, None, True, seed)
    layers = [n for n, _ in quantizable_unet_layers(model.unet)]
    with tempfile.TemporaryDirectory(prefix="quadit-study-") as tmp_dir:
        export = Path(tmp_dir) / "fp32"
        manifest = export_unet_model(model, export, UNetExportOptions(seed=seed))
        seconds = float(args.seconds or manifest["dims"]["default_seconds"])
        bed = ReportBed(export, manifest, args.steps, seconds)
        fp32 = onnx.load(str(export / manifest["graphs"]["unet"]["file"]))
        reference = ort_session(export / manifest["graphs"]["unet"]["file"])
        prompts = heldout_prompts(select_prompts("seed", args.calib_prompts), args.prompts, HELDOUT_SEED)
        started = time.time()
        bits = _bits_study(bed, reference, fp32, layers, prompts)
        sets = _selection_study(model, bed, reference, fp32, layers, prompts, args)
    context = {"prompts": len(prompts), "steps": args.steps, "seconds": seconds, "calib_prompts": args.calib_prompts,
               "calib_steps": args.calib_steps, "budget": args.budget, "buckets": args.buckets,
               "heldout_prompts": prompts, "seconds_taken": round(time.time() - started, 1)}
    return {"model": name, "weights": f"synthetic:{seed}", "context": context, "conv_bits": bits,
            "calibration_sets": sets}


def execute(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"beds": [run_bed(name, args.seed, args) for name in args.models.split(",")]}
    (out / "unet-study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "unet-study.md").write_text(_markdown(result))
    _chart(result, out / "unet-study.png")
    log.info("wrote %s", ", ".join(str(out / f) for f in ("unet-study.json", "unet-study.md", "unet-study.png")))
    return 0
