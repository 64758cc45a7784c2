"""NVFP4 (issue 22): the arithmetic against ONNX's reference operators, TensorRT's graph form against its
ONNX Runtime emulation, and the nvfp4 scheme on sao-mini through the checker, precision map and accuracy."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import sqnr_vs_reference
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from exporter.onnx import fp4_emulation
from exporter.passes import nvfp4, nvfp4_nodes


def _reference_fp4(x: np.ndarray, scale: np.ndarray, axis: int = -1, block: int = 0) -> np.ndarray:
    """ONNX's reference QuantizeLinear -> DequantizeLinear to FLOAT4E2M1 (opset 23)."""
    zp = helper.make_tensor("zp", TensorProto.FLOAT4E2M1, [], [0.0])
    attrs = {"axis": axis, "block_size": block} if block else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "fp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
                                             helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], [zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return ReferenceEvaluator(model).run(None, {"x": x.astype(np.float32), "s": scale.astype(np.float32)})[0]


def test_e2m1_rounding_equals_onnx_reference():
    # every E2M1 midpoint (ties to even), both signs, saturation and values between
    grid = np.concatenate([nvfp4.E2M1, (nvfp4.E2M1[1:] + nvfp4.E2M1[:-1]) / 2, np.linspace(0, 9, 301)])
    x = np.concatenate([grid, -grid]).astype(np.float32)
    ours = nvfp4.fp4_values(nvfp4.to_fp4(x))
    np.testing.assert_array_equal(ours, _reference_fp4(x, np.array(1.0, np.float32)))


def test_block_quantization_equals_onnx_reference_and_error_is_fp4_sized():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 64)) * np.exp(rng.standard_normal((8, 1)))).astype(np.float32)
    g = nvfp4.global_scale(float(np.abs(x).max()))
    codes, sf8 = nvfp4.quantize(x, g)
    step = sf8.astype(np.float32) * np.float32(g)
    np.testing.assert_array_equal(nvfp4.dequantize(codes, sf8, g), _reference_fp4(x, step, axis=1, block=16))
    # the largest block's scale is E4M3's 448 and every block's amax maps into (3, 6]
    assert float(sf8.astype(np.float32).max()) == 448.0
    err = np.linalg.norm(x - nvfp4.fake_quantize(x)) / np.linalg.norm(x)
    assert 0.03 < err < 0.15, err   # 4-bit floats with 16-blocks: ~8% relative error on Gaussian rows


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the reference evaluator matches the class name to the op)
    """TensorRT's `TRT_FP4DynamicQuantize` for ONNX's reference evaluator, from the documented arithmetic."""

    op_domain = "trt"

    def _run(self, x, g, axis=-1, block_size=16, scale_type=17):
        import ml_dtypes

        codes, sf8 = nvfp4.quantize(np.asarray(x, np.float32), float(g))
        fp4 = codes.view(ml_dtypes.float4_e2m1fn) if hasattr(ml_dtypes, "float4_e2m1fn") else codes
        return fp4, sf8


def _tiny_nvfp4_graph(k: int = 48, n: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)) * 0.2
    model = helper.make_model(helper.make_graph(
        [], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 5, n])]),
        opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    nvfp4_nodes.prepare(model)
    xq = nvfp4_nodes.activation(model, "x", float(nvfp4.global_scale(3.0)))
    wq, _ = nvfp4_nodes.weight(model, "layer", w)
    model.graph.node.append(helper.make_node("MatMul", [xq, wq], ["y"], name="layer.matmul"))
    return model, w


def test_trt_form_and_its_onnx_runtime_emulation_agree():
    import onnxruntime as ort

    model, w = _tiny_nvfp4_graph()
    onnx.checker.check_model(model)
    x = (np.random.default_rng(2).standard_normal((2, 5, 48)) * 1.5).astype(np.float16)
    # the deployed form, in ONNX's reference evaluator (its own FLOAT4E2M1 / FP8 DequantizeLinear) with
    # TensorRT's quantizer as documented
    ref = ReferenceEvaluator(model, new_ops=[TRT_FP4DynamicQuantize]).run(None, {"x": x})[0]
    emulated = fp4_emulation.emulate(model)
    got = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)
    # and both are an NVFP4 x NVFP4 product of the float model, ~12% apart from it
    exact = x.astype(np.float64) @ w
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 0.03 < rel < 0.25, rel


def test_nvfp4_is_tensorrt_only_and_static():
    from exporter.errors import InputError
    from exporter.passes.recipe import Recipe

    with pytest.raises(InputError, match="nvfp4 needs --target tensorrt"):
        Recipe(scheme="nvfp4").check_target("onnxruntime")
    with pytest.raises(InputError, match="per block of 16 at run time"):
        Recipe(scheme="nvfp4", activations="dynamic").check_target("tensorrt")
    with pytest.raises(InputError, match="nvfp4_fallback_db"):
        Recipe(scheme="nvfp4", nvfp4_fallback_db=-1.0)
    Recipe(scheme="nvfp4", lowrank=32, block_size=16).check_target("tensorrt")  # the INT4 block rule is not nvfp4's


