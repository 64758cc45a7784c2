"""The stable-audio-tools layout: one `model.safetensors` or `model.ckpt` with `model_config.json` beside it,
as Stability AI publishes SAO 1.0 and SAO Small (also inside a Hugging Face cache snapshot)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from calibration.artifact import sha256_file
from exporter.errors import InputError

CKPT_NAMES = ("model.safetensors", "model.ckpt")


@dataclass
class WeightSource:
    """Weights found on disk, in some layout, and what they carry besides: the stable-audio-tools config
    (None: the caller's), and a bundled T5 (`text_encoder` + `tokenizer` directories)."""

    layout: str
    path: Path  # as the user (or the cache search) named it: a snapshot's symlink, never the blob
    config: dict[str, Any] | None
    read_state: Callable[[dict[str, Any]], dict[str, Any]]  # config -> state dict in stable-audio-tools keys
    weights_id: Callable[[], str]
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    # (built wrapper, what read_state returned) -> the wrapper's state dict (a layout with other key names)
    adapt: Callable[[Any, dict[str, Any]], dict[str, Any]] = field(default=lambda _wrapper, state: state)


def checkpoint_source(path: Path) -> WeightSource:
    """A checkpoint file, or a directory holding one (and model_config.json)."""
    if path.is_dir():
        found = [path / n for n in CKPT_NAMES if (path / n).is_file()]
        if not found:
            raise InputError(f"--checkpoint {path} holds neither {' nor '.join(CKPT_NAMES)} nor model_index.json "
                             "(a diffusers StableAudioPipeline)")
        path = found[0]
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    beside = path.parent / "model_config.json"
    config = _read_config(beside) if beside.is_file() else None
    bundled = path.parent / "text_encoder", path.parent / "tokenizer"
    has_t5 = bundled[0].is_dir() and bundled[1].is_dir()
    return WeightSource("stable-audio-tools", path, config, lambda _config: read_state_dict(path),
                        lambda: f"sha256:{sha256_file(path)}", bundled[0] if has_t5 else None,
                        bundled[1] if has_t5 else None)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"model config {path} is not valid JSON: {exc}") from None


def is_safetensors(path: Path) -> bool:
    """By the file's header, not its name: a Hugging Face cache blob has no extension. safetensors
    starts with an 8-byte little-endian header length and a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 30)


def read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        if is_safetensors(path) or path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:  # safetensors/pickle/zip all raise their own types on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"checkpoint {path} is corrupt or unreadable: {first}") from None


def load_weights(wrapper: Any, state: dict[str, Any], path: Path) -> None:
    result = wrapper.load_state_dict(state, strict=False)
    # T5Conditioner keeps its encoder outside the module tree, so T5 weights saved inside a checkpoint
    # are not the wrapper's keys; the encoder comes from --t5 or the HF cache instead.
    t5_keys = tuple(f"conditioner.conditioners.{name}.model." for name, c in wrapper.conditioner.conditioners.items()
                    if hasattr(c, "tokenizer"))
    unexpected = [k for k in result.unexpected_keys if not k.startswith(t5_keys)]
    missing = list(result.missing_keys)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {path} does not match the model config: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


