"""`quadit bench`: the arguments of `engines.evaluation.bench`."""
from __future__ import annotations

import argparse

from engines.cli.common import run
from engines.evaluation import bench
from exporter.models.cli_args import add_model_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit bench", description=bench.__doc__)
    add_model_args(parser)
    parser.add_argument("--calibration", help="calibration artifact of this model (required unless --predict)")
    parser.add_argument("--predict", action="store_true",
                        help="print the roofline PREDICTION of TensorRT FP16/w8a8/w4a16 engines per GPU from the "
                             "graphs' precision maps instead of timing (nothing is run; a UNet-family model: its "
                             "FP16 and w8a8 UNet)")
    parser.add_argument("--lengths", default=None,
                        help=f"latent lengths (default {bench.DIT_LENGTHS}; a UNet-family model with --predict: latent "
                             "frames, default those of its default and longest lengths)")
    parser.add_argument("--candidates", default=",".join(bench.CANDIDATES), help="quantized ORT candidates to time")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch eager on the CPU")
    parser.add_argument("--gpu", choices=("auto", "off"), default="auto",
                        help="auto (default): add CUDA rows (PyTorch FP16, TensorRT) where a GPU is present")
    parser.add_argument("--lowrank", type=int, default=0, help="low-rank branch rank of every quantized candidate")
    parser.add_argument("--also-lowrank", type=int, default=0, help="also time every candidate with this rank")
    parser.add_argument("--breakdown", action="store_true", help="profile each ORT step: where the time goes")
    parser.add_argument("--attention", choices=("mha", "attention23", "none"), default="mha",
                        help="fused attention of the ORT-target graphs and of the fused ORT FP32 row "
                             "(exporter/passes/ort_fusion.py; default mha: com.microsoft MultiHeadAttention)")
    parser.add_argument("--no-fused-fp32", action="store_true",
                        help="leave out the fused ORT FP32 row (at full size its session needs another 6 GB)")
    parser.add_argument("--weights", choices=("default", "nearest"), default="default",
                        help="weight passes of the quantized candidates: the export's defaults (GPTQ, MSE clip, "
                             "loss-driven smoothing), or round to nearest (exporter.passes.recipe.ROUND_TO_NEAREST): the "
                             "same graphs and kernels with other weight values, so the same speed, built in "
                             "minutes instead of about 40 per graph at full size")
    parser.add_argument("--also-unfused", action="store_true",
                        help="also time each quantized candidate without the attention fusion (today's graph)")
    parser.add_argument("--serial", action="store_true",
                        help="time candidates one after another (default: all loaded, stepped round-robin; "
                             "needs the memory of all of them at once)")
    parser.add_argument("--profile-rounds", type=int, default=3,
                        help="with --breakdown: interleaved profile rounds per candidate, the median kept (each "
                             "is a fresh session, 1 warm-up and 3 profiled steps: at full size 1 round takes "
                             "minutes)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=0, help="also time generate with this many steps (0: no)")
    parser.add_argument("--e2e-seconds", type=float, default=None,
                        help="audio length of the generate timing (default: 10, or the model's window if shorter)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: the ONNX Runtime rows on ORT's "
                        "CUDA provider (TensorRT provider too where TensorRT is installed; needs onnxruntime-gpu)")
    parser.add_argument("--out", required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return bench.execute(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
