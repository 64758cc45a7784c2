"""Generate audio from a prompt with an export directory: text encoder -> number conditioners ->
dpmpp-3m-sde sampler over the DiT -> VAE decoder -> 44.1 kHz stereo WAV (a UNet-family export: text encoder ->
the pipeline's diffusers scheduler over the UNet -> VAE decoder -> vocoder -> 16 kHz mono WAV)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging

log = logging.getLogger("generate")
DEFAULT_SECONDS = 10.0  # what Stable Audio Open's model card demo generates; capped at the model's window


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit generate", description=__doc__)
    parser.add_argument("--export", required=True, help="export directory written by scripts/export.py")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"duration of the audio (default: {DEFAULT_SECONDS:g} s, or the model's window if shorter)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: the export's model defaults; SAO: 100)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance (default: the export's model defaults; SAO: 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="onnxruntime",
                        help="onnxruntime (default), torch (reference) or tensorrt (needs --engines)")
    parser.add_argument("--engines", help="engines directory from scripts/build_engines.py (--backend tensorrt)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: ONNX Runtime's CUDA provider (TensorRT provider too where "
                             "TensorRT is installed; needs onnxruntime-gpu), or PyTorch on the GPU (--backend torch)")
    parser.add_argument("--out", required=True, help="output .wav")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from engines.runtime.pipeline import GenerateOptions, open_pipeline, write_wav
    from exporter.errors import InputError

    if not args.out.lower().endswith(".wav"):
        raise InputError(f"--out {args.out} must end in .wav")
    if (args.backend == "tensorrt") != (args.engines is not None):
        raise InputError("--backend tensorrt needs --engines DIR" if args.engines is None
                         else f"--engines is for --backend tensorrt, not {args.backend}")
    if args.backend == "tensorrt" and args.device != "cpu":
        raise InputError("--device is for the onnxruntime and torch backends; TensorRT engines run on their GPU")
    if args.backend == "torch":
        from engines.runtime.providers import check_torch_device

        check_torch_device(args.device)
    from exporter.onnx.artifacts import read_manifest

    if read_manifest(Path(args.export)).get("family") == "unet":
        return _generate_unet(args)
    pipeline = open_pipeline(Path(args.export), args.backend, Path(args.engines) if args.engines else None,
                             device=args.device)
    from engines.runtime.durations import pick_seconds

    defaults = pipeline.manifest["sampler_defaults"]
    seconds = pick_seconds("--seconds", args.seconds, DEFAULT_SECONDS, pipeline.manifest["model_config"], "generating")
    opts = GenerateOptions(prompt=args.prompt, seconds=seconds, seed=args.seed,
                           steps=args.steps if args.steps is not None else defaults["steps"],
                           cfg_scale=args.cfg_scale if args.cfg_scale is not None else defaults["cfg_scale"],
                           sampler_type=defaults["sampler_type"], sigma_min=defaults["sigma_min"],
                           sigma_max=defaults["sigma_max"], rho=defaults["rho"])
    opts.validate(pipeline.max_seconds)
    result = pipeline.generate(opts)
    levels = write_wav(Path(args.out), result.audio[0], result.sample_rate)
    log.info("wrote %s: %.2f s, %d Hz stereo, peak %.3f, rms %.4f (%s backend; sampling %.1f s)",
             args.out, result.audio.shape[-1] / result.sample_rate, result.sample_rate, levels["peak"],
             levels["rms"], args.backend, result.timings["sampling_s"])
    extra = {"device": args.device}
    if hasattr(pipeline.backend, "providers"):
        extra["providers"] = pipeline.backend.providers
    print(json.dumps({"out": str(Path(args.out).resolve()), **levels, **result.timings, **extra}))
    return 0


def _generate_unet(args: argparse.Namespace) -> int:
    """The UNet family (AudioLDM, TANGO): the export's diffusers scheduler, 16 kHz mono WAV."""
    from engines.runtime.pipeline import write_wav
    from engines.runtime.unet_pipeline import UNetGenerateOptions, open_unet_pipeline
    from exporter.onnx.artifacts import read_manifest

    manifest = read_manifest(Path(args.export))
    pipeline = open_unet_pipeline(Path(args.export), manifest, args.backend, args.device,
                                  Path(args.engines) if args.engines else None)
    defaults, dims = manifest["sampler_defaults"], manifest["dims"]
    seconds = args.seconds if args.seconds is not None else min(DEFAULT_SECONDS, float(dims["default_seconds"]))
    opts = UNetGenerateOptions(prompt=args.prompt, seconds=seconds, seed=args.seed,
                               steps=args.steps if args.steps is not None else int(defaults["steps"]),
                               cfg_scale=args.cfg_scale if args.cfg_scale is not None else float(defaults["cfg_scale"]))
    opts.validate(dims)
    result = pipeline.generate(opts)
    levels = write_wav(Path(args.out), result.audio[0], result.sample_rate)
    log.info("wrote %s: %.2f s, %d Hz mono, peak %.3f, rms %.4f (%s backend, %s; sampling %.1f s)", args.out,
             result.audio.shape[-1] / result.sample_rate, result.sample_rate, levels["peak"], levels["rms"],
             args.backend, manifest["unet_family"], result.timings["sampling_s"])
    extra = {"device": args.device, "family": manifest["unet_family"]}
    if hasattr(pipeline.backend, "providers"):
        extra["providers"] = pipeline.backend.providers
    print(json.dumps({"out": str(Path(args.out).resolve()), **levels, **result.timings, **extra}))
    return 0


if __name__ == "__main__":
    run(main)
