#!/usr/bin/env python
"""Benchmark the DiT per sampler step, side by side in one run: PyTorch eager FP32, ONNX Runtime FP32 and
every quantized form quadit exports (w8a8 static, w8a8 dynamic with both kernels, w4a16, w4a8), at the
given latent lengths with the CFG batch of 2; plus end-to-end `generate` time for FP32 vs the fastest
quantized graph. Each candidate runs in its own subprocess, so its peak RSS is its own. Writes
bench.json, bench.md and bench.png. Timings are medians of --runs runs after --warmup runs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import add_model_args, model_spec, run, setup_logging  # noqa: E402

log = logging.getLogger("bench")
# name -> (scheme, method, activations, bucket policy, dynamic kernel)
CANDIDATES = {
    "ort w8a8 static": ("w8a8", "timestep-smoothquant", "static", "per-bucket-scale", "dql"),
    "ort w8a8 dynamic (dql)": ("w8a8", "timestep-smoothquant", "dynamic", "shared", "dql"),
    "ort w8a8 dynamic (nbits)": ("w8a8", "timestep-smoothquant", "dynamic", "shared", "nbits"),
    "ort w4a16": ("w4a16", "timestep-smoothquant", "static", "shared", "dql"),
    "ort w4a8": ("w4a8", "timestep-smoothquant", "dynamic", "shared", "dql"),
}


def _feeds(dims: dict, length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, dims["io_channels"], length)).astype(np.float32),
            "t": np.full(2, 0.5, np.float32),
            "cross_attn_cond": rng.standard_normal((2, dims["cond_tokens"], dims["cond_dim"])).astype(np.float32),
            "global_embed": rng.standard_normal((2, dims["global_dim"])).astype(np.float32)}


def worker(spec: dict) -> dict:
    """Time one candidate (runs in a subprocess)."""
    import numpy as np

    feeds = _feeds(spec["dims"], spec["length"])
    if spec["kind"] == "torch":
        import torch

        from exporter.graphs import DiTGraph
        from exporter.models import reload_from_identity

        torch.set_num_threads(os.cpu_count() or 1)
        module = DiTGraph(reload_from_identity(spec["manifest"]).dit).eval()
        tensors = [torch.from_numpy(feeds[k]) for k in ("x", "t", "cross_attn_cond", "global_embed")]

        def step():
            with torch.no_grad():
                module(*tensors)
    else:
        from engines.backends import dit_session

        session = dit_session(Path(spec["dir"]), spec["entry"])

        def step():
            session.run(["v"], feeds)
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """VmHWM of this process: ru_maxrss would carry over the parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _generate_seconds(export: Path, steps: int, seconds: float) -> float:
    from engines.runtime import GenerateOptions, open_pipeline

    pipeline = open_pipeline(export)
    opts = GenerateOptions(prompt="rain on a tin roof", seconds=seconds, steps=steps)
    pipeline.generate(opts)  # warm-up
    t0 = time.perf_counter()
    pipeline.generate(opts)
    return time.perf_counter() - t0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 0.4 * len(names) + 1.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        sub = {r["name"]: r["median_ms"] for r in rows if r["length"] == length}
        ax.barh(names[::-1], [sub.get(n, 0) for n in names[::-1]], color="#3b6fb6")
        ax.set_title(f"DiT step, CFG batch 2, latent length {length}")
        ax.set_xlabel("median ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        setup_logging()
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--calibration", required=True, help="calibration artifact of this model")
    parser.add_argument("--lengths", default="256,1024", help="latent lengths")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="quantized candidates to time")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch eager")
    parser.add_argument("--lowrank", type=int, default=0, help="low-rank branch rank of every quantized candidate")
    parser.add_argument("--also-lowrank", type=int, default=0, help="also time every candidate with this rank")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=0, help="also time generate with this many steps (0: no)")
    parser.add_argument("--e2e-seconds", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    import platform

    from exporter.artifacts import atomic_dir, write_manifest
    from exporter.export import ExportOptions, export_model
    from exporter.models import load_model
    from exporter.quantized_export import QuantizeOptions, quantize_stage, read_calibration
    from exporter.recipe import Recipe

    if args.runs < 10:
        log.warning("--runs %d < 10: medians of fewer runs are noisy", args.runs)
    lengths = [int(v) for v in args.lengths.split(",")]
    names = [n for n in args.candidates.split(",") if n]
    loaded = load_model(model_spec(args))
    calibration = read_calibration(Path(args.calibration), loaded)
    scratch = Path(tempfile.mkdtemp(prefix="quadit-bench-"))
    rows, exports = [], {}
    try:
        fp32_manifest = export_model(loaded, scratch / "fp32", ExportOptions(scheme="fp32"))
        exports["ort fp32"] = (scratch / "fp32", fp32_manifest)
        ranks = [args.lowrank] + ([args.also_lowrank] if args.also_lowrank else [])
        for i, (base_name, rank) in enumerate((n, r) for n in names for r in ranks):
            scheme, method, act, policy, kernel = CANDIDATES[base_name]
            name = base_name + (f" rank {rank}" if rank else "")
            recipe = Recipe(scheme=scheme, method=method, activations=act, bucket_policy=policy, lowrank=rank)
            stage = quantize_stage(loaded, calibration, QuantizeOptions(recipe, "onnxruntime", kernel), scratch,
                                   source=scratch / "fp32")
            manifest = json.loads(json.dumps(fp32_manifest))
            target = scratch / f"q{i}"
            # the other graphs are shared (hard links); the stage writes the dit files afresh
            shutil.copytree(scratch / "fp32", target, copy_function=os.link,
                            ignore=shutil.ignore_patterns(*fp32_manifest["graphs"]["dit"]["files"]))
            stage(target, manifest)
            write_manifest(target, manifest)
            exports[name] = (target, manifest)
        del loaded
        dims = fp32_manifest["dims"]
        for length in lengths:
            order = ([("torch eager fp32", None)] if not args.no_torch else []) + list(exports.items())
            for name, export in order:
                spec = {"length": length, "dims": dims, "warmup": args.warmup, "runs": args.runs}
                if export is None:
                    spec.update(kind="torch", manifest=fp32_manifest)
                else:
                    spec.update(kind="ort", dir=str(export[0]), entry=export[1]["graphs"]["dit"])
                result = _measure(spec)
                size = None if export is None else export[1]["graphs"]["dit"].get("size_ratio", 1.0)
                rows.append({"name": name, "length": length, **result, "size_ratio": size})
                log.info("L=%-5d %-26s %9.1f ms  peak RSS %7.0f MB", length, name, result["median_ms"], result["peak_rss_mb"])
        for r in rows:
            base = next(b for b in rows if b["name"] == "ort fp32" and b["length"] == r["length"])
            r["vs_ort_fp32"] = r["median_ms"] / base["median_ms"]
        e2e = {}
        if args.e2e_steps:
            fastest = min((r for r in rows if r["name"] not in ("ort fp32", "torch eager fp32") and r["length"] == max(lengths)),
                          key=lambda r: r["median_ms"])["name"]
            for name in ("ort fp32", fastest):
                e2e[name] = _generate_seconds(exports[name][0], args.e2e_steps, args.e2e_seconds)
                log.info("generate %s: %.1f s (%d steps, %.1f s audio)", name, e2e[name], args.e2e_steps, args.e2e_seconds)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version()}
        with atomic_dir(Path(args.out)) as tmp:
            (tmp / "bench.json").write_text(json.dumps({"model": fp32_manifest["model"], "machine": machine,
                                                        "runs": args.runs, "warmup": args.warmup, "rows": rows,
                                                        "generate_seconds": e2e, "e2e_steps": args.e2e_steps,
                                                        "e2e_audio_seconds": args.e2e_seconds}, indent=1) + "\n")
            lines = [f"DiT per step, CFG batch 2, {fp32_manifest['model']['model']} ({fp32_manifest['model']['weights']}), "
                     f"{machine['cores']} cores; median of {args.runs} runs after {args.warmup} warm-up", "",
                     "| candidate | latent length | median ms | vs ORT FP32 | peak RSS MB | DiT weights vs FP32 |",
                     "|---|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['length']} | {r['median_ms']:.1f} | {r['vs_ort_fp32']:.2f}x | "
                      f"{r['peak_rss_mb']:.0f} | {_ratio(r['size_ratio'])} |" for r in rows]
            if e2e:
                lines += ["", f"`generate` ({args.e2e_steps} steps, {args.e2e_seconds} s audio): " +
                          ", ".join(f"{k} {v:.1f} s" for k, v in e2e.items())]
            (tmp / "bench.md").write_text("\n".join(lines) + "\n")
            _chart(rows, tmp / "bench.png")
        print("\n".join(lines))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run(main)
