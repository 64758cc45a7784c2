"""Smoothing as a graph pass: the smoothed FP32 graph equals the original to FP32 rounding."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporter.layers import quantizable_linears
from exporter.onnx_export import ort_session
from exporter.onnx_layers import locate_linears
from exporter.smoothing import apply_smoothing, smoothing_factors


def test_factors_follow_the_smoothquant_formula():
    s = smoothing_factors(np.array([100.0, 1.0, 0.0]), np.array([0.01, 1.0, 2.0]), alpha=0.5)
    np.testing.assert_allclose(s, [100.0, 1.0, 1.0], rtol=1e-6)
    assert smoothing_factors(np.array([8.0]), np.array([2.0]), alpha=1.0)[0] == pytest.approx(8.0)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothed_graph_equals_original(mini, mini_export, tmp_path, alpha):
    out, _ = mini_export
    model = onnx.load(str(out / "dit.onnx"))
    layers = quantizable_linears(mini.dit)
    sites = locate_linears(model, list(layers))
    rng = np.random.default_rng(0)
    act = {n: rng.uniform(0.1, 100.0, m.in_features) for n, m in layers.items()}
    smoothed, record = apply_smoothing(model, sites, act, alpha)
    onnx.checker.check_model(smoothed)
    assert set(record) == set(layers)
    hows = {n.rsplit(".", 1)[-1] if "proj" not in n else "proj": r["how"] for n, r in record.items()}
    assert hows["to_qkv"] == hows["to_q"] == hows["proj"] == "folded into LayerNorm"
    assert hows["to_out"] == hows["to_kv"] == "explicit Mul"
    path = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    feeds = {"x": rng.standard_normal((2, 64, 50)).astype(np.float32), "t": np.array([0.9, 0.3], np.float32),
             "cross_attn_cond": rng.standard_normal((2, 66, 256)).astype(np.float32),
             "global_embed": rng.standard_normal((2, 512)).astype(np.float32)}
    ref = ort_session(out / "dit.onnx").run(None, feeds)[0]
    got = ort_session(path).run(None, feeds)[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-5
    # the activation ranges the quantizer sees shrink
    assert all(r["act_range_after"] < r["act_range_before"] for r in record.values())
