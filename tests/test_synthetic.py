"""Synthetic weights look trained to a quantizer (outlier channels, timestep-dependent ranges)."""
from __future__ import annotations

import hashlib

import torch

from calibration.collector import ActivationCollector, BucketSpec
from calibration.observers import outlier_fraction, range_growth
from exporter.models.layers import quantizable_linears


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_sao_mini_synthetic_weights_have_outliers_and_range_growth(mini):
    from exporter.models.synthetic import measure_quantizer_view

    report = measure_quantizer_view(mini.wrapper, ["rain on a tin roof", "a jazz trio playing softly"],
                                    steps=20, seconds=2.0)
    layers = quantizable_linears(mini.dit)
    assert set(report["outlier_fraction"]) == set(layers)
    assert len(layers) == 6 * 7  # qkv, out, q, kv, out, glu, ff-out per block
    # >= 1% of input channels at >= 20x the median channel's abs-max, in every quantizable Linear
    assert report["min_outlier_fraction"] >= 0.01, report["outlier_fraction"]
    # every transformer block's input range grows >= 3x from the first to the last quarter of the steps
    assert report["min_range_growth"] >= 3.0, report["range_growth"]


def test_random_init_has_no_outliers_which_is_why_shaping_exists():
    from exporter.models import build, presets
    from exporter.models.t5 import T5Source

    config = presets.preset_config("sao-mini")
    wrapper = build(config, T5Source("synthetic", seed=0, overrides=(("d_ff", 1024), ("num_layers", 2))), seed=0)
    linear = wrapper.model.model.transformer.layers[0].self_attn.to_qkv
    collector = ActivationCollector({"qkv": linear}, BucketSpec((2.0, -1.0)), num_steps=1)
    with collector, torch.no_grad():
        linear(torch.nn.functional.layer_norm(torch.randn(4, 64, 512), (512,)))
    assert outlier_fraction(collector.state["qkv.ch_absmax"]) == 0.0


def test_synthetic_weights_are_deterministic_by_seed():
    from exporter.models import ModelSpec, load_model

    a = load_model(ModelSpec(model="sao-mini", synthetic_weights=True, seed=3))
    b = load_model(ModelSpec(model="sao-mini", synthetic_weights=True, seed=3))
    c = load_model(ModelSpec(model="sao-mini", synthetic_weights=True, seed=4))
    assert _digest(a.wrapper) == _digest(b.wrapper)
    assert _digest(a.wrapper) != _digest(c.wrapper)
    assert _digest(a.t5_conditioner.model) == _digest(b.t5_conditioner.model)
    assert a.identity["weights"] == "synthetic:3" and a.identity["synthetic"] is True


def test_range_growth_and_outlier_fraction_measure_what_they_say():
    per_slot = torch.ones(8, 100)
    per_slot[6:, 0] = 10.0
    assert range_growth(per_slot) == 10.0
    ch = torch.ones(100)
    ch[:3] = 25.0
    assert abs(outlier_fraction(ch) - 0.03) < 1e-9
