"""Serve text-to-audio generation from an export directory on Triton Inference Server (PyTriton).

Model `quadit_generate` over KServe v2 HTTP and gRPC: inputs prompt (BYTES), seconds (FP32), steps (INT32),
cfg_scale (FP32), seed (INT64), each [1]; outputs audio (FP32 [2, samples] at 44.1 kHz for Stable Audio Open;
[1, samples] at 16 kHz for a UNet-family export, AudioLDM or TANGO), sample_rate (INT32 [1]) and
batch_size (INT32 [1]). Concurrent requests with the same latent length and step count are stepped
together: one DiT (or UNet) call per sampler step for the whole batch. Health: /v2/health/live, /v2/health/ready;
Prometheus metrics on --metrics-port. SIGTERM (or Ctrl-C) stops accepting, finishes what is queued, exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from engines.cli.common import run
from engines.runtime.logs import setup_logging

log = logging.getLogger("serve")
CHILD = "QUADIT_SERVE_CHILD"


def supervise() -> int:
    """Run the server in a child process of its own session and forward SIGINT/SIGTERM/SIGHUP to it as
    SIGTERM; return its exit code.

    Why: a signal to the whole process group (Ctrl-C in a terminal, `timeout`, `kill -- -PGID`) would
    otherwise also reach tritonserver and PyTriton's tensor-store process, which stop at once and fail the
    requests in flight. In its own session the server only hears the forwarded SIGTERM, and drains. The
    child gets SIGTERM too if this process dies (PR_SET_PDEATHSIG), so it never outlives it."""
    import ctypes
    import subprocess

    def die_with_parent() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    child = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, CHILD: "1"}, start_new_session=True,
                             preexec_fn=die_with_parent)

    def forward(signum: int, _frame) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadit serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="export directory written by scripts/export.py")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"),
                        help="onnxruntime (default), torch (reference) or tensorrt (needs --engines)")
    parser.add_argument("--engines", help="engines directory from scripts/build_engines.py (--backend tensorrt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=4, help="most requests stepped together (default 4)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=50.0,
                        help="how long the oldest queued request waits for company (default 50 ms)")
    parser.add_argument("--request-timeout-s", type=float, default=300.0,
                        help="time limit of one request from its arrival, its queueing included (default 300 s)")
    parser.add_argument("--max-queue", type=int, default=64, help="queued generations before refusing (default 64)")
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="requests admitted at once, queued or running; more get 'server busy' at once "
                             "(default 2 x --max-batch; each one is a Triton instance)")
    parser.add_argument("--no-supervisor", action="store_true",
                        help="serve in this process (group-wide signals then reach tritonserver too)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_supervisor and os.environ.get(CHILD) != "1":
        return supervise()
    setup_logging(args.verbose)

    from engines.runtime.pipeline import open_pipeline
    from engines.serving.scheduler import SchedulerConfig
    from engines.serving.server import ServerConfig, serve
    from exporter.errors import InputError

    if (args.backend == "tensorrt") != (args.engines is not None):
        raise InputError("--backend tensorrt needs --engines DIR" if args.engines is None
                         else f"--engines is for --backend tensorrt, not {args.backend}")
    server = ServerConfig(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)
    scheduling = SchedulerConfig(max_batch=args.max_batch, max_queue_delay_ms=args.max_queue_delay_ms,
                                 request_timeout_s=args.request_timeout_s, max_queue=args.max_queue,
                                 max_inflight=args.max_inflight)
    export = Path(args.export)
    if not (export / "manifest.json").is_file():
        raise InputError(f"--export {export} is not an export directory (no manifest.json)")
    from exporter.onnx.artifacts import read_manifest

    manifest = read_manifest(export)
    if manifest.get("family") == "unet":  # AudioLDM / TANGO: engines.serving.families.unet_family
        from engines.runtime.unet_pipeline import open_unet_pipeline

        unet = open_unet_pipeline(export, manifest, args.backend, engines_dir=Path(args.engines) if args.engines else None)
        return serve(unet, server, scheduling)
    pipeline = open_pipeline(export, args.backend, Path(args.engines) if args.engines else None)
    if args.backend == "tensorrt":  # the DiT engines take batches up to their largest profile
        from dataclasses import replace

        sizes = pipeline.backend.meta.get("settings", {}).get("batch_sizes")
        if sizes:
            scheduling = replace(scheduling, dit_batch_sizes=tuple(sizes))
    return serve(pipeline, server, scheduling)


if __name__ == "__main__":
    run(main)
