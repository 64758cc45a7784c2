"""Benchmark the DiT per sampler step, side by side in one run: PyTorch eager FP32, ONNX Runtime FP32 and
every quantized form quadit exports (w8a8 static with per-bucket or shared scales, w8a8 dynamic with both
kernels, w4a16, w4a8), at the given latent lengths with the CFG batch of 2; plus end-to-end `generate` time
for FP32 vs the fastest quantized graph. On a machine with a CUDA GPU it adds PyTorch FP16 eager and
torch.compile, and, where TensorRT is installed, engines built from FP16, w8a8 and w4a16 exports.

Each candidate runs in its own subprocess, so its peak memory is its own. CPU rows are compared with ORT
FP32, CUDA rows with PyTorch FP16 eager. --breakdown adds ORT's profiler view of where each ORT step's
time goes and the Amdahl bound that follows. CPU rows carry three ratios: against ORT FP32 as exported,
ORT FP32 with the attention fusion the ORT-target graphs get (exporter/passes/ort_fusion.py), and PyTorch eager
FP32. Writes bench.json, bench.md and bench.png. Timings are
medians of --runs runs after --warmup runs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engines.evaluation.bench_candidates import device_of, timing, torch_candidates
from engines.runtime.logs import setup_logging
from exporter.models.cli_args import model_spec

log = logging.getLogger("bench")
# each candidate runs alone in a subprocess of this module (its --worker / --serve modes)
CANDIDATE_MODULE = "engines.evaluation.bench_candidates"
# name -> (scheme, method, activations, bucket policy, dynamic kernel, attention_int8)
CANDIDATES = {
    "ort w8a8 static": ("w8a8", "timestep-smoothquant", "static", "per-bucket-scale", "dql", "none"),
    "ort w8a8 static (shared)": ("w8a8", "timestep-smoothquant", "static", "shared", "dql", "none"),
    "ort w8a8 dynamic (dql)": ("w8a8", "timestep-smoothquant", "dynamic", "shared", "dql", "none"),
    "ort w8a8 dynamic (dql) int8 attention": ("w8a8", "timestep-smoothquant", "dynamic", "shared", "dql", "dynamic-qk"),
    "ort w8a8 dynamic (nbits)": ("w8a8", "timestep-smoothquant", "dynamic", "shared", "nbits", "none"),
    "ort w4a16": ("w4a16", "timestep-smoothquant", "static", "shared", "dql", "none"),
    "ort w4a8": ("w4a8", "timestep-smoothquant", "dynamic", "shared", "dql", "none"),
}
# TensorRT rows: name -> (scheme, bucket policy); strongly typed engines take precision from the graph
TRT_CANDIDATES = {"tensorrt fp16": ("fp16", None), "tensorrt w8a8": ("w8a8", "shared"),
                  "tensorrt w4a16": ("w4a16", "shared")}
BASELINES = {"cpu": "ort fp32", "cuda": "torch eager fp16 (cuda)"}
DIT_LENGTHS = "256,1024"  # --lengths default of the DiT family (latents)
# the CPU denominators every CPU row is also compared with: ORT FP32 as exported, ORT FP32 with the fusions
# the quantized ORT-target graphs get (the honest baseline), PyTorch eager FP32 (a user's default)
FUSED_FP32 = "ort fp32 (fused)"
CPU_DENOMINATORS = {"vs_ort_fp32": "ort fp32", "vs_ort_fp32_fused": FUSED_FP32, "vs_torch_fp32": "torch eager fp32"}


def _measure(spec: dict) -> dict:
    """One candidate alone in a subprocess (--serial)."""
    proc = subprocess.run([sys.executable, "-m", CANDIDATE_MODULE, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Server:
    """A candidate in its own subprocess (`_bench_candidates.serve`), answering one command at a time."""

    def __init__(self, spec: dict) -> None:
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", CANDIDATE_MODULE, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.ask(None)

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError(f"benchmark worker died: {self.err.read()[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        self.err.close()


def _measure_interleaved(specs: list[dict], warmup: int, runs: int, gap_s: float = 0.05,
                         profile_rounds: int = 3) -> list[dict]:
    """All candidates loaded at once, stepped round-robin (each round in a rotated order), so a change in
    the machine's speed during the run lands on every candidate alike. `gap_s` between steps lets the
    previous candidate's ORT threads stop spinning before the next one starts. Profiles are interleaved the
    same way, `profile_rounds` each, and the median round is kept."""
    servers: list[_Server] = []
    try:
        for spec in specs:
            servers.append(_Server(spec))
        times: list[list[float]] = [[] for _ in specs]
        from tqdm import tqdm

        for r in tqdm(range(warmup + runs), desc=f"rounds of {len(servers)}", unit="round", leave=False):
            for i in [(r + k) % len(servers) for k in range(len(servers))]:
                time.sleep(gap_s)
                ms = servers[i].ask("step")["ms"]
                if r >= warmup:
                    times[i].append(ms)
        from engines.evaluation.ort_profile import median_round

        results = [{**timing(t), **server.ask("summary")} for server, t in zip(servers, times)]
        profiled = [i for i, spec in enumerate(specs) if spec["kind"] == "ort" and spec.get("profile")]
        rounds: dict[int, list[dict]] = {i: [] for i in profiled}
        for r in tqdm(range(profile_rounds if profiled else 0), desc="profile rounds", unit="round", leave=False):
            for i in [profiled[(r + k) % len(profiled)] for k in range(len(profiled))]:
                time.sleep(gap_s)
                rounds[i].append(servers[i].ask("profile")["breakdown"])
        for i in profiled:
            results[i]["breakdown"] = median_round(rounds[i])
        return results
    finally:
        for server in servers:
            server.close()


def _fused_fp32(source: Path, manifest: dict, target: Path, attention: str) -> tuple[Path, dict]:
    """The FP32 export with the ORT target's fusions applied to its DiT: the honest FP32 denominator."""
    import onnx

    from exporter.onnx import graph_edit
    from exporter.onnx.artifacts import write_manifest
    from exporter.onnx.torch_export import PROTOBUF_LIMIT
    from exporter.passes.ort_fusion import ORT_SESSION_CONFIG, fuse_attention

    entry = manifest["graphs"]["dit"]
    shutil.copytree(source, target, copy_function=os.link, ignore=shutil.ignore_patterns(*entry["files"]))
    model, sites = fuse_attention(onnx.load(str(source / entry["file"])), attention)
    fused = json.loads(json.dumps(manifest))
    fused["graphs"]["dit"].update({"files": graph_edit.save(model, target / entry["file"], PROTOBUF_LIMIT),
                                   "ort_fusion": {"attention": attention, "sites": sites},
                                   "ort_session_config": dict(ORT_SESSION_CONFIG)})
    write_manifest(target, fused)
    return target, fused


