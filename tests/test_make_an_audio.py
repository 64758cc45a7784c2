"""Make-An-Audio (latent-diffusion checkpoint keys) through diffusers' own LDM -> diffusers conversion.

The test writes a Make-An-Audio style `.ckpt` small: `make-an-audio-mini` built from the real classes (seed 7,
shaped like trained), its UNet under openaimodel's `model.diffusion_model.*` keys and its autoencoder under
`first_stage_model.*` (quadit's inverse key mappings, which diffusers' `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` map back exactly), its caption encoder under `cond_stage_model.caption_encoder.*`,
and LatentDiffusion's `scale_factor`. `quadit export --checkpoint FILE` of it must give a UNet graph that
reproduces diffusers' `UNet2DConditionModel.forward` of the original model; generate on onnxruntime and torch
must agree; bad files exit 2 with one line and leave nothing behind.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import one_line_error, run_script

from exporter.errors import InputError
from exporter.onnx.torch_export import ort_session

pytestmark = pytest.mark.filterwarnings("ignore")
PRESET = "make-an-audio-mini"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCALE_FACTOR = 0.8  # written as LatentDiffusion's `scale_factor` buffer: must become the VAE's scaling_factor
# max |onnx - diffusers| of the UNet graph on the feeds below; measured 5.7e-06 (outputs up to 1.55)
UNET_ABS_BOUND = 1e-4
PCM_LSB = 1 / 32768
BACKEND_BOUND = 4 * PCM_LSB  # onnxruntime vs torch WAVs; measured 1 LSB at most


def _reference_model():
    from exporter.models.unet_audio import build_preset
    from exporter.models.unet_synthetic import shape_like_trained

    model = build_preset(PRESET, 7)
    shape_like_trained(model, 7)
    return model


def _ldm_state(model) -> dict[str, torch.Tensor]:
    from exporter.models.unet_ldm import LDM_TEXT_PREFIX, ldm_unet_state_dict, ldm_vae_state_dict

    state = {**ldm_unet_state_dict(model.unet), **ldm_vae_state_dict(model.vae)}
    state.update({LDM_TEXT_PREFIX + k: v.clone() for k, v in model.text_encoder.state_dict().items()})
    state["scale_factor"] = torch.tensor(SCALE_FACTOR)
    return state


@pytest.fixture(scope="module")
def maa(tmp_path_factory):
    """The reference model, its .ckpt, and the CLI's FP32 export of the .ckpt."""
    root = tmp_path_factory.mktemp("maa")
    model = _reference_model()
    ckpt = root / "maa_mini.ckpt"
    torch.save({"state_dict": _ldm_state(model)}, ckpt)
    out = root / "export"
    proc = run_script("export.py", "--model", PRESET, "--checkpoint", str(ckpt), "--seed", "3", "--out", str(out),
                      env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, ckpt, out, json.loads((out / "manifest.json").read_text())


def test_ldm_key_mappings_round_trip_through_diffusers_converters():
    from exporter.models.unet_ldm import convert_unet, convert_vae, ldm_unet_state_dict, ldm_vae_state_dict

    model = _reference_model()
    # the preset's UNet config is diffusers' reading of its LDM yaml: spatial transformers at both levels
    assert list(model.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert model.unet.config.cross_attention_dim == 64 and model.unet.config.in_channels == 4
    for module, invert, convert in ((model.unet, ldm_unet_state_dict, convert_unet),
                                    (model.vae, ldm_vae_state_dict, convert_vae)):
        ldm = invert(module)
        back = convert(ldm, dict(module.config))
        own = module.state_dict()
        assert len(ldm) == len(back) == len(own)
        assert all(torch.equal(own[k], back[k]) for k in own)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2") for k in
               ldm_unet_state_dict(model.unet))


def test_checkpoint_export_unet_reproduces_diffusers_forward(maa):
    model, ckpt, out, manifest = maa
    identity = manifest["model"]
    assert identity["layout"] == "latent-diffusion" and identity["synthetic"] is False
    assert identity["from_checkpoint"] == ["unet", "vae", "text_encoder"]
    assert identity["synthetic_components"] == ["vocoder"] and identity["seed"] == 3
    assert manifest["unet_family"] == "make-an-audio"
    assert manifest["graphs"]["unet"]["inputs"] == ["sample", "timestep", "encoder_hidden_states",
                                                    "encoder_attention_mask"]
    for graph in manifest["graphs"].values():
        assert graph["parity"]["max_rel_error"] <= 1e-4
    g = torch.Generator().manual_seed(11)
    feeds = {"sample": torch.randn(2, 4, 20, 20, generator=g), "timestep": torch.tensor([901.0, 37.0]),
             "encoder_hidden_states": torch.randn(2, 77, 64, generator=g), "encoder_attention_mask": torch.ones(2, 77)}
    with torch.no_grad():
        ref = model.unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                         encoder_attention_mask=feeds["encoder_attention_mask"]).sample.numpy()
    got = ort_session(out / "unet.onnx").run(["noise_pred"], {k: v.numpy() for k, v in feeds.items()})[0]
    assert float(np.abs(got - ref).max()) <= UNET_ABS_BOUND, float(np.abs(got - ref).max())
    # the text graph is the caption encoder of the file (CLAP projection per token), the VAE the file's too
    ids = torch.randint(3, 300, (1, 77), generator=g)
    with torch.no_grad():
        hidden = model.text_encoder(ids).numpy()
    text = ort_session(out / "text_encoder.onnx").run(None, {"input_ids": ids.numpy(),
                                                             "attention_mask": np.ones((1, 77), np.int64)})
    assert float(np.abs(text[0] - hidden).max()) <= 1e-4 and np.all(text[1] == 1.0)


