"""`scripts/export.py` for the UNet family (AudioLDM, TANGO): text_encoder.onnx, unet.onnx (FP32 or quantized),
vae_decoder.onnx, vocoder.onnx, tokenizer/, scheduler_config.json and manifest.json. A quantized scheme
calibrates the UNet's Conv2d and Linear inputs per timestep bucket on seed prompts, quantizes unet.onnx and
writes the accuracy report (report.json / report.md: step SQNR, final-latent SNR, audio SNR against FP32 on
held-out prompts, beside ONNX Runtime's own quantizer)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("export")
UNET_SCHEMES = ("fp32", "w8a8", "w4a16", "w4a8")
# DiT-only options: refused for a UNet model rather than silently ignored
_DIT_ONLY = {"activations": "static", "bucket_policy": "per-bucket-scale", "recipe": None, "t5": None}


def _refuse_dit_options(args: argparse.Namespace) -> None:
    from exporter.errors import InputError

    for name, default in _DIT_ONLY.items():
        if getattr(args, name, default) != default:
            raise InputError(f"--{name.replace('_', '-')} is not available for the UNet family yet (issue 21); "
                             f"UNet exports take --scheme {'/'.join(UNET_SCHEMES)}, --method, --alpha, --target, --lowrank, "
                             "--weight-rounding, --block-size, --w4-layers, --auto-precision/--size-budget, "
                             "--residual-qdq")
    if args.scheme not in UNET_SCHEMES:
        raise InputError(f"scheme '{args.scheme}' is not available for the UNet family (choose from: "
                         f"{', '.join(UNET_SCHEMES)})")
    if args.device != "cpu":
        raise InputError("--device is for DiT exports; UNet-family exports run on the CPU")


def _lowbit_options(args: argparse.Namespace) -> dict:
    """The low-bit / mixed-precision fields of UNetQuantOptions from the shared export flags (UNet defaults:
    round to nearest, INT4 block 64, which divides every input-channel count of the minis)."""
    globs = tuple(p.strip() for p in (getattr(args, "w4_layers", None) or "").split(",") if p.strip())
    block = getattr(args, "block_size", 128)
    return {"lowrank": getattr(args, "lowrank", 0), "weight_rounding": getattr(args, "weight_rounding", None) or "nearest",
            "block_size": 64 if block == 128 else block, "w4_layers": globs,
            "auto_precision": bool(getattr(args, "auto_precision", False)), "size_budget": getattr(args, "size_budget", None),
            "residual_qdq": bool(getattr(args, "residual_qdq", False))}


def export_unet(args: argparse.Namespace) -> int:
    """Export the UNet-family model the arguments name (see the module docstring)."""
    from exporter.models.cli_args import unet_model_name
    from exporter.models.unet_audio import load_unet_model
    from exporter.stages.unet_export import UNetExportOptions, export_unet_model

    _refuse_dit_options(args)
    options = UNetExportOptions(target=args.target, seed=args.seed)
    stages = []
    quant = None
    if args.scheme != "fp32":
        from exporter.stages.unet_quantized import UNetQuantOptions

        quant = UNetQuantOptions(scheme=args.scheme, method=args.method, alpha=args.alpha, target=args.target,
                                 calib_prompts=args.calib_prompts, calib_steps=args.calib_steps,
                                 report_prompts=args.report_prompts, report_steps=args.report_steps,
                                 calib_seconds=args.calib_seconds, report_seconds=args.report_seconds,
                                 **_lowbit_options(args))
    model = load_unet_model(unet_model_name(args), args.checkpoint, args.synthetic_weights, args.seed)
    artifact = None
    if getattr(args, "calibration", None):  # a `quadit calibrate` artifact (engines/calibrate/unet_artifact.py)
        from engines.calibrate.unet_artifact import read_unet_artifact
        from exporter.errors import InputError

        if quant is None:
            raise InputError("--calibration is for a quantized --scheme; an fp32 export calibrates nothing")
        artifact = read_unet_artifact(Path(args.calibration), model)
    if quant is not None:
        from engines.evaluation.unet_report import unet_quant_stages

        stages = unet_quant_stages(model, quant, ort_baseline=True, modelopt=not args.no_modelopt, artifact=artifact)
    manifest = export_unet_model(model, Path(args.out), options, stages)
    out = Path(args.out).resolve()
    for name, graph in manifest["graphs"].items():
        parity = graph.get("parity", {}).get("max_rel_error")
        log.info("%-13s %8.1f MB  %s  (%s)", name, graph["weight_bytes"] / 1e6,
                 f"parity max rel err {parity:.2e}" if parity is not None else "see report.json", graph["precision"])
    log.info("export written to %s in %.0f s (weights %s)", out, manifest["export_seconds"], manifest["model"]["weights"])
    summary = {"out": str(out), "family": "unet", "parity.max_rel_error": manifest["parity"]["max_rel_error"]}
    if quant is not None:
        summary["unet_size_ratio"] = manifest["graphs"]["unet"]["size_ratio"]
        summary.update({f"report.{k}": v for k, v in manifest.get("report", {}).items() if k.endswith("_db")})
    print(json.dumps(summary))
    return 0
