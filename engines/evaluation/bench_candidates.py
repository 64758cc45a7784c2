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


def device_of(spec: dict[str, Any]) -> str:
    """'cuda' for TensorRT and CUDA PyTorch candidates, 'cpu' otherwise."""
    return "cuda" if spec["kind"] == "trt" or str(spec.get("device", "cpu")).startswith("cuda") else "cpu"


def torch_candidates(cuda: bool) -> dict[str, dict[str, Any]]:
    """PyTorch rows: eager FP32 on the CPU always; FP16 eager and torch.compile on a CUDA GPU."""
    rows = {"torch eager fp32": {"device": "cpu", "dtype": "float32", "compile": False}}
    if cuda:
        rows["torch eager fp16 (cuda)"] = {"device": "cuda", "dtype": "float16", "compile": False}
        rows["torch.compile fp16 (cuda)"] = {"device": "cuda", "dtype": "float16", "compile": True}
    return rows


def _torch_step(spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    import torch

    from exporter.models import reload_from_identity
    from exporter.onnx.graphs import DiTGraph

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
    from engines.runtime.backends import dit_session

    session = dit_session(Path(spec["dir"]), spec["entry"], spec.get("device", "cpu"))
    spec["providers"] = list(getattr(session, "sessions", [session])[0].get_providers())
    return lambda: session.run(["v"], inputs)


def _trt_step(spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    import torch

    from engines.runtime.tensorrt import EngineRunner, load_engine

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


class Candidate:
    """One candidate, set up once: `step()` times a DiT call, `profile()` breaks one down (ORT only),
    `summary()` gives peak memory. Peak RSS is this process's own, hence one process per candidate."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.inputs = feeds(spec["dims"], spec["length"])
        self.cuda = device_of(spec) == "cuda"
        if self.cuda:
            import torch

            torch.cuda.init()
            self.free_before = torch.cuda.mem_get_info()[0]
        self._step = STEPS[spec["kind"]](spec, self.inputs)

    def step(self) -> float:
        """Milliseconds of one step."""
        t0 = time.perf_counter()
        self._step()
        return 1e3 * (time.perf_counter() - t0)

    def profile(self) -> dict[str, float]:
        """The last command: the timed session is released first, so a full-size graph is not held twice."""
        import gc

        from engines.evaluation.ort_profile import profile_session

        self._step = None
        gc.collect()

        entry, graph = self.spec["entry"], self.spec["entry"]["file"]
        if entry.get("buckets"):  # the bucket graph the sampler would run at this t
            from calibration.collector import BucketSpec

            index = BucketSpec(tuple(entry["bucket_edges"])).bucket_of(float(self.inputs["t"][0]))
            graph = next(b["file"] for b in entry["buckets"] if b["index"] == index)
        return profile_session(Path(self.spec["dir"]) / graph, entry.get("ort_session_config") or {}, self.inputs,
                               runs=self.spec.get("profile_runs", 3))

    def summary(self) -> dict[str, float]:
        out: dict[str, Any] = {"peak_rss_mb": peak_rss_mb()}
        if "providers" in self.spec:
            out["providers"] = self.spec["providers"]
        if self.cuda:  # torch's allocator sees its own tensors only; TensorRT's engine and context memory is not its
            import torch

            out["gpu_mb"] = (torch.cuda.max_memory_allocated() if self.spec["kind"] == "torch"
                             else self.free_before - torch.cuda.mem_get_info()[0]) / 2**20
        return out


def timing(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times_ms)), "min_ms": float(np.min(times_ms)), "runs": len(times_ms)}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one candidate on its own: median and min of `runs` steps after `warmup`, peak memory, and (ORT
    with `profile`) the ORT-profiler breakdown of where the step's time goes."""
    candidate = Candidate(spec)
    for _ in range(spec["warmup"]):
        candidate.step()
    result: dict[str, Any] = timing([candidate.step() for _ in range(spec["runs"])])
    result.update(candidate.summary())  # before profile(), which releases the timed session
    if spec["kind"] == "ort" and spec.get("profile"):
        result["breakdown"] = candidate.profile()
    return result


def serve(spec: dict[str, Any]) -> None:
    """A candidate driven over stdin/stdout, one JSON line per command ('step', 'profile', 'summary'), so the
    parent can interleave candidates step by step: drift in the machine's speed (shared hosts) then hits
    every candidate of a round alike. The protocol has fd 1 to itself; library prints go to stderr."""
    import json
    import sys

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    candidate = Candidate(spec)
    proto.write(json.dumps({"ready": True}) + "\n")
    commands = {"step": lambda: {"ms": candidate.step()}, "profile": lambda: {"breakdown": candidate.profile()},
                "summary": candidate.summary}
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        proto.write(json.dumps(commands[command]()) + "\n")


if __name__ == "__main__":
    # `python -m engines.evaluation.bench_candidates --worker|--serve SPEC`: one candidate in its own process
    import json
    import sys

    from engines.runtime.logs import setup_logging

    setup_logging()
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        serve(json.loads(sys.argv[2]))
