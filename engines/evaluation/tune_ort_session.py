"""Time an export's DiT under several ONNX Runtime session settings, round-robin in one run, to choose the
ONNX Runtime target's `ort_session_config` (exporter/passes/ort_fusion.py ORT_SESSION_CONFIG) by measurement.

Each setting is one session of the same graph; each round steps every session once in a rotated order, so
a change in the machine's load lands on every setting alike. Writes tune.json and tune.md (step median per
setting and its ratio to ONNX Runtime's defaults)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from engines.runtime.logs import setup_logging

log = logging.getLogger("tune_ort_session")
SETTINGS = {
    "defaults": {},
    "1 intra-op thread": {"intra_op_num_threads": "1"},
    "no spinning": {"session.intra_op.allow_spinning": "0"},
    "no CPU arena": {"enable_cpu_mem_arena": "0"},
    "no memory pattern": {"enable_mem_pattern": "0"},
    "optimisation extended": {"graph_optimization_level": "extended"},
    "optimisation basic": {"graph_optimization_level": "basic"},
}


def execute(args: argparse.Namespace) -> int:
    """`quadit tune-ort-session` after argument parsing (the parser: `engines.cli.tune_ort_session`)."""
    setup_logging()

    import numpy as np
    from tqdm import tqdm

    from engines.evaluation.bench_candidates import feeds
    from engines.runtime.backends import dit_session
    from exporter.errors import InputError
    from exporter.onnx.artifacts import atomic_dir

    manifest_path = Path(args.export) / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"--export {args.export}: no manifest.json there")
    names = [n for n in args.settings.split(",") if n]
    if unknown := [n for n in names if n not in SETTINGS]:
        raise InputError(f"unknown settings {unknown} (choose from: {', '.join(SETTINGS)})")
    if args.runs < 1 or args.length < 1:
        raise InputError("need --runs >= 1 and --length >= 1")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["graphs"]["dit"]
    inputs = feeds(manifest["dims"], args.length)
    sessions = {n: dit_session(Path(args.export), {**entry, "ort_session_config": {
        **(entry.get("ort_session_config") or {}), **SETTINGS[n]}}) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    load = os.getloadavg()
    for r in tqdm(range(args.warmup + args.runs), desc="rounds", unit="round"):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            time.sleep(0.05)  # let the previous session's threads stop spinning
            t0 = time.perf_counter()
            sessions[name].run(["v"], inputs)
            if r >= args.warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    base = float(np.median(times[names[0]]))
    rows = [{"setting": n, "config": SETTINGS[n], "median_ms": float(np.median(times[n])),
             "vs_first": float(np.median(times[n])) / base, "times_ms": times[n]} for n in names]
    doc = {"export": str(args.export), "graph": entry["file"], "precision": entry.get("precision", "fp32"),
           "length": args.length, "batch": 2, "runs": args.runs, "warmup": args.warmup, "cores": os.cpu_count(),
           "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "rows": rows}
    lines = [f"ONNX Runtime session settings, DiT {entry['file']} ({doc['precision']}), CFG batch 2, {args.length} "
             f"latents, {os.cpu_count()} cores, load average {load[0]:.1f} at start; median of {args.runs} "
             "round-robin rounds", "", f"| setting | config | median ms | vs {names[0]} |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | `{json.dumps(r['config'])}` | {r['median_ms']:.1f} | {r['vs_first']:.3f}x |"
              for r in rows]
    with atomic_dir(Path(args.out)) as tmp:
        (tmp / "tune.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