def _cpu_name() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def _cpu_flags() -> str:
    """The SIMD features that bound ORT's CPU kernels (INT8 dot products need VNNI or AMX)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def _generate_seconds(exports: dict[str, Path], steps: int, seconds: float, rounds: int = 3,
                      device: str = "cpu") -> dict[str, float]:
    """Median wall time of `generate` per export, the exports alternating round by round after a warm-up."""
    import numpy as np

    from engines.runtime.pipeline import GenerateOptions, open_pipeline

    opts = GenerateOptions(prompt="rain on a tin roof", seconds=seconds, steps=steps)
    pipelines = {name: open_pipeline(path, device=device) for name, path in exports.items()}
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(rounds + 1):
        for name, pipeline in pipelines.items():
            t0 = time.perf_counter()
            pipeline.generate(opts)
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _chart(rows: list[dict], path: Path) -> None:
    """Per latent length: each candidate's step time relative to its device's baseline (the 1.0 line),
    annotated with the median ms; CPU and CUDA rows differ by orders of magnitude, ratios do not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))[::-1]
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 0.4 * len(names) + 1.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        sub = {r["name"]: r for r in rows if r["length"] == length}
        ratios = [sub[n]["vs_baseline"] if n in sub else 0.0 for n in names]
        colors = ["#c2552b" if sub.get(n, {}).get("device") == "cuda" else "#3b6fb6" for n in names]
        ax.barh(names, ratios, color=colors)
        for y, n in enumerate(names):
            if n in sub:
                ax.text(ratios[y], y, f" {sub[n]['median_ms']:.0f} ms", va="center", fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlim(0, max(ratios) * 1.3)
        ax.set_title(f"DiT step, CFG batch 2, latent length {length}")
        ax.set_xlabel("time vs baseline (blue CPU: ORT FP32, orange CUDA: PyTorch FP16)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(doc: dict, title: str) -> list[str]:
    rows, runs = doc["rows"], doc["runs"]
    lines = [title, "", "| candidate | device | latent length | median ms | vs baseline | vs ORT FP32 fused | "
             "vs torch FP32 | peak RSS MB | GPU MB | DiT weights vs FP32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['device']} | {r['length']} | {r['median_ms']:.1f} | {r['vs_baseline']:.2f}x | "
              f"{_ratio(r.get('vs_ort_fp32_fused'))} | {_ratio(r.get('vs_torch_fp32'))} | "
              f"{r['peak_rss_mb']:.0f} | {r['gpu_mb']:.0f} | {_ratio(r['size_ratio'])} |".replace("| nan |", "| - |")
              for r in rows]
    machine = doc.get("machine", {})
    if machine.get("loadavg_at_start"):
        lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine.get('cpu_flags') or 'flags unknown'}); "
                  f"load average {machine['loadavg_at_start'][0]:.1f} at start, {machine['loadavg_at_end'][0]:.1f} at end."]
    lines += ["", f"Baselines: CPU rows vs {BASELINES['cpu']} (as exported), also vs {FUSED_FP32} (the same attention "
              f"fusion as the quantized ORT-target graphs) and torch eager fp32; CUDA rows vs {BASELINES['cuda']}; "
              f"median of {runs} runs after {doc['warmup']} warm-up, "
              + ("candidates one after another." if doc["schedule"] == "serial"
                 else "candidates stepped round-robin (one step each per round, rotating order).")]
    if doc.get("weights") == "nearest":
        lines += ["", "Quantized candidates built with round-to-nearest weights (`--weights nearest`): the same "
                  "graphs and kernels as the default passes give, so the same speed, not their accuracy."]
    if doc["generate_seconds"]:
        lines += ["", f"`generate` ({doc['e2e_steps']} steps, {doc['e2e_audio_seconds']} s audio, median of 3 "
                  "alternating runs): " +
                  ", ".join(f"{k} {v:.1f} s" for k, v in doc["generate_seconds"].items())]
    profiled = [r for r in rows if r.get("breakdown")]
    if profiled:
        from engines.evaluation.ort_profile import CATEGORIES

        lines += ["", "Where the time goes (ORT profiler, kernel ms per step; the median of "
                  f"{doc.get('profile_rounds') or 'the'} interleaved profile rounds; wall = the profiled runs' own "
                  "step time):", "",
                  "| candidate | latent length | " + " | ".join(CATEGORIES) + " | total | wall |",
                  "|---|---|" + "---|" * (len(CATEGORIES) + 2)]
        lines += [f"| {r['name']} | {r['length']} | " + " | ".join(f"{r['breakdown'][c]:.1f}" for c in CATEGORIES)
                  + f" | {r['breakdown']['total']:.1f} | {r['breakdown'].get('profiled_step_ms', float('nan')):.1f} |"
                  for r in profiled]
        bounded = [r for r in profiled if r.get("amdahl")]
        lines += ["", "Amdahl view against ORT FP32 (weight GEMMs = the layers quantization replaces; their "
                  "speedup counts the activation quantization and branch work they bring):", "",
                  "| candidate | latent length | FP32 time in weight GEMMs | GEMM speedup in situ | bound at that "
                  "speedup | bound with free GEMMs |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['length']} | {r['amdahl']['gemm_fraction_fp32']:.0%} | "
                  f"{r['amdahl']['gemm_speedup']:.2f}x | {r['amdahl']['bound_at_this_speedup']:.2f}x | "
                  f"{r['amdahl']['bound_free_gemms']:.2f}x |" for r in bounded]
    if doc.get("gemm_ceiling"):
        lines += ["", "ORT's INT8 GEMM against FP32 on this CPU (one MatMul, static INT8 Q/DQ -> MatMulIntegerToFloat, "
                  "median of 10):", "", "| M x K x N | FP32 ms | INT8 ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {c['m']} x {c['k']} x {c['n']} | {c['fp32_ms']:.2f} | {c['int8_ms']:.2f} | {c['speedup']:.2f}x |"
                  for c in doc["gemm_ceiling"]]
    return lines


