"""The quantization recipe: validation, JSON round trip, rule resolution, target checks."""
from __future__ import annotations

import pytest

from exporter.errors import InputError
from exporter.passes.recipe import LayerRule, Recipe

LAYERS = [f"transformer.layers.{i}.{n}" for i in range(2)
          for n in ("self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv", "ff.ff.2")]


def test_json_round_trip_and_stable_digest():
    recipe = Recipe(scheme="w4a8", alpha=0.7, lowrank=16, activations="dynamic",
                    rules=(LayerRule("*.cross_attn.to_kv"), LayerRule("transformer.layers.1.*", "override",
                                                                      (("scheme", "w8a8"),))))
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe and again.digest() == recipe.digest()
    assert Recipe().digest() != recipe.digest()
    assert len(recipe.digest()) == 64


@pytest.mark.parametrize("kwargs,message", [
    ({"scheme": "w3a8"}, "unknown scheme"),
    ({"method": "gptq"}, "unknown method"),
    ({"alpha": 1.5}, "alpha"),
    ({"lowrank": -1}, "lowrank"),
    ({"activations": "per-token"}, "activations"),
    ({"block_size": 48}, "power of two"),
    ({"block_size": 8}, "power of two"),
    ({"bucket_policy": "magic"}, "bucket policy"),
    ({"method": "minmax", "bucket_policy": "per-bucket-graph"}, "needs smoothing"),
    ({"version": 2}, "version"),
])
def test_invalid_recipes_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(InputError, match=message):
        Recipe(**kwargs)


def test_rules_apply_in_order_and_a_rule_matching_nothing_is_an_error():
    recipe = Recipe(rules=(LayerRule("transformer.layers.0.*", "override", (("scheme", "w4a16"), ("lowrank", 8))),
                           LayerRule("*.cross_attn.to_kv")))
    resolved = recipe.resolve(LAYERS)
    assert resolved["transformer.layers.0.cross_attn.to_kv"] is None
    assert resolved["transformer.layers.0.self_attn.to_qkv"]["scheme"] == "w4a16"
    assert resolved["transformer.layers.0.self_attn.to_qkv"]["lowrank"] == 8
    assert resolved["transformer.layers.1.self_attn.to_qkv"]["scheme"] == "w8a8"
    assert sum(v is None for v in resolved.values()) == 2
    with pytest.raises(InputError, match="matches no quantizable layer"):
        Recipe(rules=(LayerRule("transformer.layers.9.*"),)).resolve(LAYERS)
    with pytest.raises(InputError, match="cannot override"):
        LayerRule("*", "override", (("method", "minmax"),))
    with pytest.raises(InputError, match="block size"):
        Recipe(rules=(LayerRule("*", "override", (("block_size", 100),)),)).resolve(LAYERS)


@pytest.mark.parametrize("recipe,allowed", [
    (Recipe(scheme="w8a8", activations="static"), True),
    (Recipe(scheme="w4a16"), True),
    (Recipe(scheme="w4a8"), False),
    (Recipe(scheme="w8a8", activations="dynamic"), False),
    (Recipe(scheme="w8a8", rules=(LayerRule("*.ff.*", "override", (("scheme", "w4a8"),)),)), False),
])
def test_tensorrt_target_allows_exactly_what_tensorrt_runs(recipe, allowed):
    recipe.check_target("onnxruntime")  # ONNX Runtime runs every scheme
    if allowed:
        recipe.check_target("tensorrt")
    else:
        with pytest.raises(InputError, match="not supported by TensorRT"):
            recipe.check_target("tensorrt")
