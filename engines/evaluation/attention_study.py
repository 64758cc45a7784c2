"""Which attention core the ONNX Runtime target should carry, by measurement: speed of the core alone and
accuracy of the whole quantized DiT with it.

Speed: the attention core at the model's shapes (CFG batch 2, heads, head size, latent length + 1 tokens)
as one small graph per form, stepped round-robin in one process: the plain ops of the export (Q·Kᵀ,
Softmax, ·V), com.microsoft MultiHeadAttention (3-D inputs: MLAS's flash path), ONNX Attention-23, and
INT8 forms of the plain core (static Q/DQ on Q and Kᵀ, on all four MatMul inputs, dynamic on Q and Kᵀ).
Accuracy (with --calibration): step SQNR and final-latent SNR against FP32 on held-out prompts
(engines/evaluation/accuracy.py) of the same w8a8 graph unfused and with each fused form. Writes attention.json/.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from engines.runtime.logs import setup_logging
from exporter.models.cli_args import model_spec

log = logging.getLogger("attention_study")


def core_graphs(heads: int, head_dim: int, tokens: int, batch: int = 2) -> dict[str, tuple[bytes, str]]:
    """name -> (serialized model, input layout 'bhsd' or 'bsd') of each attention-core form."""
    import numpy as np
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    f, hd, root = TensorProto.FLOAT, heads * head_dim, float(head_dim) ** -0.25

    def const(name, value, dtype=np.float32):
        return nh.from_array(np.array(value, dtype), name)

    def model(nodes, layout, inits, opset=21, ms=False):
        shape = [batch, heads, tokens, head_dim] if layout == "bhsd" else [batch, tokens, hd]
        graph = h.make_graph(nodes, "core", [h.make_tensor_value_info(n, f, shape) for n in "qkv"],
                             [h.make_tensor_value_info("y", f, None)], inits)
        ops = [h.make_opsetid("", opset)] + ([h.make_opsetid("com.microsoft", 1)] if ms else [])
        return h.make_model(graph, opset_imports=ops, ir_version=10).SerializeToString(), layout

    def qdq(x, scale, zero):
        return [h.make_node("QuantizeLinear", [x, scale, zero], [x + "_q"]),
                h.make_node("DequantizeLinear", [x + "_q", scale, zero], [x + "_d"])]

    head = [h.make_node("Mul", ["q", "a"], ["qa"]), h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            h.make_node("Mul", ["kt", "a"], ["kta"])]
    tail = [h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), h.make_node("Reshape", ["ot", "shape"], ["y"])]
    base = [const("a", root), const("shape", [0, 0, hd], np.int64)]
    scales = [const("sq", 0.03), const("sk", 0.03), const("z8", 0, np.int8), const("sp", 1 / 255),
              const("zu8", 0, np.uint8), const("sv", 0.03)]
    softmax_pv = [h.make_node("Softmax", ["s"], ["p"], axis=-1), h.make_node("MatMul", ["p", "v"], ["o"])]
    return {
        "plain ops (as exported)": model(head + [h.make_node("MatMul", ["qa", "kta"], ["s"])] + softmax_pv + tail,
                                         "bhsd", base),
        "com.microsoft MultiHeadAttention": model([h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"],
                                                                domain="com.microsoft", num_heads=heads,
                                                                scale=root * root)], "bsd", [], ms=True),
        "ONNX Attention-23": model([h.make_node("Attention", ["q", "k", "v"], ["o"], scale=root * root)] + tail,
                                   "bhsd", base[1:], opset=23),
        "INT8 static Q·Kᵀ": model(head + qdq("qa", "sq", "z8") + qdq("kta", "sk", "z8")
                                  + [h.make_node("MatMul", ["qa_d", "kta_d"], ["s"])] + softmax_pv + tail,
                                  "bhsd", base + scales),
        "INT8 static Q·Kᵀ and P·V": model(head + qdq("qa", "sq", "z8") + qdq("kta", "sk", "z8")
                                          + [h.make_node("MatMul", ["qa_d", "kta_d"], ["s"]),
                                             h.make_node("Softmax", ["s"], ["p"], axis=-1)]
                                          + qdq("p", "sp", "zu8") + qdq("v", "sv", "z8")
                                          + [h.make_node("MatMul", ["p_d", "v_d"], ["o"])] + tail, "bhsd", base + scales),
        "INT8 dynamic Q·Kᵀ": model(head + [h.make_node("DynamicQuantizeLinear", [x], [x + "_q", x + "_s", x + "_z"])
                                           for x in ("qa", "kta")]
                                   + [h.make_node("MatMulInteger", ["qa_q", "kta_q", "qa_z", "kta_z"], ["si"]),
                                      h.make_node("Cast", ["si"], ["sf"], to=f),
                                      h.make_node("Mul", ["qa_s", "kta_s"], ["ss"]),
                                      h.make_node("Mul", ["sf", "ss"], ["s"])] + softmax_pv + tail, "bhsd", base),
    }


def time_cores(heads: int, head_dim: int, tokens: int, runs: int) -> list[dict]:
    """Median ms of each core form, round-robin; relative error against the plain core on random inputs
    (the INT8 forms' scales are fixed guesses: their error here says nothing about calibrated accuracy)."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, heads, tokens, head_dim)).astype(np.float32) for _ in range(3))
    as_bsd = {n: x.transpose(0, 2, 1, 3).reshape(2, tokens, heads * head_dim) for n, x in zip("qkv", (q, k, v))}
    sessions = {}
    for name, (blob, layout) in core_graphs(heads, head_dim, tokens).items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        feeds = as_bsd if layout == "bsd" else {"q": q, "k": k, "v": v}
        sessions[name] = (ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]), feeds)
    ref = next(iter(sessions.values()))
    ref_out = ref[0].run(None, ref[1])[0]
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for r in range(runs + 1):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            s, feeds = sessions[name]
            t0 = time.perf_counter()
            s.run(None, feeds)
            if r:
                times[name].append(1e3 * (time.perf_counter() - t0))
    base = float(np.median(times[names[0]]))
    return [{"form": n, "median_ms": float(np.median(times[n])), "vs_plain": float(np.median(times[n])) / base,
             "rel_error_vs_plain": float(np.abs(sessions[n][0].run(None, sessions[n][1])[0] - ref_out).max()
                                         / np.abs(ref_out).max())} for n in names]


