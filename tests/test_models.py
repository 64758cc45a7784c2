"""Presets, config validation, checkpoint loading and T5 sources (no network, no real weights here)."""
from __future__ import annotations

import json

import pytest
import torch

from exporter.errors import InputError
from exporter.models import ModelSpec, load_model, presets


def test_sao_preset_is_the_published_architecture():
    cfg = presets.preset_config("stable-audio-open")
    dit = cfg["model"]["diffusion"]["config"]
    assert (dit["embed_dim"], dit["depth"], dit["num_heads"], dit["cond_token_dim"]) == (1536, 24, 24, 768)
    assert cfg["model"]["pretransform"]["config"]["downsampling_ratio"] == 2048
    assert cfg["sample_rate"] == 44100 and cfg["sample_size"] == 2097152


def test_sao_mini_keeps_cross_attention_head_arithmetic_valid(mini):
    dit = presets.preset_config("sao-mini")["model"]["diffusion"]["config"]
    head = dit["embed_dim"] // dit["num_heads"]
    assert dit["cond_token_dim"] <= dit["embed_dim"] and dit["cond_token_dim"] % head == 0
    attn = mini.dit.transformer.layers[0].cross_attn
    assert attn.num_heads % attn.kv_heads == 0 and attn.kv_heads == 4


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(model_type="autoencoder"), "model_type"),
    (lambda c: c["model"]["diffusion"].update(type="adp_cfg_1d"), "diffusion.type"),
    (lambda c: c["model"]["conditioning"]["configs"].append({"id": "c", "type": "clap_text", "config": {}}),
     "conditioners"),
    (lambda c: c["model"]["diffusion"]["config"].update(cond_token_dim=200), "cross-attention width"),
])
def test_configs_outside_the_sao_family_are_refused(mutate, message):
    cfg = presets.preset_config("sao-mini")
    mutate(cfg)
    with pytest.raises(InputError, match=message):
        presets.validate_sao_family(cfg)


def test_checkpoint_round_trip_loads_exact_weights(mini, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in mini.wrapper.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps(mini.config))
    t5_dir = tmp_path / "t5"
    mini.t5_conditioner.model.save_pretrained(str(t5_dir))
    mini.t5_conditioner.tokenizer.save_pretrained(str(t5_dir))
    loaded = load_model(ModelSpec(model="sao-mini", checkpoint=str(tmp_path / "model.safetensors"), t5=str(t5_dir)))
    assert loaded.identity["synthetic"] is False and loaded.identity["weights"].startswith("sha256:")
    for key, value in mini.wrapper.state_dict().items():
        assert torch.equal(loaded.wrapper.state_dict()[key], value), key
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        a = loaded.t5_conditioner.model(input_ids=ids)["last_hidden_state"]
        b = mini.t5_conditioner.model(input_ids=ids)["last_hidden_state"]
    assert torch.equal(a, b)


def test_checkpoint_of_another_architecture_is_refused(mini, tmp_path):
    from safetensors.torch import save_file

    save_file({"model.model.bogus": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps(mini.config))
    with pytest.raises(InputError, match="does not match"):
        load_model(ModelSpec(model="sao-mini", checkpoint=str(tmp_path / "model.safetensors"),
                             t5=_t5_dir(mini, tmp_path)))


def _t5_dir(mini, tmp_path):
    d = tmp_path / "t5"
    mini.t5_conditioner.model.save_pretrained(str(d))
    mini.t5_conditioner.tokenizer.save_pretrained(str(d))
    return str(d)


def test_missing_t5_names_the_fix(tmp_path, mini):
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in mini.wrapper.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps(mini.config))
    with pytest.raises(InputError, match="--t5 DIR"):
        load_model(ModelSpec(model="sao-mini", checkpoint=str(tmp_path / "model.safetensors")))