def _release_weights(loaded) -> None:
    """Free the torch model's tensors once its FP32 graphs are written. Without TensorRT exports, what is
    left needs only the module structure (layer names and widths), and the torch rows load their own copy
    in a worker. At full size this is about 6 GB, which the quantize stages would otherwise hold on top of
    their own 18 GB. Measured: 24.2 GB peak, killed by the OOM killer on a 24 GB machine."""
    import torch

    for tensor in [*loaded.wrapper.parameters(), *loaded.wrapper.buffers()]:
        tensor.data = torch.empty(0, dtype=tensor.dtype)


def trt_lengths(lengths: list[int], loaded) -> list[int]:
    """The benchmarked lengths an engine can be built for: engine profiles end at the model's window."""
    window = int(loaded.config["sample_size"]) // int(loaded.wrapper.pretransform.downsampling_ratio)
    if skipped := [n for n in lengths if n > window]:
        log.warning("no TensorRT rows at latent lengths %s: beyond this model's window of %d latents", skipped, window)
    return [n for n in lengths if n <= window]


def _trt_exports(loaded, calibration, scratch: Path, lengths: list[int], dims: dict) -> dict[str, Path]:
    """Export and build the TensorRT candidates; name -> DiT engine file. Profiles: CFG batch 2 over the
    benchmarked lengths (seconds chosen half a latent below each length, so ceil() lands on it)."""
    from engines.runtime.tensorrt import BuildSettings, build_engines
    from exporter.passes.recipe import Recipe
    from exporter.stages.export import ExportOptions, export_model
    from exporter.stages.quantized import QuantizeOptions, quantize_stage

    def seconds(length: int) -> float:
        return (length - 0.5) * dims["downsampling_ratio"] / dims["sample_rate"]

    settings = BuildSettings(min_seconds=seconds(min(lengths)), max_seconds=seconds(max(lengths)), batch_sizes=(2,),
                             timing_cache=str(scratch / "timing.cache"))
    engines = {}
    for i, (name, (scheme, policy)) in enumerate(TRT_CANDIDATES.items()):
        stages = []
        if policy is not None:
            recipe = Recipe(scheme=scheme, method="timestep-smoothquant", activations="static", bucket_policy=policy)
            stages = [quantize_stage(loaded, calibration, QuantizeOptions(recipe, "tensorrt"), scratch)]
        export = scratch / f"trt{i}"
        export_model(loaded, export, ExportOptions(scheme="fp16" if scheme == "fp16" else "fp32", target="tensorrt"),
                     stages)
        doc = build_engines(export, scratch / f"trt{i}-engines", settings)
        engines[name] = scratch / f"trt{i}-engines" / doc["engines"]["dit"]["engine"]
        log.info("built %s (%.0f s)", name, sum(e["build_seconds"] for e in doc["engines"].values()))
    return engines


