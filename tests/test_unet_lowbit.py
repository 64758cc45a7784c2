"""Low-bit UNet passes on small real graphs: tap-major im2col order, the exact Conv2d low-rank split, INT4 Conv2d
weights on ONNX Runtime, GPTQ on E[p p^T] beating round-to-nearest, TensorRT's plan limits, the residual-Add
Q/DQ and the auto-precision budget (exporter/passes/conv_lowbit.py, residual_qdq.py,
engines/calibrate/unet_moments.py, engines/evaluation/unet_sensitivity.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.calibrate.unet_moments import SecondMoments, patches
from exporter.onnx.linear_nodes import SCOPES_KEY
from exporter.passes.conv_lowbit import LayerPlan, from_kn, plan_layers, quantize_unet_mixed, weight_kn
from exporter.passes.conv_quant import locate_sites, quantize_unet
from exporter.passes.gptq import WeightQuant, output_error, quantize_weight
from exporter.passes.lowrank import svd_split
from exporter.passes.qdq import dequantize

RNG = np.random.default_rng(0)


def _conv_model(o: int = 32, i: int = 64, k: int = 3, residual: bool = False, ftype=np.float32) -> onnx.ModelProto:
    """x -> Conv (scoped as layer `blk.conv2`) [-> + x2] -> y, the exporter's name-scope metadata on the node."""
    elem = TensorProto.FLOAT16 if ftype == np.float16 else TensorProto.FLOAT
    w = (RNG.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(ftype)
    w[:, :2] *= 8  # two outlier input channels
    b = RNG.standard_normal(o).astype(ftype) * 0.1
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[k // 2] * 4)
    conv.metadata_props.add(key=SCOPES_KEY, value="['', 'unet.blk.conv2', 'conv2d']")
    nodes, inputs = [conv], [helper.make_tensor_value_info("x", elem, [1, i, 8, 8])]
    out = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"], name="add"))
        inputs.append(helper.make_tensor_value_info("r", elem, [1, o, 8, 8]))
        out = "y"
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(out, elem, [1, o, 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _snr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - x).astype(np.float64) ** 2)))


def test_tap_major_patches_make_conv_a_matmul():
    conv = torch.nn.Conv2d(16, 8, 3, padding=1, bias=False).double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    site = SimpleNamespace(op_type="Conv", k_axis=1)
    w_kn = torch.from_numpy(weight_kn(conv.weight.detach().numpy(), site))
    y = (patches(conv, x) @ w_kn).reshape(2, 6, 5, 8).permute(0, 3, 1, 2)
    assert torch.allclose(y, conv(x), atol=1e-12)
    assert np.array_equal(from_kn(w_kn.numpy(), site, conv.weight.shape), conv.weight.detach().numpy())


def test_conv_lowrank_split_is_exact_and_int4_runs_on_onnxruntime():
    model = _conv_model()
    x = RNG.standard_normal((1, 64, 8, 8)).astype(np.float32)
    ref = _run(model, {"x": x})
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    site = SimpleNamespace(op_type="Conv", k_axis=1)
    l1, l2, resid = svd_split(weight_kn(w, site), 16)
    assert np.abs(l1 @ l2 + resid - weight_kn(w, site)).max() < 1e-12  # the split itself is exact
    sites = locate_sites(model, ["blk.conv2"])
    cm = np.abs(x).max(axis=(0, 2, 3))[None, :]
    snr = {}
    for rank in (0, 16):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        rec = quantize_unet_mixed(m, locate_sites(m, ["blk.conv2"]), {"blk.conv2": LayerPlan("w4a16", rank, 32)},
                                  {"blk.conv2": cm}, [1000.0, 0.0])
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
        assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1, "block_size": 32}
        assert rec["blk.conv2"]["scheme"] == "w4a16" and sites["blk.conv2"].op_type == "Conv"
        snr[rank] = _snr(ref, _run(m, {"x": x}))
    assert snr[0] > 15.0  # INT4, blocks of 32 input channels per tap
    assert snr[16] > snr[0] + 1.0  # the branch takes the outlier channels' directions out of the residual


