"""The diffusers layout: diffusers' own StableAudioDiTModel, AutoencoderOobleck and StableAudioProjectionModel
(small, random weights, saved with save_pretrained as a StableAudioPipeline) export through quadit, and the
graphs reproduce diffusers' forward passes; the same weights in the stable-audio-tools layout give the same
DiT graph; the cache search finds a diffusers-only snapshot."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_script

from exporter.models import ModelSpec, load_model, resolve_source
from exporter.onnx.torch_export import ort_session

SEQ = 32  # tokenizer model_max_length -> the text conditioner's max_length


def make_pipeline(out: Path, seed: int = 0):
    """A StableAudioPipeline of diffusers' own classes at a small size (SAO 1.0's structure: two number
    conditioners, T5 tokens projected 512 -> 128, 12/24-style KV-head sharing, a two-block Oobleck VAE)."""
    from diffusers import AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    dit = StableAudioDiTModel(sample_size=256, in_channels=64, num_layers=2, attention_head_dim=64, num_attention_heads=4,
                              num_key_value_attention_heads=2, out_channels=64, cross_attention_dim=128,
                              time_proj_dim=256, global_states_input_dim=256, cross_attention_input_dim=128)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[32, 64], channel_multiples=[1, 2],
                             decoder_channels=16, decoder_input_channels=64, audio_channels=2, sampling_rate=44100)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.add_(torch.rand_like(p) * 0.5)  # snake parameters away from their init
    projection = StableAudioProjectionModel(text_encoder_dim=512, conditioning_dim=128, min_value=0, max_value=512)
    text = T5EncoderModel(T5Config(vocab_size=384, d_model=512, d_ff=512, num_layers=1, num_heads=8, d_kv=64,
                                   is_encoder_decoder=False, use_cache=False))
    scheduler = CosineDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, solver_order=2,
                                                  prediction_type="v_prediction", sigma_data=1.0,
                                                  sigma_schedule="exponential")
    pipe = StableAudioPipeline(vae=vae, text_encoder=text, projection_model=projection,
                               tokenizer=ByT5Tokenizer(model_max_length=SEQ), transformer=dit, scheduler=scheduler)
    pipe.save_pretrained(str(out))
    return pipe


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusers") / "stable-audio-open-1.0"
    pipe = make_pipeline(out)
    return out, pipe


@pytest.fixture(scope="module")
def diffusers_export(pipeline_dir, tmp_path_factory):
    from exporter.stages.export import ExportOptions, export_model

    root, _ = pipeline_dir
    loaded = load_model(ModelSpec(model="stable-audio-open", checkpoint=str(root)))
    out = tmp_path_factory.mktemp("diffusers-export") / "fp32"
    return loaded, out, export_model(loaded, out, ExportOptions(scheme="fp32"))


def _dit_inputs(seed: int = 0, batch: int = 2, length: int = 40):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 64, length, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, SEQ + 2, 128, generator=g), torch.randn(batch, 256, generator=g))


def _run_dit(path: Path, inputs) -> np.ndarray:
    names = ("x", "t", "cross_attn_cond", "global_embed")
    return ort_session(path).run(None, {n: v.numpy() for n, v in zip(names, inputs)})[0]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_derived_config_and_identity(diffusers_export, pipeline_dir):
    loaded, _, manifest = diffusers_export
    root, _ = pipeline_dir
    dit = loaded.config["model"]["diffusion"]["config"]
    assert (dit["embed_dim"], dit["depth"], dit["num_heads"], dit["cond_token_dim"]) == (256, 2, 4, 128)
    assert loaded.config["sample_size"] == 256 * 2048 and manifest["dims"]["cond_tokens"] == SEQ + 2
    assert manifest["model"]["layout"] == "diffusers" and manifest["model"]["checkpoint"] == str(root)
    assert manifest["model"]["t5_source"]["tokenizer"] == str(root / "tokenizer")
    assert manifest["parity"]["max_rel_error"] <= 1e-4


def test_dit_graph_reproduces_diffusers_transformer(diffusers_export, pipeline_dir):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    _, out, _ = diffusers_export
    _, pipe = pipeline_dir
    for seed, length in ((0, 40), (1, 97)):
        x, t, cross, global_embed = _dit_inputs(seed, length=length)
        rope = get_1d_rotary_pos_embed(pipe.transformer.config.attention_head_dim // 2, length + 1, use_real=True,
                                       repeat_interleave_real=False)
        with torch.no_grad():
            ref = pipe.transformer(x, t, encoder_hidden_states=cross, global_hidden_states=global_embed[:, None],
                                   rotary_embedding=rope, return_dict=False)[0]
        assert _rel(_run_dit(out / "dit.onnx", (x, t, cross, global_embed)), ref) <= 1e-5


def test_vae_decoder_graph_reproduces_diffusers_decode(diffusers_export, pipeline_dir):
    _, out, _ = diffusers_export
    _, pipe = pipeline_dir
    latents = torch.randn(2, 64, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe.vae.decode(latents).sample
    got = ort_session(out / "vae_decoder.onnx").run(None, {"latents": latents.numpy()})[0]
    assert got.shape == (2, 2, 5 * 2048) and _rel(got, ref) <= 1e-5


def test_conditioning_matches_diffusers_projection(diffusers_export, pipeline_dir):
    """T5 from text_encoder/ + tokenizer/, the projection and the number conditioners, against diffusers'
    components loaded from the same directory."""
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import AutoTokenizer, T5EncoderModel

    loaded, _, _ = diffusers_export
    root, _ = pipeline_dir
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    text = T5EncoderModel.from_pretrained(str(root / "text_encoder")).eval()
    projection = StableAudioProjectionModel.from_pretrained(str(root / "projection_model")).eval()
    meta = [{"prompt": "glass harmonica", "seconds_start": 2.0, "seconds_total": 17.0}]
    with torch.no_grad():
        ours = loaded.wrapper.conditioner(meta, "cpu")
        ids = tokenizer(["glass harmonica"], padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
        hidden = text(ids.input_ids, attention_mask=ids.attention_mask)[0]
        ref = projection(text_hidden_states=hidden, start_seconds=torch.tensor([2.0]), end_seconds=torch.tensor([17.0]))
    # stable-audio-tools zeroes padded positions after the projection (diffusers masks them in attention), and
    # its T5Conditioner rounds the encoder's weights to FP16 when it builds it: 1e-3, not 1e-5
    mask = ids.attention_mask[..., None].float()
    assert _rel(ours["prompt"][0].float() * mask, ref.text_hidden_states * mask) <= 1e-3
    assert _rel(ours["seconds_start"][0], ref.seconds_start_hidden_states) <= 1e-6
    assert _rel(ours["seconds_total"][0], ref.seconds_end_hidden_states) <= 1e-6


def test_both_layouts_give_the_same_dit_graph(diffusers_export, tmp_path):
    """The same weights saved in the stable-audio-tools layout (model.safetensors + model_config.json)."""
    from safetensors.torch import save_file

    from exporter.onnx import graphs, torch_export

    loaded, out, _ = diffusers_export
    sat = tmp_path / "sat"
    sat.mkdir()
    save_file({k: v.contiguous().clone() for k, v in loaded.wrapper.state_dict().items()}, str(sat / "model.safetensors"))
    (sat / "model_config.json").write_text(json.dumps(loaded.config))
    again = load_model(ModelSpec(model="stable-audio-open", checkpoint=str(sat / "model.safetensors"),
                                 t5=loaded.identity["t5_source"]["path"],
                                 t5_tokenizer=loaded.identity["t5_source"]["tokenizer"]))
    assert again.identity["layout"] == "stable-audio-tools" and again.identity["config_sha256"] == loaded.identity[
        "config_sha256"]
    inputs = _dit_inputs(5)
    spec = torch_export.GraphSpec("dit", graphs.DiTGraph(again.dit).eval(), inputs, graphs.DIT_INPUTS, graphs.DIT_OUTPUTS,
                                 {"x": {0: "batch", 2: "length"}, "t": {0: "batch"}, "cross_attn_cond": {0: "batch"},
                                  "global_embed": {0: "batch"}})
    torch_export.export_graph(spec, tmp_path / "dit.onnx")
    a, b = _run_dit(tmp_path / "dit.onnx", inputs), _run_dit(out / "dit.onnx", inputs)
    assert _rel(a, b) <= 1e-5


def test_cache_search_finds_a_diffusers_snapshot(pipeline_dir, tmp_path, monkeypatch):
    root, _ = pipeline_dir
    snap = tmp_path / "hub" / "models--stabilityai--stable-audio-open-1.0" / "snapshots" / ("d" * 40)
    shutil.copytree(root, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("d" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    source = resolve_source(ModelSpec(model="stable-audio-open"))
    assert source.layout == "diffusers" and source.path == snap and source.text_encoder == snap / "text_encoder"


def test_incomplete_pipeline_dir_exits_2(pipeline_dir, tmp_path):
    root, _ = pipeline_dir
    broken = tmp_path / "broken"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("vae"))
    proc = run_script("export.py", "--model", "stable-audio-open", "--checkpoint", str(broken), "--out",
                      str(tmp_path / "export"))
    assert "lacks vae/" in one_line_error(proc)
    assert not (tmp_path / "export").exists()
