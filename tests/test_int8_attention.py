"""exporter/passes/int8_attention.py: Q·Kᵀ as DynamicQuantizeLinear + MatMulInteger in every attention core of the
sao-mini DiT (real ONNX Runtime sessions), through the recipe for the ONNX Runtime target only."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import RTN

from engines.evaluation.accuracy import sqnr_db
from exporter.errors import InputError
from exporter.passes.int8_attention import quantize_attention_scores
from exporter.passes.ort_fusion import fuse_attention
from exporter.passes.recipe import Recipe

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, name: str) -> np.ndarray:
    from exporter.onnx.torch_export import ort_session

    onnx.save(model, str(tmp_path / name))
    return ort_session(tmp_path / name).run(["v"], feeds)[0]


@pytest.fixture(scope="module")
def fp32(mini_export):
    from engines.evaluation.bench_candidates import feeds

    out, manifest = mini_export
    return out / manifest["graphs"]["dit"]["file"], feeds(manifest["dims"], 40)


def test_every_core_gets_integer_scores_close_to_float(fp32, tmp_path):
    path, feeds = fp32
    model = onnx.load(str(path))
    ref = _run(model, feeds, tmp_path, "fp32.onnx")
    rewritten, cores = quantize_attention_scores(onnx.load(str(path)))
    onnx.checker.check_model(rewritten)
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert cores == 12 and ops["MatMulInteger"] == 12 and ops["DynamicQuantizeLinear"] == 24
    assert ops["Softmax"] == 12  # the softmax and the P·V MatMul stay float
    got = _run(rewritten, feeds, tmp_path, "int8.onnx")
    assert 20.0 < sqnr_db(ref, got) < 80.0, sqnr_db(ref, got)  # quantized, and close
    assert fuse_attention(rewritten, "mha")[1] == 0  # the rewritten cores are not fused afterwards


def test_the_recipe_applies_it_on_onnx_runtime_and_tensorrt_refuses_it(fp32, mini, mini_calibration):
    from exporter.models.layers import quantizable_linears
    from exporter.stages.quantized import quantize_graph

    path, _ = fp32
    recipe = Recipe(scheme="w8a8", activations="dynamic", bucket_policy="shared", attention_int8="dynamic-qk", **RTN)
    model, _ = quantize_graph(path, list(quantizable_linears(mini.dit)), mini_calibration, recipe)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == len(quantizable_linears(mini.dit)) + 12
    with pytest.raises(InputError, match="TensorRT cannot build"):
        Recipe(scheme="w8a8", attention_int8="dynamic-qk").check_target("tensorrt")
    with pytest.raises(InputError, match="unknown attention_int8"):
        Recipe(attention_int8="static")
    assert Recipe.from_json({k: v for k, v in Recipe().to_json().items() if k != "attention_int8"}) == Recipe()
