"""The ModelOpt baseline quantizes exactly quadit's layers, leaves the caller's DiT alone, and stays close to FP32.

sao-mini with synthetic weights is far more sensitive than the real model (round-to-nearest INT8 weights alone
give only ~23 dB SQNR), so the SQNR floors are measured on it with a ~3 dB margin, not taken from the
literature. Measured (modelopt 0.47.0, CPU): w8a8 15.7 dB, w4a16 13.8 dB, w4a8 12.3 dB.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

SCHEMES = ("w8a8", "w4a16", "w4a8")
SQNR_FLOOR_DB = {"w8a8": 12.5, "w4a16": 10.5, "w4a8": 9.0}
SQNR_CEIL_DB = 35.0  # above this the output is too close to FP32 for quantization to have happened


def _case(g: torch.Generator, length: int = 32) -> tuple[torch.Tensor, ...]:
    """One DiT call (DiTGraph interface): x [B, 64, L], t [B], cross_attn_cond [B, 66, 256], global_embed [B, 512]."""
    return (torch.randn(2, 64, length, generator=g), torch.rand(2, generator=g), torch.randn(2, 66, 256, generator=g),
            torch.randn(2, 512, generator=g))


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.fixture(scope="module")
def runs(mini):
    """All three schemes quantized once, with the caller's model fingerprinted before and after."""
    from engines.evaluation.modelopt_baseline import modelopt_quantize
    from exporter.models.layers import quantizable_linears
    from exporter.onnx.graphs import DiTGraph

    g = torch.Generator().manual_seed(0)
    calib, test = [_case(g) for _ in range(4)], _case(g)

    def forward_loop(model: nn.Module) -> None:
        for case in calib:
            DiTGraph(model)(*case)

    before = _digest(mini.dit)
    with torch.no_grad():
        ref = DiTGraph(mini.dit)(*test)
    quantizable = list(quantizable_linears(mini.dit))
    results = {}
    for scheme in SCHEMES:
        model, info = modelopt_quantize(mini.dit, scheme, forward_loop, quantizable)
        with torch.no_grad():
            results[scheme] = (model, info, DiTGraph(model)(*test))
    with torch.no_grad():
        ref_after = DiTGraph(mini.dit)(*test)
    return {"before": before, "after": _digest(mini.dit), "ref": ref, "ref_after": ref_after,
            "quantizable": quantizable, "results": results}


def _own_quantizers(module: nn.Module) -> list[nn.Module]:
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    return [q for q in module.children() if isinstance(q, (TensorQuantizer, SequentialQuantizer))]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizes_exactly_quadits_layers(mini, runs, scheme):
    import modelopt

    model, info, _ = runs["results"][scheme]
    quantizable = runs["quantizable"]
    assert len(quantizable) == 42  # sao-mini: 6 blocks x (qkv, out, q, kv, out, ff in, ff out)
    assert info["quantized_layers"] == len(quantizable) and sorted(info["layers"]) == sorted(quantizable)
    assert info["config"] == {"w8a8": "INT8_SMOOTHQUANT_CFG", "w4a16": "INT4_AWQ_CFG",
                              "w4a8": "W4A8_AWQ_BETA_CFG"}[scheme]
    assert info["modelopt_version"] == modelopt.__version__
    modules = dict(model.named_modules())
    for name in quantizable:
        assert modules[name].weight_quantizer.is_enabled, name
    # the algorithm ran on the quantized layers: SmoothQuant / AWQ leave a per-channel input scale
    assert sum(modules[n].input_quantizer.pre_quant_scale is not None for n in quantizable) >= len(quantizable) // 2
    original = dict(mini.dit.named_modules())
    excluded = [n for n, m in original.items() if isinstance(m, (nn.Linear, nn.Conv1d)) and n not in quantizable]
    assert len(excluded) == 10  # 3 MLPs x 2, project_in/out, pre/post conv
    for name in excluded:
        assert not any(q.is_enabled for q in _own_quantizers(modules[name])), name
        # calibration (SmoothQuant / AWQ) never touched them: weights bit-identical, no smoothing scale
        assert torch.equal(modules[name].weight, original[name].weight), name
        assert modules[name].input_quantizer.pre_quant_scale is None, name
    assert not model.training


@pytest.mark.parametrize(("scheme", "w_bits", "a_bits"), [("w8a8", 8, 8), ("w4a16", 4, None), ("w4a8", 4, (4, 3))])
def test_quantizer_formats(runs, scheme, w_bits, a_bits):
    model, _, _ = runs["results"][scheme]
    layer = dict(model.named_modules())[runs["quantizable"][0]]
    wq = layer.weight_quantizer
    first = wq[0] if isinstance(wq, nn.Sequential) else wq  # W4A8: SequentialQuantizer (INT4 block, FP8)
    assert first.num_bits == w_bits
    if a_bits is None:
        assert not layer.input_quantizer.is_enabled
    else:
        assert layer.input_quantizer.is_enabled and layer.input_quantizer.num_bits == a_bits


def test_callers_model_is_unchanged(mini, runs):
    assert runs["after"] == runs["before"]
    assert torch.equal(runs["ref_after"], runs["ref"])
    assert not any(_own_quantizers(m) for m in mini.dit.modules())
    assert all(runs["results"][s][0] is not mini.dit for s in SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_is_quantized_but_close(runs, scheme):
    sqnr = _sqnr_db(runs["ref"], runs["results"][scheme][2])
    assert SQNR_FLOOR_DB[scheme] < sqnr < SQNR_CEIL_DB, (scheme, sqnr)


def test_w8a8_beats_w4a8(runs):
    sqnr = {s: _sqnr_db(runs["ref"], runs["results"][s][2]) for s in ("w8a8", "w4a8")}
    assert sqnr["w8a8"] > sqnr["w4a8"] + 1.0, sqnr


def test_unknown_scheme_is_input_error(mini):
    from engines.evaluation.modelopt_baseline import modelopt_quantize
    from exporter.errors import InputError
    from exporter.models.layers import quantizable_linears

    with pytest.raises(InputError) as err:
        modelopt_quantize(mini.dit, "w3a5", lambda m: None, quantizable_linears(mini.dit))
    assert "w3a5" in str(err.value) and "\n" not in str(err.value)
