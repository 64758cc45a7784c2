"""Calibrate: run the PyTorch model through the runtime's sampler with hooks on every quantizable Linear
and write timestep-bucketed activation statistics (calibration.json + calibration.safetensors), plots and
a summary. Resumes an interrupted run with the same arguments; runs data-parallel under torchrun."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging
from exporter.models.cli_args import add_model_args, model_spec

log = logging.getLogger("calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit calibrate", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompts", default="seed", help="seed, augmented, or a text file (one prompt per line)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per prompt (model card: 100)")
    parser.add_argument("--buckets", type=int, default=4, help="timestep buckets")
    parser.add_argument("--bucket-by", default="step", help="step (equal steps per bucket) or t (equal t width)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="audio length the sampler runs at (default: 5, or the model's window if shorter)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's (SAO 7, SAO Small 1)")
    parser.add_argument("--selection", default="all", help="all, uniform, random or activation-aware")
    parser.add_argument("--budget", type=int, default=0, help="(prompt, step) samples kept by --selection")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of prompts, noise and selection")
    parser.add_argument("--sample-rows", type=int, default=128,
                        help="input rows kept per layer and bucket for searched activation scales and loss-driven "
                             "smoothing (0: none)")
    parser.add_argument("--no-second-moments", action="store_true",
                        help="skip E[x x^T] per layer (GPTQ weight rounding then falls back to round-to-nearest)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="artifact directory (replaced atomically)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from exporter.models.cli_args import unet_requested

    if unet_requested(args):  # AudioLDM / TANGO / Make-An-Audio: engines/calibrate/unet_artifact.py
        from engines.calibrate.unet_artifact import calibrate_command

        return calibrate_command(args)

    import dataclasses

    from calibration.prompts import coverage_report, select_prompts
    from engines.calibrate.driver import CalibrationSettings, calibrate
    from engines.runtime.durations import pick_seconds
    from engines.runtime.providers import check_torch_device
    from exporter.errors import InputError
    from exporter.models import load_model

    settings = CalibrationSettings(steps=args.steps, buckets=args.buckets, bucket_by=args.bucket_by,
                                   cfg_scale=args.cfg_scale, seed=args.calib_seed,
                                   selection=args.selection, budget=args.budget, device=args.device,
                                   second_moments=not args.no_second_moments, sample_rows=args.sample_rows)
    if args.num_prompts < 1:
        raise InputError("--num-prompts must be >= 1")
    check_torch_device(args.device)
    try:
        prompts = select_prompts(args.prompts, args.num_prompts, seed=args.calib_seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    extra = {}
    if args.prompts == "augmented":
        # Equal-size comparison: the same number of plain seed prompts vs the augmented selection.
        extra["prompt_coverage"] = coverage_report(select_prompts("seed", args.num_prompts, seed=args.calib_seed),
                                                   prompts)
        extra["prompt_coverage"]["before_source"] = f"{args.num_prompts} seed prompts"
    loaded = load_model(model_spec(args))
    settings = dataclasses.replace(settings, seconds=pick_seconds("--seconds", args.seconds, settings.seconds,
                                                                  loaded.config, "calibration"))
    meta = calibrate(loaded, prompts, settings, Path(args.out), prompt_source=args.prompts, extra_meta=extra,
                     shorten="--num-prompts, --steps" + ("" if args.device.startswith("cuda") else ", --device cuda"))
    if meta is None:  # a non-zero torchrun rank
        return 0
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    log.info("artifact in %s: %d layers, %d with outlier channels, block-input range growth >= %.2fx",
             args.out, summary["num_layers"], summary["layers_with_outliers"], summary["min_block_input_range_growth"])
    print(json.dumps({"out": str(Path(args.out).resolve()), "artifact_sha256": meta["artifact_sha256"],
                      "min_outlier_channels": summary["min_outlier_channels"],
                      "min_block_input_range_growth": summary["min_block_input_range_growth"],
                      "selection": summary.get("selection", {}).get("coverage")}))
    return 0


if __name__ == "__main__":
    run(main)