def execute(args: argparse.Namespace) -> int:
    """`quadit bench` after argument parsing (the parser: `engines.cli.bench`)."""
    setup_logging(args.verbose)

    import platform

    import torch

    from engines.evaluation.ort_profile import amdahl
    from engines.runtime.tensorrt import tensorrt_unavailable
    from exporter.errors import InputError
    from exporter.models import load_model
    from exporter.models.cli_args import unet_requested
    from exporter.onnx.artifacts import atomic_dir, write_manifest
    from exporter.passes.recipe import ROUND_TO_NEAREST, Recipe
    from exporter.stages.export import ExportOptions, export_model
    from exporter.stages.quantized import QuantizeOptions, quantize_stage, read_calibration

    if unet_requested(args):
        if not args.predict:
            raise InputError("bench times the DiT family; for a UNet-family model use --predict (the TensorRT "
                             "prediction of its FP16 and w8a8 UNet)")
        if args.calibration:
            raise InputError("--calibration is for the DiT family: the UNet prediction reads only the graphs' "
                             "structure, which does not depend on calibrated values")
        from engines.evaluation.bench_predict import predict_unet_main
        from exporter.models.cli_args import unet_model_name
        from exporter.models.unet_audio import load_unet_model

        try:
            frames = [int(v) for v in args.lengths.split(",")] if args.lengths else None
        except ValueError:
            raise InputError(f"--lengths {args.lengths!r} is not a comma-separated list of latent frames") from None
        model = load_unet_model(unet_model_name(args), args.checkpoint, args.synthetic_weights, args.seed)
        predict_unet_main(model, frames, Path(args.out))
        return 0
    args.lengths = args.lengths or DIT_LENGTHS
    if args.predict:
        from engines.evaluation.bench_predict import predict_main

        loaded = load_model(model_spec(args))
        calibration = read_calibration(Path(args.calibration), loaded) if args.calibration else None
        predict_main(loaded, calibration, [int(v) for v in args.lengths.split(",")], Path(args.out))
        return 0
    if not args.calibration:
        raise InputError("--calibration is required (except with --predict)")
    if args.runs < 10:
        log.warning("--runs %d < 10: medians of fewer runs are noisy", args.runs)
    from engines.runtime.durations import pick_seconds
    from engines.runtime.providers import providers_for

    providers_for(args.device)  # refused before any work when this onnxruntime cannot run there
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
    except ValueError:
        raise InputError(f"--lengths {args.lengths!r} is not a comma-separated list of latent lengths") from None
    if min(lengths) < 1:
        raise InputError(f"--lengths {args.lengths!r}: latent lengths must be >= 1")
    if args.runs < 1 or args.warmup < 0 or args.e2e_steps == 1 or args.e2e_steps < 0 or args.profile_rounds < 1:
        raise InputError(f"need --runs >= 1, --warmup >= 0, --e2e-steps 0 or >= 2 and --profile-rounds >= 1 (got "
                         f"{args.runs}, {args.warmup}, {args.e2e_steps}, {args.profile_rounds})")
    names = [n for n in args.candidates.split(",") if n]
    if unknown := [n for n in names if n not in CANDIDATES]:
        raise InputError(f"unknown candidates {unknown} (choose from: {', '.join(CANDIDATES)})")
    cuda = args.gpu == "auto" and torch.cuda.is_available()
    trt_reason = tensorrt_unavailable() if cuda else "no CUDA GPU"
    if cuda and trt_reason:
        log.warning("no TensorRT rows: %s", trt_reason)
    loaded = load_model(model_spec(args))
    if args.e2e_steps:
        args.e2e_seconds = pick_seconds("--e2e-seconds", args.e2e_seconds, 10.0, loaded.config, "generate timing")
    calibration = read_calibration(Path(args.calibration), loaded)
    scratch = Path(tempfile.mkdtemp(prefix="quadit-bench-"))
    load_at_start = os.getloadavg()
    rows, exports = [], {}
    try:
        fp32_manifest = export_model(loaded, scratch / "fp32", ExportOptions(scheme="fp32"))
        exports["ort fp32"] = (scratch / "fp32", fp32_manifest)
        if args.attention != "none" and not args.no_fused_fp32:
            exports[FUSED_FP32] = _fused_fp32(scratch / "fp32", fp32_manifest, scratch / "fp32-fused", args.attention)
        dims = fp32_manifest["dims"]
        if not cuda:
            _release_weights(loaded)
        ranks = [args.lowrank] + ([args.also_lowrank] if args.also_lowrank else [])
        fusions = [args.attention] + (["none"] if args.also_unfused and args.attention != "none" else [])
        for i, (base_name, rank, fusion) in enumerate((n, r, f) for n in names for r in ranks for f in fusions):
            scheme, method, act, policy, kernel, int8_attention = CANDIDATES[base_name]
            name = base_name + (f" rank {rank}" if rank else "") + (" unfused" if fusion != args.attention else "")
            recipe = Recipe(scheme=scheme, method=method, activations=act, bucket_policy=policy, lowrank=rank,
                            attention_int8=int8_attention, **(ROUND_TO_NEAREST if args.weights == "nearest" else {}))
            stage = quantize_stage(loaded, calibration, QuantizeOptions(recipe, "onnxruntime", kernel, fusion), scratch,
                                   source=scratch / "fp32")
            manifest = json.loads(json.dumps(fp32_manifest))
            target = scratch / f"q{i}"
            # the other graphs are shared (hard links); the stage writes the dit files afresh
            shutil.copytree(scratch / "fp32", target, copy_function=os.link,
                            ignore=shutil.ignore_patterns(*fp32_manifest["graphs"]["dit"]["files"]))
            stage(target, manifest)
            write_manifest(target, manifest)
            exports[name] = (target, manifest)
        engine_lengths = trt_lengths(lengths, loaded) if cuda and not trt_reason else []
        engines = _trt_exports(loaded, calibration, scratch, engine_lengths, dims) if engine_lengths else {}
        del loaded
        torch_rows = {k: v for k, v in torch_candidates(cuda).items() if not (args.no_torch and v["device"] == "cpu")}
        for length in lengths:
            base = {"length": length, "dims": dims, "warmup": args.warmup, "runs": args.runs}
            specs = [(n, {**base, "kind": "torch", "manifest": fp32_manifest, **t}, None) for n, t in torch_rows.items()]
            specs += [(n, {**base, "kind": "ort", "dir": str(d), "entry": m["graphs"]["dit"], "profile": args.breakdown,
                           "device": args.device},
                       m["graphs"]["dit"].get("size_ratio", 1.0)) for n, (d, m) in exports.items()]
            specs += [(n, {**base, "kind": "trt", "engine": str(e)}, None) for n, e in engines.items()
                      if length in engine_lengths]
            results = ([_measure(spec) for _, spec, _ in specs] if args.serial
                       else _measure_interleaved([spec for _, spec, _ in specs], args.warmup, args.runs,
                                              profile_rounds=args.profile_rounds))
            for (name, spec, size), result in zip(specs, results):
                rows.append({"name": name, "length": length, "device": device_of(spec), **result, "size_ratio": size,
                             "gpu_mb": result.get("gpu_mb", float("nan"))})
                log.info("L=%-5d %-28s %9.1f ms  peak RSS %7.0f MB", length, name, result["median_ms"],
                         result["peak_rss_mb"])
        ceilings = []
        if args.breakdown:  # ORT's INT8 GEMM against FP32 at the model's widths, M = CFG batch x length
            from engines.evaluation.ort_profile import gemm_ceiling

            d = dims["embed_dim"]
            ceilings = [gemm_ceiling(2 * length, k, n) for length in lengths for k, n in ((d, d), (d, 4 * d), (4 * d, d))]
            for c in ceilings:
                log.info("GEMM %dx%dx%d: FP32 %.1f ms, INT8 Q/DQ %.1f ms (%.2fx)", c["m"], c["k"], c["n"], c["fp32_ms"],
                         c["int8_ms"], c["speedup"])
        for r in rows:
            base_row = next((b for b in rows if b["name"] == BASELINES[r["device"]] and b["length"] == r["length"]), None)
            r["vs_baseline"] = r["median_ms"] / base_row["median_ms"] if base_row else float("nan")
            for key, denominator in CPU_DENOMINATORS.items():
                den = next((b for b in rows if b["name"] == denominator and b["length"] == r["length"]), None)
                r[key] = r["median_ms"] / den["median_ms"] if den and r["device"] == "cpu" else None
            if r.get("breakdown") and base_row and base_row.get("breakdown") and r is not base_row:
                r["amdahl"] = amdahl(base_row["breakdown"], r["breakdown"])
        e2e = {}
        if args.e2e_steps:
            fastest = min((r for r in rows if r["name"] in exports and r["name"] not in ("ort fp32", FUSED_FP32)
                           and r["length"] == max(lengths)), key=lambda r: r["median_ms"])["name"]
            e2e = _generate_seconds({n: exports[n][0] for n in dict.fromkeys(("ort fp32", FUSED_FP32, fastest))
                                     if n in exports}, args.e2e_steps, args.e2e_seconds,
                                    device=args.device)
            for name, sec in e2e.items():
                log.info("generate %s: %.1f s (%d steps, %.1f s audio, median of 3)", name, sec, args.e2e_steps,
                         args.e2e_seconds)
        machine = {"cpu": _cpu_name() or platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "cpu_flags": _cpu_flags(), "loadavg_at_end": os.getloadavg(), "loadavg_at_start": load_at_start,
                   "python": platform.python_version(),
                   "gpu": torch.cuda.get_device_name(0) if cuda else None, "tensorrt": trt_reason or "available"}
        doc = {"model": fp32_manifest["model"], "machine": machine, "runs": args.runs, "warmup": args.warmup,
               "schedule": "serial" if args.serial else "interleaved", "weights": args.weights, "rows": rows,
               "gemm_ceiling": ceilings,
               "profile_rounds": (1 if args.serial else args.profile_rounds) if args.breakdown else 0,
               "generate_seconds": e2e,
               "e2e_steps": args.e2e_steps, "e2e_audio_seconds": args.e2e_seconds}
        title = (f"DiT per step, CFG batch 2, {fp32_manifest['model']['model']} ({fp32_manifest['model']['weights']}), "
                 f"{machine['cores']} CPU cores" + (f", {machine['gpu']}" if cuda else ", no GPU"))
        lines = _markdown(doc, title)
        with atomic_dir(Path(args.out)) as tmp:
            (tmp / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
            (tmp / "bench.md").write_text("\n".join(lines) + "\n")
            _chart(rows, tmp / "bench.png")
        print("\n".join(lines))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