@pytest.fixture(scope="module")
def nvfp4_graphs(mini, mini_export, mini_calibration, tmp_path_factory):
    from conftest import RTN

    from exporter.models.layers import quantizable_linears
    from exporter.passes.recipe import Recipe
    from exporter.stages.quantized import export_fp16_base, quantize_graph

    root = tmp_path_factory.mktemp("nvfp4")
    base = root / "dit.fp16.onnx"
    export_fp16_base(mini, mini_export[1]["dims"], base)
    layers = list(quantizable_linears(mini.dit))
    out = {"fp16": (base, onnx.load(str(base)), None)}
    recipes = {"nvfp4": Recipe(scheme="nvfp4", nvfp4_fallback_db=0.0, **RTN),
               "nvfp4-r32": Recipe(scheme="nvfp4", lowrank=32, nvfp4_fallback_db=0.0, **RTN),
               "nvfp4-fallback": Recipe(scheme="nvfp4", nvfp4_fallback_db=60.0, **RTN)}
    for name, recipe in recipes.items():
        model, record = quantize_graph(base, layers, mini_calibration, recipe)
        onnx.save(model, str(root / f"{name}.onnx"))
        out[name] = (root / f"{name}.onnx", model, record)
    return out


def test_nvfp4_graph_is_tensorrt_clean_with_fp4_gemms(nvfp4_graphs):
    from collections import Counter

    from exporter.tensorrt.checker import check_graph
    from exporter.tensorrt.precision_map import precision_map

    _, model, record = nvfp4_graphs["nvfp4-r32"]
    assert check_graph(model) == []
    assert next(o.version for o in model.opset_import if o.domain == "") == 23
    pmap = precision_map(model, latents=1024)
    assert pmap.violations == []
    kinds = Counter((x.kind, x.precision) for x in pmap.layers)
    assert kinds[("weight GEMM", "NVFP4 (FP16 out)")] == 42
    assert not any(x.compute == "FP32" for x in pmap.layers if x.quantized or x.kind == "attention MatMul")
    assert pmap.attention_cores == pmap.fusable_attention_cores == 12
    quantizers = [n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert len(quantizers) == len({n.input[0] for n in quantizers})  # one per activation tensor
    assert all(r["rank"] == 32 and r["weight_rel_error_lowrank"] < r["weight_rel_error_plain"] for r in record.values())
    # a broken form is named: INT8 activations into an FP4 weight, a wrong block size
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    q = next(n for n in broken.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
    next(a for a in q.attribute if a.name == "block_size").i = 32
    assert "FP4 quantizer" in {v.rule for v in check_graph(broken)}


def test_nvfp4_runs_emulated_and_the_branch_and_fallback_pay(nvfp4_graphs):
    from exporter.onnx.torch_export import ort_session

    sessions = {k: ort_session(v[0]) for k, v in nvfp4_graphs.items()}
    snr = sqnr_vs_reference(sessions, [k for k in nvfp4_graphs if k != "fp16"])
    mean = {k: float(np.mean(v)) for k, v in snr.items()}
    assert mean["nvfp4"] > 3.0, mean
    assert mean["nvfp4-r32"] > mean["nvfp4"] + 1.0, mean
    fallback = [r for r in nvfp4_graphs["nvfp4-fallback"][2].values() if r.get("nvfp4_fallback", {}).get("int4_fallback")]
    assert fallback and all(r["scheme"] == "w4a16" for r in fallback)
    assert mean["nvfp4-fallback"] > mean["nvfp4"], mean


def test_speed_model_costs_nvfp4_on_blackwell_only(nvfp4_graphs):
    from exporter.tensorrt.precision_map import precision_map
    from exporter.tensorrt.speed_model import GPUS, markdown, predict_all

    maps = {k: precision_map(nvfp4_graphs[k][1], latents=1024) for k in ("fp16", "nvfp4", "nvfp4-r32")}
    prediction = predict_all(maps)
    out = prediction["gpus"]
    assert GPUS["B200"].fp4_tflops == 2 * GPUS["B200"].fp8_tflops
    assert out["B200"]["nvfp4"]["speedup_vs_fp16"] > 1.0
    # the branch's two FP16 GEMMs and its Add run unfused in TensorRT (SVDQuant's kernels fuse them; TensorRT has
    # no such fusion): at sao-mini's widths they cost more than FP4 saves (0.29 vs 0.24 ms FP16, 0.20 ms without)
    assert out["B200"]["nvfp4"]["total_ms"] < out["B200"]["fp16"]["total_ms"] < out["B200"]["nvfp4-r32"]["total_ms"]
    for gpu in ("H100", "H200", "L40S", "RTX 4090"):
        assert "FP4" in out[gpu]["nvfp4"]["unsupported"] and "total_ms" not in out[gpu]["nvfp4"]
    assert "not supported" in markdown(prediction, 1024, 2)