@pytest.mark.slow  # two generate processes; the default suite keeps the export's parity
def test_checkpoint_generate_backends_agree(maa, tmp_path):
    _, _, out, _ = maa
    wavs = {}
    for backend in ("onnxruntime", "torch"):
        wav = tmp_path / f"{backend}.wav"
        proc = run_script("generate.py", "--export", str(out), "--prompt", "a bird chirps", "--seconds", "1",
                          "--steps", "3", "--seed", "5", "--backend", backend, "--out", str(wav), env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-2000:]
        wavs[backend], rate = sf.read(str(wav))
        assert rate == 16000 and len(wavs[backend]) == 16000
    assert float(np.abs(wavs["onnxruntime"]).max()) > 0.0
    assert float(np.abs(wavs["onnxruntime"] - wavs["torch"]).max()) <= BACKEND_BOUND


def test_safetensors_checkpoint_reads_the_same_weights(tmp_path):
    from safetensors.torch import save_file

    from exporter.models.unet_audio import load_unet_model

    model = _reference_model()
    path = tmp_path / "maa.safetensors"
    save_file(_ldm_state(model), str(path))
    loaded = load_unet_model(PRESET, str(path), False, 0)
    for name in ("unet", "vae", "text_encoder"):
        own, got = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(own[k], got[k]) for k in own), name
    assert loaded.vae.config.scaling_factor == pytest.approx(SCALE_FACTOR)


def test_bad_checkpoints_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from exporter.models.unet_audio import load_unet_model

    out = tmp_path / "never"
    proc = run_script("export.py", "--model", PRESET, "--checkpoint", str(tmp_path / "missing.ckpt"), "--out",
                      str(out), env=ONE_THREAD)
    assert proc.returncode == 2 and "is not a file" in one_line_error(proc) and not out.exists()
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    state = _ldm_state(_reference_model())
    no_unet = tmp_path / "vae_only.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("model.diffusion_model.")}, str(no_unet))
    short = tmp_path / "short.safetensors"
    save_file({k: v for k, v in state.items() if "middle_block.1." not in k}, str(short))
    wide = tmp_path / "wide.safetensors"
    key = "model.diffusion_model.out.2.weight"
    save_file({**state, key: torch.zeros(8, *state[key].shape[1:])}, str(wide))
    for path, words in ((corrupt, "corrupt or unreadable"), (no_unet, "no 'model.diffusion_model.*' keys"),
                        (short, "does not match"), (wide, "does not match")):
        with pytest.raises(InputError, match=words) as err:
            load_unet_model(PRESET, str(path), False, 0)
        assert "\n" not in str(err.value)
