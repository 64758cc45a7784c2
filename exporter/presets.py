"""Model presets: stable-audio-tools `model_config.json` dicts, and the SAO-family validator.

The configs are data for stable-audio-tools' own factory (`create_model_from_config`); nothing here
re-implements a model class.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from exporter.errors import InputError

SAMPLE_RATE = 44100
VAE_RATIO = 2048
MAX_SECONDS = 512.0  # the number conditioners' range in SAO 1.0


def _oobleck(channels: int, latent_dim: int) -> dict[str, Any]:
    common = {"channels": channels, "c_mults": [1, 2, 4, 8, 16], "strides": [2, 4, 4, 8, 8], "use_snake": True}
    return {
        "type": "autoencoder",
        "iterate_batch": True,
        "config": {
            "encoder": {"type": "oobleck", "requires_grad": False,
                        "config": {"in_channels": 2, "latent_dim": 2 * latent_dim, **common}},
            "decoder": {"type": "oobleck",
                        "config": {"out_channels": 2, "latent_dim": latent_dim, "final_tanh": False, **common}},
            "bottleneck": {"type": "vae"},
            "latent_dim": latent_dim,
            "downsampling_ratio": VAE_RATIO,
            "io_channels": 2,
        },
    }


def _config(*, vae_channels: int, t5_name: str, t5_max_length: int, cond_dim: int, embed_dim: int, depth: int,
            num_heads: int, sample_size: int) -> dict[str, Any]:
    return {
        "model_type": "diffusion_cond",
        "sample_size": sample_size,
        "sample_rate": SAMPLE_RATE,
        "audio_channels": 2,
        "model": {
            "pretransform": _oobleck(vae_channels, 64),
            "conditioning": {
                "configs": [
                    {"id": "prompt", "type": "t5", "config": {"t5_model_name": t5_name, "max_length": t5_max_length}},
                    {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                    {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                ],
                "cond_dim": cond_dim,
            },
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                "global_cond_ids": ["seconds_start", "seconds_total"],
                "type": "dit",
                "config": {
                    "io_channels": 64,
                    "embed_dim": embed_dim,
                    "depth": depth,
                    "num_heads": num_heads,
                    "cond_token_dim": cond_dim,
                    "global_cond_dim": 2 * cond_dim,
                    "project_cond_tokens": False,
                    "transformer_type": "continuous_transformer",
                },
            },
            "io_channels": 64,
        },
    }


# Stable Audio Open 1.0 as published (model_config.json of stabilityai/stable-audio-open-1.0).
STABLE_AUDIO_OPEN = _config(vae_channels=128, t5_name="t5-base", t5_max_length=128, cond_dim=768, embed_dim=1536,
                            depth=24, num_heads=24, sample_size=2097152)

# The embedded default: same classes, reduced. cond_dim (256) <= embed_dim (512), both multiples of the
# head size (64), so cross-attention's KV-head repeat (8 query heads / 4 KV heads) stays valid.
# The text encoder is a 2-layer T5 of t5-small's width (512, the width stable-audio-tools assigns to
# the name "t5-small") with a byte tokenizer, projected to 256 by the conditioner's own proj_out.
SAO_MINI = _config(vae_channels=16, t5_name="t5-small", t5_max_length=64, cond_dim=256, embed_dim=512, depth=6,
                   num_heads=8, sample_size=524288)
SAO_MINI["quadit"] = {"synthetic_t5": {"num_layers": 2, "d_ff": 1024}}

PRESETS: dict[str, dict[str, Any]] = {"stable-audio-open": STABLE_AUDIO_OPEN, "sao-mini": SAO_MINI}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise InputError(f"unknown model '{name}' (choose from: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"model config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"model config {path} is not valid JSON: {exc}") from None
    validate_sao_family(config, str(path))
    return config


def validate_sao_family(config: dict[str, Any], where: str = "model config") -> None:
    """Accept exactly what quadit's exporter and runtime handle: a conditioned DiT (v objective, prepend
    global conditioning), T5 and number conditioners, an Oobleck autoencoder pretransform."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise InputError(f"{where} is not a Stable Audio Open-family config: {what}")

    need(isinstance(config, dict), "top level is not an object")
    need(config.get("model_type") == "diffusion_cond", f"model_type is {config.get('model_type')!r}, "
         "expected 'diffusion_cond'")
    model = config.get("model", {})
    diffusion = model.get("diffusion", {})
    need(diffusion.get("type") == "dit", f"diffusion.type is {diffusion.get('type')!r}, expected 'dit'")
    need(diffusion.get("diffusion_objective", "v") == "v", "only the v objective is supported")
    dit = diffusion.get("config", {})
    need(dit.get("global_cond_type", "prepend") == "prepend", "only global_cond_type 'prepend' is supported")
    need(dit.get("patch_size", 1) == 1, "only patch_size 1 is supported")
    pre = model.get("pretransform", {})
    need(pre.get("type") == "autoencoder", "pretransform is not an autoencoder")
    dec = pre.get("config", {}).get("decoder", {})
    need(dec.get("type") == "oobleck", f"decoder type is {dec.get('type')!r}, expected 'oobleck'")
    conds = model.get("conditioning", {}).get("configs", [])
    types = {c.get("id"): c.get("type") for c in conds}
    need(set(types.values()) <= {"t5", "number"}, f"conditioners {sorted(set(types.values()))} (only t5, number)")
    need(list(types.values()).count("t5") == 1, "exactly one t5 conditioner is required")
    need(bool(diffusion.get("cross_attention_cond_ids")), "no cross_attention_cond_ids")
    embed, heads = dit.get("embed_dim", 0), dit.get("num_heads", 0)
    need(heads > 0 and embed % heads == 0, "embed_dim is not a multiple of num_heads")
    head_dim = embed // heads
    cond_dim = dit.get("cond_token_dim", 0) if not dit.get("project_cond_tokens", True) else embed
    need(cond_dim % head_dim == 0 and cond_dim <= embed and (embed // head_dim) % max(cond_dim // head_dim, 1) == 0,
         f"cross-attention width {cond_dim} must be a multiple of the head size {head_dim} dividing embed_dim {embed}")
