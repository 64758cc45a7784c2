"""Model presets: stable-audio-tools `model_config.json` dicts (validated by their family's module).

The configs are data for stable-audio-tools' own factory (`create_model_from_config`); nothing here
re-implements a model class.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from exporter.errors import InputError
from exporter.models.stable_audio import validate_sao_family  # noqa: F401  (re-exported: presets.validate_sao_family)

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

# A second reduced test bed of another size (issue 14: no quantizer choice may be tuned to one model):
# 384 wide, 4 deep, 6 heads of 64; cond_dim 192 <= 384 and both multiples of the head size.
SAO_TINY = _config(vae_channels=16, t5_name="t5-small", t5_max_length=64, cond_dim=192, embed_dim=384, depth=4,
                   num_heads=6, sample_size=524288)
SAO_TINY["quadit"] = {"synthetic_t5": {"num_layers": 1, "d_ff": 768}}
# presets with no published weights: they run only with --synthetic-weights (or a user's --checkpoint)
SYNTHETIC_ONLY = ("sao-mini", "sao-tiny")


def _small() -> dict[str, Any]:
    """Stable Audio Open Small (stabilityai/stable-audio-open-small, model_config.json): the SAO 1.0 VAE and
    T5-base, one `seconds_total` number conditioner (0-256 s), a 1024-wide, 16-deep DiT with 8 heads and
    LayerNorm qk-norm, cross-attention tokens projected to the model width, the `rf_denoiser` objective
    (sampled with stable-audio-tools' pingpong sampler, 8 steps, CFG 1) and a 524288-sample window."""
    config = _config(vae_channels=128, t5_name="t5-base", t5_max_length=64, cond_dim=768, embed_dim=1024,
                     depth=16, num_heads=8, sample_size=524288)
    model = config["model"]
    model["conditioning"]["configs"] = [
        model["conditioning"]["configs"][0],
        {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 256}},
    ]
    diffusion = model["diffusion"]
    diffusion.update(cross_attention_cond_ids=["prompt", "seconds_total"], global_cond_ids=["seconds_total"],
                     diffusion_objective="rf_denoiser")
    dit = diffusion["config"]
    del dit["project_cond_tokens"]  # default True: 768-wide T5 tokens projected to 1024
    dit.update(global_cond_dim=768, attn_kwargs={"qk_norm": "ln"})
    return config


STABLE_AUDIO_OPEN_SMALL = _small()

PRESETS: dict[str, dict[str, Any]] = {"stable-audio-open": STABLE_AUDIO_OPEN,
                                      "stable-audio-open-small": STABLE_AUDIO_OPEN_SMALL, "sao-mini": SAO_MINI,
                                      "sao-tiny": SAO_TINY}
# Hub repositories searched offline (Hugging Face cache) for a preset's weights.
HUB_REPOS: dict[str, str] = {"stable-audio-open": "stabilityai/stable-audio-open-1.0",
                             "stable-audio-open-small": "stabilityai/stable-audio-open-small"}


def model_names() -> list[str]:
    """Every name `--model` takes: these DiT presets and the UNet family's (exporter.models.unet_presets)."""
    from exporter.models import unet_presets

    return [*PRESETS, *unet_presets.PRESETS, *unet_presets.HUB_REPOS]


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise InputError(f"unknown model '{name}' (choose from: {', '.join(model_names())})")
    return copy.deepcopy(PRESETS[name])


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"model config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"model config {path} is not valid JSON: {exc}") from None
    from exporter.models.family import family_of

    family_of(config, str(path))  # refuses a config no family handles, saying why
    return config
