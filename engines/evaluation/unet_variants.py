"""Several quantizations of one UNet measured side by side: the low-bit table of docs/unet.md.

Each variant is what `quadit export --model M --synthetic-weights --scheme S [--lowrank R] [--weight-rounding
gptq] [--auto-precision --size-budget B] [--residual-qdq] --target T` writes into its unet.onnx, built by the same
functions (`exporter.stages.unet_quantized.quantize_unet_graph`, `engines.evaluation.unet_report.residual_stage`,
`engines.evaluation.unet_sensitivity`), from one calibration of the same prompts, steps and seeds as the export's
(second moments included, which leave the other statistics unchanged), and measured by the report's `measure` on
the same held-out prompts against the same FP32 graph. So a cell equals that export's report.json row, at one
calibration and one reference run for the whole table instead of one per export.

    python -m engines.evaluation.unet_variants --model audioldm-mini --target onnxruntime --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from exporter.stages.unet_quantized import UNetQuantOptions

log = logging.getLogger(__name__)


def default_variants(target: str, budget: float) -> dict[str, UNetQuantOptions]:
    base = UNetQuantOptions(target=target, calib_prompts=8, calib_steps=10, report_prompts=4, report_steps=10)
    if target == "tensorrt":
        return {"w8a8": base, "w8a8 --residual-qdq": replace(base, residual_qdq=True),
                "w4a16 (Linears INT4, Conv2d FP16)": replace(base, scheme="w4a16"),
                "w4a16 --weight-rounding gptq": replace(base, scheme="w4a16", weight_rounding="gptq")}
    return {
        "w8a8": base,
        "w8a8 --weight-rounding gptq": replace(base, weight_rounding="gptq"),
        "w4a16": replace(base, scheme="w4a16"),
        "w4a16 --weight-rounding gptq": replace(base, scheme="w4a16", weight_rounding="gptq"),
        "w4a16 --lowrank 16": replace(base, scheme="w4a16", lowrank=16),
        "w4a16 --lowrank 32": replace(base, scheme="w4a16", lowrank=32),
        "w4a16 --lowrank 32 --weight-rounding gptq": replace(base, scheme="w4a16", lowrank=32, weight_rounding="gptq"),
        "w4a8 (Conv2d 4-bit)": replace(base, scheme="w4a8"),
        "w4a8 (Conv2d 4-bit) --weight-rounding gptq": replace(base, scheme="w4a8", weight_rounding="gptq"),
        f"--auto-precision --size-budget {budget}": replace(base, auto_precision=True, size_budget=budget,
                                                            weight_rounding="gptq"),
    }


def run(model_name: str, target: str, out: Path, budget: float, only: list[str] | None = None) -> dict[str, Any]:
    import onnx

    from calibration.prompts import select_prompts
    from engines.calibrate.unet import UNetCalibrationSettings, calibrate_unet
    from engines.evaluation.accuracy import heldout_prompts
    from engines.evaluation.unet_report import HELDOUT_SEED, ReportBed, measure, residual_stage
    from exporter.models.unet_audio import load_unet_model
    from exporter.models.unet_layers import quantizable_unet_layers
    from exporter.onnx import graph_edit
    from exporter.onnx.torch_export import ort_session
    from exporter.stages.unet_export import UNetExportOptions, export_unet_model
    from exporter.stages.unet_quantized import export_fp16_unet, quantize_unet_graph

    variants = default_variants(target, budget)
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    first = next(iter(variants.values()))
    model = load_unet_model(model_name, None, True, 0)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = out / f"{model_name}-fp32"
    manifest = export_unet_model(model, export_dir, UNetExportOptions(target="onnxruntime", seed=0), [])
    fp32 = export_dir / manifest["graphs"]["unet"]["file"]
    fp32_bytes = int(manifest["graphs"]["unet"]["weight_bytes"])
    seconds = float(model.dims()["default_seconds"])
    calib_prompts = select_prompts("seed", first.calib_prompts)
    prompts = heldout_prompts(calib_prompts, first.report_prompts, HELDOUT_SEED)
    calibration = calibrate_unet(model, calib_prompts, UNetCalibrationSettings(steps=first.calib_steps,
                                 buckets=min(first.calib_buckets, first.calib_steps), seconds=seconds), second_moments=True)
    layers = [name for name, _ in quantizable_unet_layers(model.unet)]
    base = fp32
    if target == "tensorrt":
        base = out / f"{model_name}-unet.fp16.onnx"
        export_fp16_unet(model, base)
    candidates, sizes, records = {}, {}, {}
    for label, options in variants.items():
        precisions = None
        if options.auto_precision:
            from engines.evaluation.unet_sensitivity import choose_unet_precisions

            precisions = choose_unet_precisions(base, layers, calibration, options, export_dir)
        quantized, record = quantize_unet_graph(base, layers, calibration.edges, calibration.ch_absmax, options,
                                                calibration.xtx, precisions)
        if options.residual_qdq:
            record["__residual_qdq__"] = residual_stage(quantized, base, export_dir, manifest, calib_prompts, options,
                                                        seconds)
        path = out / f"{model_name}-{target}-{len(candidates)}.onnx"
        graph_edit.save(quantized, path, 2 ** 31 - 1)
        sizes[label] = graph_edit.weight_bytes(quantized)
        residual = record.pop("__residual_qdq__", None)
        counts: dict[str, int] = {}
        for rec in record.values():
            key = rec.get("scheme", "w8a8") + (f"+r{rec['rank']}" if rec.get("rank") else "")
            counts[key] = counts.get(key, 0) + 1
        records[label] = {"options": asdict(options), "precisions": counts, "file": path.name,
                          **({"residual_qdq": {k: v for k, v in residual.items() if k != "per_add"}} if residual else {})}
        candidates[label] = ort_session(path)
        del quantized
    if target == "tensorrt":
        candidates["FP16 base (unquantized)"] = ort_session(base)
        sizes["FP16 base (unquantized)"] = graph_edit.weight_bytes(onnx.load(str(base)))
    bed = ReportBed(export_dir, manifest, first.report_steps, seconds)
    rows = measure(bed, ort_session(fp32), candidates, prompts)
    for row in rows:
        row["unet_weight_bytes"] = sizes[row["candidate"]]
        row["size_ratio"] = round(sizes[row["candidate"]] / fp32_bytes, 4)
        row.update(records.get(row["candidate"], {}))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"model": model_name, "target": target, "fp32_unet_weight_bytes": fp32_bytes, "heldout_prompts": prompts,
           "steps": first.report_steps, "seconds": seconds, "calibration": calibration.summary, "commit": commit,
           "rows": rows}
    (out / f"{model_name}-{target}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{model_name}-{target}.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# {doc['model']}, {doc['target']} target: low-bit UNet variants against FP32", "",
             f"{len(doc['heldout_prompts'])} held-out prompts, {doc['steps']} steps, {doc['seconds']} s; dB (higher is "
             f"better); size = UNet weight bytes / FP32 ({doc['fp32_unet_weight_bytes'] / 1e6:.1f} MB); commit "
             f"{doc['commit']}.", "", "| variant | step SQNR | final-latent SNR | audio SNR | UNet size | layers |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        layers = ", ".join(f"{v} {k}" for k, v in sorted(r.get("precisions", {}).items()))
        lines.append(f"| {r['candidate']} | {r['step_sqnr_db']:.2f} | {r['latent_snr_db']:.2f} | {r['audio_snr_db']:.2f} "
                     f"| {r['size_ratio']:.3f}x | {layers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.evaluation.unet_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    parser.add_argument("--budget", type=float, default=0.25, help="the auto-precision variant's size budget")
    parser.add_argument("--only", action="append", help="run only this variant label (repeatable)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory():
        doc = run(args.model, args.target, Path(args.out), args.budget, args.only)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
