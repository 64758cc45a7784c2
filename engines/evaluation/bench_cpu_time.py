"""DiT step cost in CPU seconds, one thread per candidate: a measure less sensitive to a loaded shared machine.

`scripts/bench.py` times wall clock with ORT's thread pool; when the host is oversubscribed (load average
well above the core count) every candidate waits on the scheduler alike and the ratios collapse towards
1.0 (measured: w8a8 1.00x of FP32, INT8 GEMM 1.04-1.08x of FP32 at load 10-16 on 2 cores). With one
intra-op thread the kernels run on the calling thread, so the process CPU time (`time.process_time`) is the work
the step did, independent of how long it waited (not of cache contention: at load 11 on 2 cores an FP32
step took 4.9 CPU s against about 1.9 quiet, and INT8 lost its advantage; docs/figures.md).
Candidates: PyTorch eager FP32, ORT FP32 as exported,
ORT FP32 fused, and each given quantized graph, stepped round-robin. Writes cputime.json and cputime.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from engines.runtime.logs import setup_logging


def execute(args: argparse.Namespace) -> int:
    """`quadit bench-cpu-time` after argument parsing (the parser: `engines.cli.bench_cpu_time`)."""
    setup_logging()

    import numpy as np
    import onnx
    import torch
    from tqdm import tqdm

    from engines.evaluation.bench_candidates import INPUTS, feeds
    from exporter.errors import InputError
    from exporter.models import reload_from_identity
    from exporter.onnx.artifacts import atomic_dir
    from exporter.onnx.graphs import DiTGraph
    from exporter.onnx.torch_export import ort_session
    from exporter.passes.ort_fusion import ORT_SESSION_CONFIG, fuse_attention

    export = Path(args.export)
    if not (export / "manifest.json").is_file():
        raise InputError(f"--export {export}: no manifest.json there")
    manifest = json.loads((export / "manifest.json").read_text())
    graphs = {"ort fp32": export / manifest["graphs"]["dit"]["file"]}
    fused = Path(args.out).with_name(Path(args.out).name + ".fused-fp32.onnx")
    onnx.save(fuse_attention(onnx.load(str(graphs["ort fp32"])), "mha")[0], str(fused))
    graphs["ort fp32 (fused)"] = fused
    for item in args.graph:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise InputError(f"--graph {item!r}: expected NAME=PATH of an ONNX file")
        graphs[name] = Path(path)
    one = {**ORT_SESSION_CONFIG, "intra_op_num_threads": "1"}
    inputs = feeds(manifest["dims"], args.length)
    steps = {n: (lambda s: lambda: s.run(["v"], inputs))(ort_session(p, one)) for n, p in graphs.items()}
    torch.set_num_threads(1)
    module = DiTGraph(reload_from_identity(manifest).dit).eval()
    tensors = [torch.from_numpy(inputs[k]) for k in INPUTS]

    def torch_step() -> None:
        with torch.inference_mode():
            module(*tensors)
    steps = {"torch eager fp32": torch_step, **steps}
    names = list(steps)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load = os.getloadavg()
    for r in tqdm(range(args.runs + 1), desc="rounds", unit="round"):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.process_time()
            steps[name]()
            if r:
                cpu[name].append(time.process_time() - t0)
    med = {n: float(np.median(v)) for n, v in cpu.items()}
    dens = {"vs ORT FP32": "ort fp32", "vs ORT FP32 fused": "ort fp32 (fused)", "vs torch FP32": "torch eager fp32"}
    rows = [{"name": n, "cpu_s": med[n], **{k: med[n] / med[d] for k, d in dens.items()}, "samples": cpu[n]}
            for n in names]
    doc = {"length": args.length, "batch": 2, "threads": 1, "runs": args.runs, "loadavg_at_start": load,
           "loadavg_at_end": os.getloadavg(), "cores": os.cpu_count(), "rows": rows}
    lines = [f"DiT step in CPU seconds (one thread, `time.process_time`), CFG batch 2, {args.length} latents, median of "
             f"{args.runs} round-robin rounds; load average {load[0]:.1f} at start on {os.cpu_count()} cores", "",
             "| candidate | CPU s per step | " + " | ".join(dens) + " |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['cpu_s']:.2f} | " + " | ".join(f"{r[k]:.3f}x" for k in dens) + " |" for r in rows]
    with atomic_dir(Path(args.out)) as tmp:
        (tmp / "cputime.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "cputime.md").write_text("\n".join(lines) + "\n")
    fused.unlink(missing_ok=True)
    print("\n".join(lines))
    return 0