def accuracy_rows(args, loaded, workdir: Path) -> list[dict]:
    """Step SQNR / final-latent SNR vs FP32 of the w8a8 static graph, unfused and with each fused form."""
    from engines.evaluation.accuracy import AccuracySettings, capture, evaluate, heldout_prompts
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline
    from engines.runtime.providers import session
    from exporter.models.layers import quantizable_linears
    from exporter.onnx import graph_edit
    from exporter.onnx.torch_export import PROTOBUF_LIMIT
    from exporter.passes.ort_fusion import fuse_attention
    from exporter.passes.recipe import Recipe
    from exporter.stages.export import ExportOptions, export_model
    from exporter.stages.quantized import quantize_graph, read_calibration

    calibration = read_calibration(Path(args.calibration), loaded)
    manifest = export_model(loaded, workdir / "fp32", ExportOptions(scheme="fp32"))
    fp32 = workdir / "fp32" / manifest["graphs"]["dit"]["file"]
    settings = AccuracySettings(prompts=args.prompts, steps=args.steps, seconds=args.seconds)
    pipeline = Pipeline(OrtBackend(workdir / "fp32", manifest), manifest)
    reference = session(fp32)
    prompts = heldout_prompts(calibration.meta["prompts"]["list"], settings.prompts, settings.heldout_seed)
    trajectories = capture(pipeline, reference, prompts, settings)
    recipe = Recipe(scheme="w8a8", method="timestep-smoothquant", activations="static", bucket_policy=args.bucket_policy)
    rows = []
    for form in ("none", "mha", "attention23"):
        model, _ = quantize_graph(fp32, list(quantizable_linears(loaded.dit)), calibration, recipe)
        if form != "none":
            model, _ = fuse_attention(model, form)
        path = workdir / f"dit.w8a8.{form}.onnx"
        graph_edit.save(model, path, PROTOBUF_LIMIT)
        del model
        row = evaluate(f"w8a8 static ({args.bucket_policy}), attention {form}", session(path, int8=True), reference,
                       trajectories, calibration.edges, pipeline, settings)
        rows.append({"attention": form, **row})
        log.info("%s: step SQNR %.2f dB, final-latent SNR %.2f dB", row["name"], row["mean_step_sqnr_db"],
                 row["final_latent_snr_db"])
    return rows


def execute(args: argparse.Namespace) -> int:
    """`quadit attention-study` after argument parsing (the parser: `engines.cli.attention_study`)."""
    setup_logging()

    import shutil
    import tempfile

    from exporter.errors import InputError
    from exporter.models import load_model
    from exporter.onnx.artifacts import atomic_dir

    try:
        lengths = [int(v) for v in args.lengths.split(",")]
    except ValueError:
        raise InputError(f"--lengths {args.lengths!r} is not a comma-separated list of latent lengths") from None
    if min(lengths) < 1 or args.runs < 1:
        raise InputError("need latent lengths >= 1 and --runs >= 1")
    if args.calibration:
        loaded = load_model(model_spec(args))
        config, identity = loaded.config, loaded.identity
    else:  # the core timing needs only the shapes: the preset's config, no weights built
        from exporter.models.presets import preset_config

        config, identity = preset_config(args.model or "sao-mini"), {"model": args.model or "sao-mini"}
    cfg = config["model"]["diffusion"]["config"]
    heads, head_dim = int(cfg["num_heads"]), int(cfg["embed_dim"]) // int(cfg["num_heads"])
    load = os.getloadavg()
    cores = [{"length": n, "tokens": n + 1, **row} for n in lengths for row in time_cores(heads, head_dim, n + 1, args.runs)]
    accuracy = []
    if args.calibration:
        workdir = Path(tempfile.mkdtemp(prefix="quadit-attention-"))
        try:
            accuracy = accuracy_rows(args, loaded, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = {"model": identity, "heads": heads, "head_dim": head_dim, "batch": 2, "runs": args.runs,
           "cores": os.cpu_count(), "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
           "core_timings": cores, "accuracy": accuracy}
    lines = [f"Attention core alone, CFG batch 2, {heads} heads of {head_dim}, {os.cpu_count()} cores, load average "
             f"{load[0]:.1f} at start; median of {args.runs} round-robin rounds", "",
             "| latent length | form | median ms | vs plain ops | rel. error vs plain (random inputs) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['form']} | {r['median_ms']:.2f} | {r['vs_plain']:.3f}x | {r['rel_error_vs_plain']:.1e} |"
              for r in cores]
    if accuracy:
        lines += ["", f"Accuracy against FP32 ({args.prompts} held-out prompts x {args.steps} steps, {args.seconds} s):", "",
                  "| graph | mean step SQNR dB | min step SQNR dB | final-latent SNR dB |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['mean_step_sqnr_db']:.2f} | {r['min_step_sqnr_db']:.2f} | "
                  f"{r['final_latent_snr_db']:.2f} |" for r in accuracy]
    with atomic_dir(Path(args.out)) as tmp:
        (tmp / "attention.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (tmp / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
