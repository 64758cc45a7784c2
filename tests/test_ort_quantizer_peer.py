"""ONNX Runtime's own quantizer as a comparison peer (engines/evaluation/ort_quantizer_baseline.py): it quantizes exactly
quadit's Linears, its activation Q/DQ sit on their inputs only, its calibration reader serves the recorded
feeds in strides, and what its defaults do is pinned (Entropy through quantize_static equals MinMax)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.evaluation.accuracy import sqnr_db
from engines.evaluation.compare import EXACT_QDQ
from engines.evaluation.ort_quantizer_baseline import (
    OrtQuantSettings,
    TrajectoryReader,
    calibration_stride,
    quantize,
    quantized_op_counts,
)
from exporter.errors import InputError
from exporter.models.layers import quantizable_linears
from exporter.onnx.torch_export import ort_session

SYM = (("ActivationSymmetric", True), ("WeightSymmetric", True), ("OpTypesToExcludeOutputQuantization", ("MatMul", "Gemm")))


def test_settings_are_validated_and_named():
    s = OrtQuantSettings("w8a8", "static", "Percentile", extra_options=SYM + (("CalibPercentile", 99.999),))
    assert s.label() == ("quantize_static QDQ per-channel W QInt8 A QInt8 Percentile ActivationSymmetric=True "
                         "WeightSymmetric=True OpTypesToExcludeOutputQuantization=MatMul,Gemm CalibPercentile=99.999")
    assert OrtQuantSettings("w4a16", "nbits").label() == \
        "MatMulNBitsQuantizer 4-bit block 128 asymmetric, accuracy_level 0"
    with pytest.raises(InputError, match="calibration method"):
        OrtQuantSettings(calibrate_method="KL")
    with pytest.raises(InputError, match="scheme w4a16, not w8a8"):
        OrtQuantSettings("w8a8", "nbits")
    with pytest.raises(InputError, match="QInt8 or QUInt8"):
        OrtQuantSettings(activation_type="QInt16")


def test_reader_serves_every_feed_once_per_stride():
    feeds = [{"x": np.full(1, i, np.float32)} for i in range(12)]
    reader = TrajectoryReader(feeds)
    assert [int(reader.get_next()["x"][0]) for _ in range(12)] == list(range(12)) and reader.get_next() is None
    reader.set_range(start_index=5, end_index=10)
    got = []
    while (f := reader.get_next()) is not None:
        got.append(int(f["x"][0]))
    assert got == [5, 6, 7, 8, 9]
    assert (calibration_stride(40), calibration_stride(12), calibration_stride(7), calibration_stride(3)) == (10, 6, 7, 3)


@pytest.fixture(scope="module")
def feeds(mini_run):
    """DiT inputs of one real sampler run (4 steps) and the FP32 graph's outputs on them."""
    run = mini_run("Wind chimes on a porch", steps=4, seconds=1.0)
    return run.feeds, run.outputs


def _activation_qdq_consumers(model: onnx.ModelProto) -> tuple[int, set[str]]:
    """(activation QuantizeLinear count, op types fed by their DequantizeLinear)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    fed = {u.op_type for n in q for dq in consumers[n.output[0]] for u in consumers[dq.output[0]]}
    return len(q), fed


def test_quantize_static_quantizes_the_same_linears_inputs_only(mini, mini_export, feeds, tmp_path):
    out, _ = mini_export
    layers = list(quantizable_linears(mini.dit))
    inputs, reference = feeds
    path = tmp_path / "ort.onnx"
    record = quantize(out / "dit.onnx", layers, OrtQuantSettings("w8a8", "static", "MinMax", extra_options=SYM), path,
                      inputs)
    model = onnx.load(str(path))
    assert record["nodes"] == len(layers) == 42 and record["calibration_feeds"] == 4
    assert record["extra_options"]["CalibStridedMinMax"] == 4
    count, fed = _activation_qdq_consumers(model)
    # one Q per distinct Linear input (the three cross-attention to_kv share the text tokens, ...), none on outputs
    from exporter.onnx.linear_nodes import locate_linears

    distinct = len({site.activation for site in locate_linears(onnx.load(str(out / "dit.onnx")), layers).values()})
    assert fed == {"MatMul"} and count == distinct and quantized_op_counts(model)["DequantizeLinear"] == count + 42
    exact = ort_session(path, EXACT_QDQ)
    fused = ort_session(path)
    s_exact = np.mean([sqnr_db(r, exact.run(None, f)[0]) for f, r in zip(inputs, reference)])
    s_fused = np.mean([sqnr_db(r, fused.run(None, f)[0]) for f, r in zip(inputs, reference)])
    # no smoothing: the activation outliers leave it a few dB (quadit's minmax is at the same level)
    assert 0.0 < s_exact < 10.0 and abs(s_fused - s_exact) < 1.0, (s_exact, s_fused)


@pytest.mark.slow
def test_entropy_through_quantize_static_equals_minmax_and_nbits_takes_only_the_linears(mini, mini_export, feeds,
                                                                                        tmp_path):
    """quantize_static gives EntropyCalibrater no way to set its bins: 128 bins for 128 quantized bins leave one
    candidate threshold, the full range, so Entropy's scales are MinMax's (pinned: a later onnxruntime that
    changes it should change the comparison's reading). MatMulNBitsQuantizer's nodes_to_include adds to its op
    types; the other MatMuls must be excluded by name."""
    out, _ = mini_export
    layers = list(quantizable_linears(mini.dit))
    inputs, _ = feeds

    def scales(path):
        model = onnx.load(str(path))
        init = {i.name: i for i in model.graph.initializer}
        return {n.input[0]: float(numpy_helper.to_array(init[n.input[1]]))
                for n in model.graph.node if n.op_type == "QuantizeLinear"}

    for method in ("MinMax", "Entropy", "Percentile"):
        quantize(out / "dit.onnx", layers, OrtQuantSettings("w8a8", "static", method, extra_options=SYM),
                 tmp_path / f"{method}.onnx", inputs)
    minmax, entropy, percentile = (scales(tmp_path / f"{m}.onnx") for m in ("MinMax", "Entropy", "Percentile"))
    assert entropy == minmax and percentile != minmax
    assert all(percentile[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    quantize(out / "dit.onnx", layers, OrtQuantSettings("w4a16", "nbits"), tmp_path / "nbits.onnx")
    assert quantized_op_counts(onnx.load(str(tmp_path / "nbits.onnx"))) == {"MatMulNBits": 42}
    quantize(out / "dit.onnx", layers, OrtQuantSettings("w8a8", "dynamic", extra_options=(("MatMulConstBOnly", True),)),
             tmp_path / "dynamic.onnx")
    assert quantized_op_counts(onnx.load(str(tmp_path / "dynamic.onnx")))["MatMulInteger"] == 42
