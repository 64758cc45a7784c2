"""Export a Stable Audio Open-family model to ONNX: dit.onnx (FP32, FP16 or quantized), text_encoder.onnx,
conditioners.onnx, vae_decoder.onnx, tokenizer/ and manifest.json (a UNet-family model, AudioLDM or TANGO:
text_encoder.onnx, unet.onnx, vae_decoder.onnx, vocoder.onnx; see engines/cli/unet_export.py). Quantized schemes calibrate first
(unless --calibration names an artifact), quantize the DiT graph, and write an accuracy report
(report.json / report.md) against FP32, the minmax baseline and ModelOpt at equal bits."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging
from exporter.models.cli_args import add_model_args, model_spec

log = logging.getLogger("export")
QUANTIZED = ("w8a8", "w4a16", "w4a8", "fp8", "nvfp4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit export", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--scheme", default="fp32", help="fp32, fp16, w8a8, w4a16, w4a8, fp8 (E4M3) or nvfp4 (W4A4 FP4, "
                        "Blackwell); fp8 and nvfp4 need --target tensorrt")
    parser.add_argument("--method", default="timestep-smoothquant",
                        help="minmax, smoothquant or timestep-smoothquant (default)")
    parser.add_argument("--alpha", type=float, default=0.5, help="smoothing strength (0..1)")
    parser.add_argument("--lowrank", type=int, default=0, help="rank of the SVD low-rank branch (0: none)")
    parser.add_argument("--activations", default="static", help="static (SQS) or dynamic (SQD, ONNX Runtime only)")
    parser.add_argument("--bucket-policy", default="per-bucket-scale",
                        help="shared, per-bucket-scale (one graph) or per-bucket-graph (one graph per bucket)")
    parser.add_argument("--block-size", type=int, default=128, help="INT4 block size along K")
    from exporter.passes.recipe import ALPHA_SEARCHES, ATTENTION_INT8, CLIPS, WEIGHT_ROUNDINGS, Recipe

    parser.add_argument("--weight-rounding", default=None, choices=WEIGHT_ROUNDINGS,
                        help=f"nearest or gptq (error-minimising, from the calibration's E[x x^T]; default "
                             f"{Recipe.weight_rounding}, UNet models nearest)")
    parser.add_argument("--weight-clip", default=Recipe.weight_clip, choices=CLIPS,
                        help=f"weight scales: absmax or mse (searched clip per channel / block; default {Recipe.weight_clip})")
    parser.add_argument("--act-clip", default=Recipe.act_clip, choices=CLIPS,
                        help=f"static activation scales: absmax or mse (clip searched on the calibration's input "
                             f"rows per bucket; default {Recipe.act_clip})")
    parser.add_argument("--alpha-search", default=Recipe.alpha_search, choices=ALPHA_SEARCHES,
                        help=f"timestep-smoothquant's strength: noise (model of the ranges) or loss (measured "
                             f"output error on the calibration's input rows; default {Recipe.alpha_search})")
    parser.add_argument("--attention-int8", default=Recipe.attention_int8, choices=ATTENTION_INT8,
                        help="ONNX Runtime target: dynamic-qk runs attention's Q·Kᵀ as DynamicQuantizeLinear + "
                             f"MatMulInteger (default {Recipe.attention_int8}: measured slower on AVX2 without VNNI)")
    parser.add_argument("--attention", default="none", choices=("none", "fp8"),
                        help="TensorRT target with --scheme fp8: fp8 puts Q, K, V and the softmax output of every "
                             "attention core in FP8 so TensorRT runs its fused FP8 attention (needs an artifact "
                             "with attention statistics)")
    parser.add_argument("--dynamic-kernel", default="dql", help="dynamic mode in ORT: dql "
                        "(DynamicQuantizeLinear+MatMulInteger) or nbits (MatMulNBits, int8 compute)")
    parser.add_argument("--recipe", help="a recipe JSON file (overrides the flags above)")
    parser.add_argument("--target", default="onnxruntime",
                        help="onnxruntime (default) or tensorrt (also makes the text encoder and VAE graphs FP16)")
    parser.add_argument("--calibration", help="calibration artifact directory (default: calibrate now)")
    parser.add_argument("--calib-prompts", type=int, default=16, help="prompts when calibrating here")
    parser.add_argument("--calib-steps", type=int, default=20, help="sampler steps when calibrating here")
    parser.add_argument("--calib-seconds", type=float, default=None,
                        help="audio length when calibrating here (default: 5, or the model's window if shorter)")
    parser.add_argument("--report-prompts", type=int, default=4, help="held-out prompts of the report (0: none)")
    parser.add_argument("--report-steps", type=int, default=20)
    parser.add_argument("--report-seconds", type=float, default=None,
                        help="audio length of the report's trajectories (default: 3, or the model's window if shorter)")
    parser.add_argument("--no-modelopt", action="store_true", help="leave the ModelOpt baseline out of the report")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: calibration and the report's "
                        "PyTorch work (ModelOpt) on the GPU, the report's ONNX Runtime graphs on ORT's CUDA provider "
                        "where onnxruntime-gpu is installed")
    parser.add_argument("--auto-precision", action="store_true", help="measure each layer's sensitivity and choose "
                        "its precision (float, w8a8, 4-bit) within --size-budget; writes sensitivity.json/.png and "
                        "recipe.auto.json (pass it back with --recipe); the other flags set the base recipe")
    parser.add_argument("--size-budget", type=float, help="with --auto-precision: DiT weight bytes as a fraction "
                        "of FP32 (e.g. 0.2)")
    parser.add_argument("--w4-layers", default=None, help="UNet --scheme w4a8: comma-separated globs of the layers "
                        "with 4-bit weights (the others w8a8; default: every Conv2d)")
    parser.add_argument("--residual-qdq", action="store_true", help="UNet --target tensorrt: Q/DQ on the residual "
                        "input of each Add after a quantized convolution (TensorRT's Conv + Add fusion)")
    parser.add_argument("--out", required=True, help="export directory (replaced atomically)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _recipe(args: argparse.Namespace):
    from exporter.passes.recipe import Recipe, read_recipe

    if args.recipe:
        return read_recipe(args.recipe)
    method = args.method
    policy = args.bucket_policy if method != "minmax" or args.bucket_policy != "per-bucket-graph" else "shared"
    return Recipe(scheme=args.scheme if args.scheme in QUANTIZED else "w8a8", method=method, alpha=args.alpha,
                  lowrank=args.lowrank, activations=args.activations, bucket_policy=policy, block_size=args.block_size,
                  weight_rounding=args.weight_rounding or Recipe.weight_rounding, weight_clip=args.weight_clip,
                  act_clip=args.act_clip,
                  alpha_search=args.alpha_search, attention_int8=args.attention_int8,
                  attention_quant=args.attention)


def _calibrate(loaded, args: argparse.Namespace, prompts: list[str], seconds: float, scratch: Path) -> Path:
    from engines.calibrate.driver import CalibrationSettings, calibrate

    log.info("no --calibration given: calibrating on %d seed prompts x %d steps", len(prompts), args.calib_steps)
    out = scratch / "calibration"
    cuda = args.device.startswith("cuda")
    calibrate(loaded, prompts, CalibrationSettings(steps=args.calib_steps, seconds=seconds, device=args.device),
              out, prompt_source="seed", shorten="--calib-prompts, --calib-steps, or --calibration DIR (an artifact "
              "from scripts/calibrate.py)" + ("" if cuda else ", --device cuda"))
    return out


def _check_counts(args: argparse.Namespace) -> None:
    """The model-independent options of a quantized export, before anything is loaded."""
    from exporter.errors import InputError

    for option, value, least in (("--calib-prompts", args.calib_prompts, 1), ("--calib-steps", args.calib_steps, 2),
                                 ("--report-prompts", args.report_prompts, 0), ("--report-steps", args.report_steps, 2)):
        if value < least:
            raise InputError(f"{option} must be >= {least}, got {value}")


def _calibration_prompts(args: argparse.Namespace, prompts: list[str] | None) -> list[str]:
    """The calibration prompts (`prompts` from an artifact, else the seed prompts calibrated on here), once
    the report is known to find enough held-out prompts beside them."""
    from calibration.prompts import select_prompts
    from engines.evaluation.accuracy import AccuracySettings, heldout_prompts
    from exporter.errors import InputError

    try:
        prompts = prompts if prompts is not None else select_prompts("seed", args.calib_prompts)
    except ValueError as exc:
        raise InputError(f"--calib-prompts {args.calib_prompts}: {exc}") from None
    if args.report_prompts > 0:
        try:
            heldout_prompts(prompts, args.report_prompts, AccuracySettings.heldout_seed)
        except ValueError as exc:
            raise InputError(f"--report-prompts {args.report_prompts}: {exc}") from None
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from exporter.models.cli_args import unet_requested

    if unet_requested(args):
        from engines.cli.unet_export import export_unet

        return export_unet(args)
    from exporter.errors import InputError
    from exporter.models import load_model
    from exporter.stages.export import SCHEMES, ExportOptions, export_model

    if args.scheme not in SCHEMES + QUANTIZED:
        raise InputError(f"unknown scheme '{args.scheme}' (choose from: {', '.join(SCHEMES + QUANTIZED)})")
    stages, options = [], ExportOptions(scheme=args.scheme if args.scheme in SCHEMES else "fp32", target=args.target)
    quant = None
    if args.auto_precision or args.size_budget is not None:
        from engines.evaluation.auto_precision import check_arguments

        check_arguments(args.auto_precision, args.size_budget, args.recipe)
    if args.scheme in QUANTIZED or args.recipe or args.auto_precision:
        from exporter.stages.quantized import QuantizeOptions

        quant = QuantizeOptions(_recipe(args), args.target, args.dynamic_kernel)  # refuses bad targets up front
    if args.calibration and not Path(args.calibration).is_dir():
        raise InputError(f"--calibration {args.calibration} is not a directory")
    cal_prompts = None
    if quant is not None:
        from engines.runtime.providers import check_torch_device

        _check_counts(args)
        check_torch_device(args.device)
        if not args.calibration:
            cal_prompts = _calibration_prompts(args, None)
    loaded = load_model(model_spec(args))
    scratch = Path(tempfile.mkdtemp(prefix="quadit-export-"))
    try:
        if quant is not None:
            from engines.calibrate.driver import CalibrationSettings
            from engines.evaluation.accuracy import AccuracySettings
            from engines.evaluation.compare import report_stage
            from engines.runtime.durations import pick_seconds

            # every option is checked against the model before calibration, quantization or the report start
            from exporter.stages.quantized import check_int4_blocks, quantize_stage, read_calibration

            check_int4_blocks(loaded, quant.recipe, quant.target)
            calibration = read_calibration(Path(args.calibration), loaded) if args.calibration else None
            if calibration is not None and quant.recipe.attention_quant != "none":
                from exporter.passes.fp8_attention import check_ranges

                check_ranges(calibration.attention)
            if calibration is not None:
                cal_prompts = _calibration_prompts(args, calibration.meta["prompts"]["list"])
            calib_seconds = None if calibration else pick_seconds(
                "--calib-seconds", args.calib_seconds, CalibrationSettings.seconds, loaded.config, "calibration")
            report = None
            if args.report_prompts > 0:
                report = AccuracySettings(prompts=args.report_prompts, steps=args.report_steps, seconds=pick_seconds(
                    "--report-seconds", args.report_seconds, AccuracySettings.seconds, loaded.config, "accuracy report"))
            if calibration is None:
                calibration = read_calibration(_calibrate(loaded, args, cal_prompts, calib_seconds, scratch), loaded)

            def quant_stages(recipe):
                from exporter.stages.quantized import QuantizeOptions

                out = [quantize_stage(loaded, calibration, QuantizeOptions(recipe, quant.target, quant.dynamic_kernel),
                                      scratch)]
                if report is not None:
                    cuda = args.device.startswith("cuda")
                    out.append(report_stage(loaded, calibration, recipe, report, scratch,
                                            modelopt=not args.no_modelopt, dynamic_kernel=args.dynamic_kernel,
                                            device=args.device, target=quant.target,
                                            shorten="--report-prompts 0 (no report), fewer --report-prompts or "
                                                    "--report-steps" + ("" if args.no_modelopt else ", --no-modelopt")
                                                    + ("" if cuda else ", --device cuda")))
                return out

            if args.auto_precision:
                from engines.evaluation.auto_precision import stage_for_export

                stages.append(stage_for_export(loaded, calibration, quant, args.size_budget, scratch, report,
                                               quant_stages, args.device))
            else:
                stages += quant_stages(quant.recipe)
        manifest = export_model(loaded, Path(args.out), options, stages)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out).resolve()
    for name, graph in manifest["graphs"].items():
        parity = graph.get("parity", {}).get("max_rel_error")
        log.info("%-13s %8.1f MB  %s  (%s)", name, graph["weight_bytes"] / 1e6,
                 f"parity max rel err {parity:.2e}" if parity is not None else "see report.json", graph["precision"])
    log.info("export written to %s in %.0f s (weights %s)", out, manifest["export_seconds"], manifest["model"]["weights"])
    summary = {"out": str(out), "parity.max_rel_error": manifest["parity"]["max_rel_error"]}
    if quant is not None:
        summary["dit_size_ratio"] = manifest["graphs"]["dit"]["size_ratio"]
        summary.update({f"report.{k}": v for k, v in manifest.get("report", {}).items() if k.endswith("_db")})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run(main)
