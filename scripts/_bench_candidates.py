"""What `scripts/bench.py` times, one candidate per subprocess: a DiT step in PyTorch (CPU or CUDA, FP32 or
FP16, eager or torch.compile), ONNX Runtime (CPU) or a TensorRT engine.

A spec is plain JSON (it crosses a process boundary): kind ('torch', 'ort', 'trt'), latent length, model
dims, warm-up and run counts, plus what the kind needs. GPU timings synchronise the device after every
step, so a median is a step's wall time, not its launch time.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

INPUTS = ("x", "t", "cross_attn_cond", "global_embed")


def feeds(dims: dict[str, int], length: int, batch: int = 2) -> dict[str, np.ndarray]:
    """One DiT call's inputs at the CFG batch: noise-like latents at mid-trajectory t."""
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((batch, dims["io_channels"], length)).astype(np.float32),
            "t": np.full(batch, 0.5, np.float32),
            "cross_attn_cond": rng.standard_normal((batch, dims["cond_tokens"], dims["cond_dim"])).astype(np.float32),
            "global_embed": rng.standard_normal((batch, dims["global_dim"])).astype(np.float32)}


def torch_candidates(cuda: bool) -> dict[str, dict[str, Any]]:
    """PyTorch rows: eager FP32 on the CPU always; FP16 eager and torch.compile on a CUDA GPU."""
    rows = {"torch eager fp32": {"device": "cpu", "dtype": "float32", "compile": False}}
    if cuda:
        rows["torch eager fp16 (cuda)"] = {"device": "cuda", "dtype": "float16", "compile": False}
        rows["torch.compile fp16 (cuda)"] = {"device": "cuda", "dtype": "float16", "compile": True}
    return rows


def _torch_step(spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    import torch

    from exporter.graphs import DiTGraph
    from exporter.models import reload_from_identity

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    module: Any = DiTGraph(reload_from_identity(spec["manifest"]).dit).eval().to(device=device, dtype=dtype)
    if spec.get("compile"):
        module = torch.compile(module)
    tensors = [torch.from_numpy(inputs[k]).to(device=device, dtype=dtype) for k in INPUTS]

    def step() -> None:
        with torch.inference_mode():
            module(*tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def _ort_step(spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    from engines.backends import dit_session

    session = dit_session(Path(spec["dir"]), spec["entry"])
    return lambda: session.run(["v"], inputs)


def _trt_step(spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    import torch

    from engines.tensorrt import EngineRunner, load_engine

    runner = EngineRunner(load_engine(Path(spec["engine"])), Path(spec["engine"]).name,
                          cuda_graph=bool(spec.get("cuda_graph")))
    tensors = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}

    def step() -> None:
        runner(tensors)
        torch.cuda.synchronize()
    return step


STEPS = {"torch": _torch_step, "ort": _ort_step, "trt": _trt_step}


def peak_rss_mb() -> float:
    """VmHWM of this process: ru_maxrss would carry over the parent's high-water mark across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one candidate: median and min of `runs` steps after `warmup`, peak memory, and (ORT with
    `profile`) the ORT-profiler breakdown of where the step's time goes."""
    inputs = feeds(spec["dims"], spec["length"])
    cuda = spec["kind"] == "trt" or spec.get("device") == "cuda"
    if cuda:
        import torch

        torch.cuda.init()
        free_before = torch.cuda.mem_get_info()[0]
    step = STEPS[spec["kind"]](spec, inputs)
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result: dict[str, Any] = {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
                              "peak_rss_mb": peak_rss_mb()}
    if cuda:  # torch's allocator sees its own tensors only; TensorRT's engine and context memory is not its
        result["gpu_mb"] = (torch.cuda.max_memory_allocated() if spec["kind"] == "torch"
                            else free_before - torch.cuda.mem_get_info()[0]) / 2**20
    if spec["kind"] == "ort" and spec.get("profile"):
        from engines.ort_profile import profile_session

        entry, graph = spec["entry"], spec["entry"]["file"]
        if entry.get("buckets"):  # the bucket graph the sampler would run at this t
            from calibration.collector import BucketSpec

            index = BucketSpec(tuple(entry["bucket_edges"])).bucket_of(float(inputs["t"][0]))
            graph = next(b["file"] for b in entry["buckets"] if b["index"] == index)
        result["breakdown"] = profile_session(Path(spec["dir"]) / graph, entry.get("ort_session_config") or {},
                                              inputs, runs=spec.get("profile_runs", 3))
    return result
