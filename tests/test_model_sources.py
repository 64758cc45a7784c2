"""Weights as users have them: Hugging Face cache snapshots (blobs without extensions, pinned revisions,
google-t5/ ids, a snapshot's own text_encoder/ + tokenizer/), T5 directories without a tokenizer, and the
config hash that calibration and export identity checks share."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import one_line_error, run_script

from exporter.errors import InputError
from exporter.models import ModelSpec, config_hash, hf_cache, is_safetensors, load_model, presets, reload_from_identity

SAO_REPO = "stabilityai/stable-audio-open-1.0"


def tiny_config() -> dict:
    """A SAO-family config small enough to export in seconds (names t5-small, like sao-mini)."""
    config = presets.preset_config("sao-mini")
    config["model"]["diffusion"]["config"].update(embed_dim=256, depth=2, num_heads=4, cond_token_dim=128,
                                                  global_cond_dim=256)
    config["model"]["conditioning"]["cond_dim"] = 128
    config["quadit"]["synthetic_t5"] = {"num_layers": 1, "d_ff": 512}
    return config


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec(model="custom", config=tiny_config(), synthetic_weights=True, seed=3))


def _blob(repo: Path, snapshot: Path, name: str, data: bytes) -> None:
    """Store `data` the way huggingface_hub does: a content-addressed blob and a relative symlink."""
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / digest).write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))


def cache_repo(home: Path, repo_id: str, files: dict[str, bytes], revision: str = "a" * 40,
               ref: str | None = "main") -> Path:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _blob(repo, snapshot, name, data)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snapshot


def _dir_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _t5_files(loaded, tmp: Path) -> dict[str, bytes]:
    d = tmp / "t5-save"
    loaded.t5_conditioner.model.save_pretrained(str(d))
    loaded.t5_conditioner.tokenizer.save_pretrained(str(d))
    return _dir_files(d)


def _checkpoint_files(loaded) -> dict[str, bytes]:
    from safetensors.torch import save

    state = {k: v.contiguous().clone() for k, v in loaded.wrapper.state_dict().items()}
    full = {**loaded.config, "training": {"learning_rate": 1e-4}}  # as published: a training block too
    return {"model.safetensors": save(state), "model_config.json": json.dumps(full).encode()}


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def test_cache_snapshot_checkpoint_loads_and_reloads_by_the_path_the_user_has(tiny, hf_home, tmp_path):
    snap = cache_repo(hf_home, SAO_REPO, _checkpoint_files(tiny), revision="b" * 40)
    t5_snap = cache_repo(hf_home, "google-t5/t5-small", _t5_files(tiny, tmp_path))
    blob = (snap / "model.safetensors").resolve()
    assert blob.suffix == "" and is_safetensors(blob) and not is_safetensors(snap / "model_config.json")
    loaded = load_model(ModelSpec(model="stable-audio-open"))  # found offline: SAO snapshot, google-t5/ T5
    assert loaded.identity["checkpoint"] == str(snap / "model.safetensors")
    assert loaded.identity["hf_snapshot"] == {"repo": SAO_REPO, "revision": "b" * 40}
    assert loaded.identity["t5_source"]["path"] == str(t5_snap)
    # the config beside the checkpoint has a training block; the hash covers the model section only
    assert loaded.identity["config_sha256"] == config_hash(tiny.config)
    for key, value in tiny.wrapper.state_dict().items():
        assert torch.equal(loaded.wrapper.state_dict()[key], value), key
    # the PyTorch backend rebuilds the model from the manifest's identity, also from a bare blob path
    manifest = {"model": {**loaded.identity, "checkpoint": str(blob)}, "model_config": loaded.config}
    again = reload_from_identity(manifest)
    assert again.identity["weights"] == loaded.identity["weights"]


def test_pinned_revision_without_refs_main_is_found(tiny, hf_home, tmp_path):
    snap = cache_repo(hf_home, SAO_REPO, _checkpoint_files(tiny), revision="c" * 40, ref=None)
    cache_repo(hf_home, "t5-small", _t5_files(tiny, tmp_path), ref="v1")
    assert hf_cache.snapshots(SAO_REPO) == [snap]
    loaded = load_model(ModelSpec(model="stable-audio-open"))
    assert loaded.identity["hf_snapshot"]["revision"] == "c" * 40


def test_sao_snapshot_own_text_encoder_and_tokenizer_are_used(tiny, hf_home, tmp_path):
    files = _checkpoint_files(tiny)
    d = tmp_path / "parts"
    tiny.t5_conditioner.model.save_pretrained(str(d / "text_encoder"))
    tiny.t5_conditioner.tokenizer.save_pretrained(str(d / "tokenizer"))
    files.update(_dir_files(d))
    snap = cache_repo(hf_home, SAO_REPO, files)
    loaded = load_model(ModelSpec(model="stable-audio-open"))
    assert loaded.identity["t5_source"] == {"kind": "dir", "path": str(snap / "text_encoder"),
                                            "tokenizer": str(snap / "tokenizer")}


def test_t5_dir_without_tokenizer_is_refused_naming_the_missing_files(tiny, tmp_path):
    d = tmp_path / "text_encoder"
    tiny.t5_conditioner.model.save_pretrained(str(d))  # config + weights, no tokenizer: SAO's text_encoder/
    from exporter.models.t5 import resolve_t5_source

    with pytest.raises(InputError, match=r"missing tokenizer files \(tokenizer.json or spiece.model\)"):
        resolve_t5_source(str(d), False, 0)
    # a T5 tokenizer_config.json without its vocabulary file is what transformers turns into 104 tokens
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(InputError, match="tokenizer files"):
        resolve_t5_source(str(d), False, 0)


def test_tokenizer_smaller_than_the_encoder_vocabulary_is_refused(tiny, tmp_path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from exporter.models import build
    from exporter.models.t5 import resolve_t5_source

    d = tmp_path / "t5"
    T5EncoderModel(T5Config(vocab_size=32128, d_model=512, d_ff=64, num_layers=1, num_heads=8, d_kv=64,
                            is_encoder_decoder=False)).save_pretrained(str(d))
    ByT5Tokenizer().save_pretrained(str(d))  # 384 tokens for 32128 embeddings
    with pytest.raises(InputError, match="384 tokens for a T5 with 32128 embeddings"):
        build(tiny_config(), resolve_t5_source(str(d), False, 0), 0)


def test_an_encoder_with_few_token_ids_exports_with_parity(tmp_path):
    """The text encoder's example and parity ids are drawn within the ids the encoder embeds (here 259
    rows: ByT5's 3 specials and 256 bytes, fewer than its tokenizer's 384 and than the usual 3..300)."""
    import copy

    from transformers import T5EncoderModel

    from exporter.stages.export import ExportOptions, export_model, token_id_range

    tiny = load_model(ModelSpec(model="custom", config=tiny_config(), synthetic_weights=True, seed=3))  # its own
    config = copy.deepcopy(tiny.t5_conditioner.model.config)
    config.vocab_size = 259
    small = T5EncoderModel(config).eval()
    tiny.t5_conditioner.__dict__["model"] = small  # the conditioner keeps its encoder outside its state dict
    assert tiny.t5_conditioner.model is small
    assert token_id_range(tiny.t5_conditioner) == (3, 259)
    manifest = export_model(tiny, tmp_path / "export", ExportOptions(scheme="fp32"))
    assert manifest["graphs"]["text_encoder"]["parity"]["max_rel_error"] <= 1e-4


def test_cli_t5_without_tokenizer_exits_2_and_leaves_nothing(tiny, tmp_path):
    work = tmp_path / "work"
    ckpt = work / "ckpt"
    ckpt.mkdir(parents=True)
    for name, data in _checkpoint_files(tiny).items():
        (ckpt / name).write_bytes(data)
    tiny.t5_conditioner.model.save_pretrained(str(work / "text_encoder"))
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    proc = run_script("export.py", "--model", "stable-audio-open", "--checkpoint", str(ckpt / "model.safetensors"),
                      "--t5", str(work / "text_encoder"), "--out", str(work / "export"))
    assert "tokenizer files" in one_line_error(proc)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before


def test_config_hash_covers_the_model_section_only():
    cfg = presets.preset_config("stable-audio-open")
    published = {**cfg, "training": {"learning_rate": 5e-5, "demo": {"demo_every": 2000}}}
    assert config_hash(published) == config_hash(cfg)
    changed = json.loads(json.dumps(cfg))
    changed["model"]["diffusion"]["config"]["depth"] = 23
    assert config_hash(changed) != config_hash(cfg)


@pytest.mark.slow
def test_cache_export_generates_with_torch_and_onnxruntime(tiny, tmp_path):
    """The user's path end to end through the CLIs: weights only in the HF cache, export, generate with
    both backends (about 2 minutes on 2 cores: three processes, four graph exports)."""
    home = tmp_path / "hf"
    cache_repo(home, SAO_REPO, _checkpoint_files(tiny))
    cache_repo(home, "google-t5/t5-small", _t5_files(tiny, tmp_path))
    env = {"HF_HOME": str(home)}
    out = tmp_path / "export"
    proc = run_script("export.py", "--model", "stable-audio-open", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    audio = {}
    for backend in ("torch", "onnxruntime"):
        wav = tmp_path / f"{backend}.wav"
        proc = run_script("generate.py", "--export", str(out), "--prompt", "rain", "--seconds", "1", "--steps", "8",
                          "--backend", backend, "--out", str(wav), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        audio[backend] = sf.read(str(wav))[0]
    assert audio["torch"].shape == audio["onnxruntime"].shape == (44100, 2)
    err = np.abs(audio["torch"] - audio["onnxruntime"]).max() / np.abs(audio["torch"]).max()
    assert err < 1e-2, err