def test_gptq_on_im2col_moments_beats_nearest_for_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 3, padding=1)
    # spatially smooth inputs (neighbouring taps correlated, as in a UNet's feature maps) with outlier channels
    x = torch.nn.functional.avg_pool2d(torch.randn(4, 32, 14, 14), 3, 1)
    x[:, :3] *= 10
    with SecondMoments({"c": conv}, max_rows=10_000) as mom:
        conv(x)
    h = mom.result()["c"]
    assert h.shape == (288, 288)
    w_kn = weight_kn(conv.weight.detach().numpy(), SimpleNamespace(op_type="Conv", k_axis=1))
    err = {}
    for rounding in ("nearest", "gptq"):
        q, s = quantize_weight(w_kn, 4, 32, np.float32, WeightQuant(rounding), h)
        err[rounding] = output_error(w_kn, dequantize(q, s), h)
    assert err["gptq"] < 0.5 * err["nearest"]  # measured 0.41x


def test_w8a8_through_the_mixed_pass_matches_conv_quant():
    model = _conv_model()
    model.graph.input.append(helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]))
    x = RNG.standard_normal((1, 64, 8, 8)).astype(np.float32)
    cm = np.stack([np.abs(x).max(axis=(0, 2, 3)), 0.5 * np.abs(x).max(axis=(0, 2, 3))])
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(model)
    b.CopyFrom(model)
    quantize_unet(a, locate_sites(a, ["blk.conv2"]), {"blk.conv2": cm}, [1000.0, 500.0, 0.0])
    quantize_unet_mixed(b, locate_sites(b, ["blk.conv2"]), {"blk.conv2": LayerPlan("w8a8")}, {"blk.conv2": cm},
                        [1000.0, 500.0, 0.0])
    for t in (100.0, 900.0):
        feeds = {"x": x, "timestep": np.array([t], np.float32)}
        assert np.abs(_run(a, feeds) - _run(b, feeds)).max() < 1e-5


def test_tensorrt_plan_keeps_int4_convs_fp16_and_refuses_w4a8():
    model = _conv_model(ftype=np.float16)
    sites = locate_sites(model, ["blk.conv2"])
    plans, notes = plan_layers(model, sites, {"blk.conv2": LayerPlan("w4a16", 0, 64)}, "tensorrt")
    assert plans["blk.conv2"].scheme == "float" and "GEMM-only" in notes[0]
    with pytest.raises(ValueError, match="TensorRT-LLM"):
        plan_layers(model, sites, {"blk.conv2": LayerPlan("w4a8")}, "tensorrt")
    plans, _ = plan_layers(model, sites, {"blk.conv2": LayerPlan("w4a16", 0, 128)}, "onnxruntime")
    assert plans["blk.conv2"].block == 64  # the largest allowed block that divides I = 64


