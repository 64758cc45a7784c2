"""Write a Triton model repository of an export (and its TensorRT engines) for standalone tritonserver.

    REPO/quadit_text_encoder, quadit_conditioners, quadit_dit (or quadit_dit_bucket{k}), quadit_vae_decoder:
        onnxruntime models for ONNX graphs, tensorrt_plan models for engines (--engines), each with an
        instance group (--kind, --instances) and dynamic batching
    REPO/quadit_generate: the sampler as a Python-backend model calling them (BLS), with the API of
        scripts/serve.py; Triton's dynamic batcher feeds it up to --max-batch requests at once, and rejects
        one that waited --request-timeout-s in its queue; a batch running longer than that is abandoned
        with a time-out error

A UNet-family export (AudioLDM, TANGO) gets quadit_text_encoder, quadit_unet, quadit_vae_decoder and
quadit_vocoder instead of the four SAO graph models, and a quadit_generate with mono audio.

Every config.pbtxt is parsed with Triton's model-config protobuf before the repository is kept.
--try-load starts the tritonserver of the PyTriton wheel on the written repository (loopback, free ports)
and reports which models load. --graph-backend python serves the ONNX graphs with ONNX Runtime inside
Triton's Python backend instead, for servers without the onnxruntime backend (that wheel's is one).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging

log = logging.getLogger("triton_repo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit triton-repo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="export directory written by scripts/export.py")
    parser.add_argument("--engines", help="engines directory from scripts/build_engines.py: tensorrt_plan models")
    parser.add_argument("--out", required=True, help="repository directory to write (must not exist)")
    parser.add_argument("--kind", default="gpu", choices=("gpu", "cpu"), help="instance kind of the graph models")
    parser.add_argument("--instances", type=int, default=1, help="instances per graph model (per GPU)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests the sampler batches (default 8)")
    parser.add_argument("--max-queue-delay-us", type=int, default=50_000)
    parser.add_argument("--graph-backend", default="onnxruntime", choices=("onnxruntime", "python"))
    parser.add_argument("--request-timeout-s", type=float, default=300.0,
                        help="quadit_generate's time limit: the longest wait in Triton's queue (rejected after it) "
                             "and the longest run of its batch (default 300 s)")
    parser.add_argument("--try-load", action="store_true", help="load the repository in the bundled tritonserver")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from engines.serving.server import free_ports
    from engines.serving.triton_repo import RepoOptions, try_load, write_repository
    from exporter.errors import InputError

    out = Path(args.out)
    if out.exists():
        raise InputError(f"--out {out} exists; choose a new directory")
    export = Path(args.export)
    if not (export / "manifest.json").is_file():
        raise InputError(f"--export {export} is not an export directory (no manifest.json)")
    if args.engines and not (Path(args.engines) / "engines.json").is_file():
        raise InputError(f"--engines {args.engines} has no engines.json (scripts/build_engines.py writes it)")
    options = RepoOptions(kind=args.kind, instances=args.instances, max_batch=args.max_batch,
                          max_queue_delay_us=args.max_queue_delay_us, graph_backend=args.graph_backend,
                          request_timeout_s=args.request_timeout_s)
    summary = write_repository(export, out, options, Path(args.engines) if args.engines else None)
    for name, model in summary["models"].items():
        log.info("%-24s %-28s max_batch_size %d, config %s", name, model["backend"], model["max_batch_size"],
                 summary["validation"][name])
    if args.try_load:
        with tempfile.TemporaryDirectory(prefix="quadit-triton-") as work:
            loaded = try_load(out, Path(work), tuple(free_ports(3)))
        summary["try_load"] = loaded
        for name, state in loaded["models"].items():
            log.info("bundled tritonserver: %-24s %s %s", name, state["state"], state["reason"])
    print(json.dumps({k: v for k, v in summary.items() if k != "try_load"} |
                     ({"try_load": {"models": summary["try_load"]["models"]}} if "try_load" in summary else {}),
                     indent=2))
    return 0


if __name__ == "__main__":
    run(main)
