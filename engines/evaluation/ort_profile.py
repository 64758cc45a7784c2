"""Where a DiT step spends its time in ONNX Runtime: kernel time per category from ORT's own profiler.

The categories answer the question a speed target raises: how much of the step is the weight GEMMs that
quantization accelerates, how much is added by quantizing activations, and how much is float work that no
weight format touches (attention's activation x activation MatMuls, Softmax, norms and elementwise ops).
From the FP32 breakdown and a quantized one follow the in-situ GEMM speedup and Amdahl's bound on the step.

Profile events name the node that ran. ORT's fusions keep the name of the node they start from, sometimes
with a suffix (`node_linear_6/MatmulTransposeFusion/`), so a name is mapped to the longest graph node name
it starts with; what maps nowhere is classified by op type.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

CATEGORIES = ("weight GEMMs", "activation quantization", "low-rank branch", "attention MatMuls", "Softmax", "other")
_QUANT_GEMMS = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits"}
_FLOAT_GEMMS = {"MatMul", "FusedMatMul", "Gemm"}
_FUSED_ATTENTION = {"MultiHeadAttention", "Attention"}
_ACT_QUANT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# suffixes of the node names exporter.passes.names gives the nodes quantization adds
_ACT_SUFFIXES = ("act_q", "act_dq", "dql", "prescale_mul", "postscale_mul", "_gather", "_unsqueeze")
_GEMM_SUFFIXES = ("mmi", "mmi_cast", "mmi_rescale", "mmi_scale", "matmulnbits", "weight_dq")


def _weight_fed(name: str, initializers: set[str], producers: Mapping[str, Any], depth: int = 4) -> bool:
    """True when tensor `name` is a constant: an initializer, possibly through DQ/Cast/Transpose/Reshape."""
    for _ in range(depth):
        if name in initializers:
            return True
        node = producers.get(name)
        if node is None or node.op_type not in {"DequantizeLinear", "Cast", "Transpose", "Reshape", "Constant"}:
            return False
        if node.op_type == "Constant":
            return True
        name = node.input[0]
    return False


def classify_graph(path: Path) -> dict[str, str]:
    """node name -> category, for every node of the ONNX graph at `path` (weights are not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    result = {}
    for node in graph.node:
        tail = node.name.rsplit(".", 1)[-1] if "." in node.name else ""  # exporter.passes.names.node: owner.op
        if tail.startswith("lowrank_"):
            category = "low-rank branch"
        elif (node.name.startswith("quadit.bucket") or node.name.endswith("__smooth_mul")
              or (tail and tail.endswith(_ACT_SUFFIXES))):
            category = "activation quantization"
        elif tail in _GEMM_SUFFIXES or node.op_type in _QUANT_GEMMS:
            category = "weight GEMMs"
        elif node.op_type in _FLOAT_GEMMS:
            weight = len(node.input) > 1 and _weight_fed(node.input[1], initializers, producers)
            category = "weight GEMMs" if weight else "attention MatMuls"
        elif node.op_type == "Softmax":
            category = "Softmax"
        else:
            category = "other"
        result[node.name] = category
    return result


def _category_of(event_name: str, op: str, nodes: Mapping[str, str], prefixes: list[str]) -> str:
    name = event_name.removesuffix("_kernel_time")
    if name in nodes:
        category = nodes[name]
    else:
        match = next((p for p in prefixes if name.startswith(p)), None)
        category = nodes[match] if match else "other"
    if category == "other":  # fused or renamed by ORT: the op type decides
        if op in _QUANT_GEMMS:
            return "weight GEMMs"
        if op in _ACT_QUANT:
            return "activation quantization"
        if op == "Softmax":
            return "Softmax"
        if op in _FUSED_ATTENTION:  # the whole core, its Softmax included (exporter/passes/ort_fusion.py)
            return "attention MatMuls"
    return category


def breakdown(events: list[dict[str, Any]], nodes: Mapping[str, str], runs: int) -> dict[str, float]:
    """Milliseconds per run in each category, from a profile holding `runs` runs of the session."""
    prefixes = sorted(nodes, key=len, reverse=True)
    totals: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        totals[_category_of(event["name"], event["args"].get("op_name", ""), nodes, prefixes)] += event["dur"]
    out = {c: totals[c] / runs / 1e3 for c in CATEGORIES}
    out["total"] = sum(out.values())
    return out


def profile_session(path: Path, config: Mapping[str, str], feeds: Mapping[str, Any], runs: int = 3,
                    warmup: int = 1) -> dict[str, float]:
    """Profile the graph at `path`: `warmup` runs, then `runs` runs whose node events are broken down.

    ORT's profiler records from session creation, so the warm-up runs (first-run allocation, prepacking)
    are cut off by time: node events before the start of the first counted `model_run` are dropped.
    """
    import tempfile

    from exporter.onnx.torch_export import ort_session

    nodes = classify_graph(path)
    with tempfile.TemporaryDirectory(prefix="quadit-profile-") as tmp:
        session = ort_session(path, dict(config), profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(warmup + runs):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    if len(starts) != warmup + runs:
        raise RuntimeError(f"ORT profile of {path.name} holds {len(starts)} runs, expected {warmup + runs}")
    counted = [e for e in events if e.get("cat") == "Node" and e["ts"] >= starts[warmup]]
    out = breakdown(counted, nodes, runs)
    # the wall time of the same runs: kernel totals well above it mean the profile was disturbed
    walls = sorted(e["dur"] / 1e3 for e in events if e.get("name") == "model_run" and e["ts"] >= starts[warmup])
    out["profiled_step_ms"] = walls[len(walls) // 2]
    return out


def median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Of several profiles of one graph, the one with the median kernel total: one round disturbed by the
    machine (a shared host, another candidate's threads) then does not decide the breakdown."""
    ordered = sorted(rounds, key=lambda b: b["total"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": len(rounds)}


def amdahl(fp32: Mapping[str, float], quantized: Mapping[str, float]) -> dict[str, float]:
    """What the breakdowns say about a quantized graph against FP32.

    gemm_speedup: FP32 weight-GEMM time over the quantized graph's weight GEMMs plus the work quantization
    adds (activation Q/DQ, bucket scales, low-rank branch) -- the speedup the format delivers in situ.
    bound_at_this_speedup: the step ratio if everything else ran as fast as in FP32.
    bound_free_gemms: the step ratio if the weight GEMMs and the added work took no time at all.
    """
    added = quantized["weight GEMMs"] + quantized["activation quantization"] + quantized["low-rank branch"]
    rest = fp32["total"] - fp32["weight GEMMs"]
    speedup = fp32["weight GEMMs"] / added if added else float("inf")
    return {"gemm_fraction_fp32": fp32["weight GEMMs"] / fp32["total"], "gemm_speedup": speedup,
            "bound_at_this_speedup": (rest + added) / fp32["total"], "bound_free_gemms": rest / fp32["total"]}


def gemm_ceiling(m: int, k: int, n: int, runs: int = 10, threads: int = 0) -> dict[str, float]:
    """What ORT's INT8 GEMM can give at most on this CPU: one [m, k] x [k, n] MatMul in FP32 against the same
    MatMul as static INT8 Q/DQ (fused by ORT into MatMulIntegerToFloat, the kernel of a w8a8 static graph),
    median of `runs` after a warm-up. Without VNNI (AVX2 only) MLAS's u8/s8 kernels do about twice the
    multiply-adds per instruction of FP32 FMA, which bounds every w8a8 step ratio from below."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    scale = np.abs(weight).max(axis=0) / 127
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    fp32 = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32", [x_info], [y_info],
                             [numpy_helper.from_array(weight, "w")])
    int8 = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
         helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1),
         helper.make_node("MatMul", ["xd", "wd"], ["y"])], "int8", [x_info], [y_info],
        [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
         numpy_helper.from_array(np.round(weight / scale).astype(np.int8), "wq"),
         numpy_helper.from_array(scale.astype(np.float32), "ws")])
    x = rng.standard_normal((m, k)).astype(np.float32)
    medians = {}
    for name, graph in (("fp32_ms", fp32), ("int8_ms", int8)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times.append(1e3 * (time.perf_counter() - t0))
        medians[name] = float(np.median(times))
    return {"m": m, "k": k, "n": n, **medians, "speedup": medians["fp32_ms"] / medians["int8_ms"]}