def test_residual_qdq_is_placed_and_passes_the_checker():
    from exporter.passes.residual_qdq import place_residual_qdq, residual_adds
    from exporter.tensorrt.checker import check_graph

    model = _conv_model(residual=True, ftype=np.float16)
    x = RNG.standard_normal((1, 64, 8, 8)).astype(np.float16)
    r = RNG.standard_normal((1, 32, 8, 8)).astype(np.float16)
    cm = np.abs(x.astype(np.float32)).max(axis=(0, 2, 3))[None, :]
    quantize_unet(model, locate_sites(model, ["blk.conv2"]), {"blk.conv2": cm}, [1000.0, 0.0])
    before = _run(model, {"x": x, "r": r})
    adds = residual_adds(model)
    assert [(a["add"], a["residual"]) for a in adds] == [("add", "r")]
    rec = place_residual_qdq(model, {"r": float(np.abs(r).max())})
    assert rec["adds"] == 1 and rec["adds_feeding_a_quantizer"] == 0  # y is a graph output, not a quantizer's input
    add = next(n for n in model.graph.node if n.name == "add")
    assert add.input[0].endswith(".act.dq")
    assert check_graph(model) == []
    after = _run(model, {"x": x, "r": r})
    assert 25.0 < _snr(before.astype(np.float32), after.astype(np.float32)) < 60.0  # INT8 rounding of r, measured
    assert residual_adds(model) == []  # idempotent: the residual is quantized now
    from exporter.tensorrt.residual_rules import residual_adds as read_residual

    assert read_residual(model) == (1, [])  # the precision map's fused Conv + INT8-residual Add
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[1] = "w"  # the Conv is no longer quantized: nothing fuses the Add, the Q/DQ is a bare reformat
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((32, 64, 3, 3), np.float16), "w"))
    assert [v.rule for v in check_graph(model)] == ["Q/DQ on both inputs", "residual Q/DQ"]


def test_auto_precision_meets_the_budget():
    from engines.evaluation.auto_precision import choose
    from engines.evaluation.unet_sensitivity import layer_costs

    model = _conv_model()
    sites = locate_sites(model, ["blk.conv2"])
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(2, 64, 8, 8)
    with SecondMoments({"blk.conv2": conv}) as mom:
        conv(x)
    options = SimpleNamespace(target="onnxruntime", alpha=0.5, method="timestep-smoothquant", block_size=32,
                              weight_rounding="nearest")
    rows = layer_costs(model, sites, {"blk.conv2": np.abs(x.numpy()).max(axis=(0, 2, 3))[None, :]},
                       mom.result(), options)
    costs = rows[0]["schemes"]
    assert costs["w4a16"]["step_nsr"] > costs["w8a8"]["step_nsr"] > 0
    assert costs["w4a16+r16"]["step_nsr"] < costs["w4a16"]["step_nsr"]
    fp32 = 64 * 32 * 9 * 4
    doc = {"layers": rows, "schemes": list(costs), "base_weight_bytes": fp32 + 128, "fp32_weight_bytes": fp32 + 128}
    assert choose(doc, 0.3, "step_nsr", list(costs)).assignment["blk.conv2"] == "w8a8"
    small = choose(doc, 0.2, "step_nsr", list(costs))
    assert small.assignment["blk.conv2"].startswith("w4") and small.size_ratio <= 0.2


@pytest.mark.slow
def test_cli_w4a16_lowrank_gptq_export(tmp_path):
    """`quadit export --scheme w4a16 --lowrank 16 --weight-rounding gptq` on audioldm-mini end to end, small
    settings (2 calibration prompts x 4 steps, 1 held-out prompt x 4 steps): measured 26.28 / 20.20 / 19.68 dB
    step SQNR / final-latent SNR / audio SNR at 0.308x of the FP32 UNet's bytes (7.5 min on a loaded 2-core host)."""
    import json

    from conftest import run_script

    out = tmp_path / "ald4"
    proc = run_script("export.py", "--model", "audioldm-mini", "--synthetic-weights", "--scheme", "w4a16",
                      "--lowrank", "16", "--weight-rounding", "gptq", "--calib-prompts", "2", "--calib-steps", "4",
                      "--report-prompts", "1", "--report-steps", "4", "--no-modelopt", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["report.step_sqnr_db"] > 20 and summary["report.latent_snr_db"] > 15
    assert 0.2 < summary["unet_size_ratio"] < 0.4
    quant = json.loads((out / "manifest.json").read_text())["graphs"]["unet"]["quantization"]
    assert quant["precisions"] == {"w4a16+r16": 117}
    conv = quant["per_layer"]["down_blocks.1.resnets.0.conv2"]
    assert conv["weight_rounding"] == "gptq" and conv["block_size"] == 64 and conv["output_nsr"] < 0.05
