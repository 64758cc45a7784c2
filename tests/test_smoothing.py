"""Smoothing as a graph pass: the smoothed FP32 graph equals the original to FP32 rounding."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporter.models.layers import quantizable_linears
from exporter.onnx.linear_nodes import locate_linears
from exporter.onnx.torch_export import ort_session
from exporter.passes.smoothing import apply_smoothing, smoothing_factors


def _smoothed_mini(mini, mini_export, alpha: float, seed: int):
    """The sao-mini FP32 export smoothed with seeded activation ranges: (model, record, rng, export dir)."""
    out, _ = mini_export
    model = onnx.load(str(out / "dit.onnx"))
    layers = quantizable_linears(mini.dit)
    sites = locate_linears(model, list(layers))
    rng = np.random.default_rng(seed)
    act = {n: rng.uniform(0.1, 100.0, m.in_features) for n, m in layers.items()}
    smoothed, record = apply_smoothing(model, sites, act, alpha)
    return smoothed, record, rng, out


def _feeds(rng: np.random.Generator, t: list[float]) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((2, 64, 50)).astype(np.float32), "t": np.array(t, np.float32),
            "cross_attn_cond": rng.standard_normal((2, 66, 256)).astype(np.float32),
            "global_embed": rng.standard_normal((2, 512)).astype(np.float32)}


def test_factors_follow_the_smoothquant_formula():
    s = smoothing_factors(np.array([100.0, 1.0, 0.0]), np.array([0.01, 1.0, 2.0]), alpha=0.5)
    np.testing.assert_allclose(s, [100.0, 1.0, 1.0], rtol=1e-6)
    assert smoothing_factors(np.array([8.0]), np.array([2.0]), alpha=1.0)[0] == pytest.approx(8.0)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothed_graph_equals_original(mini, mini_export, tmp_path, alpha):
    smoothed, record, rng, out = _smoothed_mini(mini, mini_export, alpha, seed=0)
    onnx.checker.check_model(smoothed)
    assert set(record) == set(quantizable_linears(mini.dit))
    hows = {n.rsplit(".", 1)[-1] if "proj" not in n else "proj": r["how"] for n, r in record.items()}
    assert hows["to_qkv"] == hows["to_q"] == hows["proj"] == "folded into LayerNorm"
    assert hows["to_out"] == hows["to_kv"] == "explicit Mul"
    path = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    feeds = _feeds(rng, [0.9, 0.3])
    ref = ort_session(out / "dit.onnx").run(None, feeds)[0]
    got = ort_session(path).run(None, feeds)[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-5
    # the activation ranges the quantizer sees shrink
    assert all(r["act_range_after"] < r["act_range_before"] for r in record.values())


def test_fold_moves_explicit_muls_into_the_producing_linears_exactly(mini, mini_export, tmp_path):
    """After smoothing, the Muls in front of `to_out` (attention value), `ff.ff.2` (GLU value half) and the
    shared cross-attention context (`to_kv`) go into the columns of the Linear that made their input; the
    graph computes the same to FP32 rounding. Cross-attention `to_out` stays a Mul: sao-mini's cross
    attention repeats K/V heads, so one V channel feeds several output channels."""
    from collections import Counter

    from exporter.passes.scale_fold import fold_smoothing_muls

    smoothed, _, rng, out = _smoothed_mini(mini, mini_export, 0.5, seed=3)
    onnx.save(smoothed, str(tmp_path / "explicit.onnx"))
    muls_before = sum(n.op_type == "Mul" for n in smoothed.graph.node)
    folded = fold_smoothing_muls(smoothed)
    onnx.checker.check_model(smoothed)
    kinds = Counter(v.rsplit("(", 1)[-1].rstrip(")") for v in folded.values())
    blocks = len(mini.dit.transformer.layers)
    assert kinds == {"attention value": blocks, "GLU value": blocks, "linear": 1}, kinds
    assert sum(n.op_type == "Mul" for n in smoothed.graph.node) == muls_before - (2 * blocks + 1)
    left = [n.name for n in smoothed.graph.node if n.name.endswith("__smooth_mul")]
    assert len(left) == blocks  # one per cross-attention to_out
    onnx.save(smoothed, str(tmp_path / "folded.onnx"))
    feeds = _feeds(rng, [0.7, 0.2])
    ref = ort_session(out / "dit.onnx").run(None, feeds)[0]
    explicit = ort_session(tmp_path / "explicit.onnx").run(None, feeds)[0]
    got = ort_session(tmp_path / "folded.onnx").run(None, feeds)[0]
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < 2e-5 and np.abs(got - explicit).max() / scale < 2e-5


@pytest.mark.parametrize("bits,block,rounding,clip", [(8, None, "nearest", "absmax"), (8, None, "gptq", "mse"),
                                                      (4, 64, "gptq", "mse")])
def test_scaling_output_columns_keeps_the_weight_codes(bits, block, rounding, clip):
    """Why the fold leaves the quantizer's choice alone: per-column (INT8) and per-(block, column) (INT4)
    scales scale with the column, and GPTQ's H is input-side, so the codes stay (up to FP32 scale rounding
    at exact ties)."""
    from exporter.passes.gptq import WeightQuant, quantize_weight

    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 96)) * rng.uniform(0.1, 3.0, 96)
    x = rng.standard_normal((1024, 256)) * rng.uniform(0.2, 5.0, 256)
    hessian = x.T @ x / len(x)
    c = rng.uniform(0.05, 20.0, 96)
    how = WeightQuant(rounding, clip)
    q0, s0 = quantize_weight(w, bits, block, how=how, hessian=hessian)
    q1, s1 = quantize_weight(w * c, bits, block, how=how, hessian=hessian)
    assert (q0 == q1).mean() >= 0.999
    np.testing.assert_allclose(np.asarray(s1, np.float64) / np.asarray(s0, np.float64), np.broadcast_to(c, s0.shape),
                               rtol=1e-6)
