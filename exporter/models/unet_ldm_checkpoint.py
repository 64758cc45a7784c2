"""Read a Make-An-Audio style latent-diffusion checkpoint (`--model make-an-audio-mini --checkpoint FILE`).

The file is a `.ckpt` (`{"state_dict": ...}`, as Make-An-Audio's `maa1_caps.ckpt`) or a `.safetensors` with the
LatentDiffusion module tree's keys (`exporter.models.unet_ldm`). The preset's LDM yaml defines the architecture
(as the yaml beside a Make-An-Audio checkpoint does); the file supplies the weights:

- `model.diffusion_model.*` (required): the UNet, through diffusers' `convert_ldm_unet_checkpoint`;
- `first_stage_model.*` (when present): the KL autoencoder, through diffusers' `convert_ldm_vae_checkpoint`, and
  the `scale_factor` buffer (LatentDiffusion's `scale_by_std`) as the VAE's `scaling_factor`;
- `cond_stage_model.caption_encoder.*` (when present): the caption encoder (BERT + projection).

A component the file does not hold keeps the preset's seeded synthetic weights (`--seed`), always the vocoder
(Make-An-Audio ships it as a separate checkpoint); the manifest's model identity lists which components came
from the file and which are synthetic. Every key of a component the file holds must be used and every weight of
the module filled, else the file is refused with one line (a file of another size or layout).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from calibration.artifact import sha256_file
from exporter.errors import InputError
from exporter.models.unet_ldm import LDM_TEXT_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, convert_unet, convert_vae

log = logging.getLogger(__name__)
LAYOUT = "latent-diffusion"


def _load(module: Any, state: dict[str, Any], what: str, path: Path, used: int) -> None:
    """Strict load; `used` is how many of the file's keys the conversion kept (all of them, or refuse)."""
    if None in state.values():
        raise InputError(f"checkpoint {path}: the {what} keys are incomplete for this model's layout")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"checkpoint {path}: its {what} does not match the preset's config ({first})") from None
    if len(state) != used:
        raise InputError(f"checkpoint {path}: {used - len(state)} of its {what} keys have no place in this model")


def load_ldm_checkpoint(name: str, path: Path, seed: int) -> Any:
    """The preset `name` with the weights of the latent-diffusion file `path` (see the module docstring)."""
    from exporter.models.checkpoint import read_state_dict
    from exporter.models.unet_audio import build_preset
    from exporter.models.unet_synthetic import shape_like_trained

    if not path.is_file():
        raise InputError(f"--checkpoint {path} is not a file (a Make-An-Audio .ckpt / .safetensors is expected)")
    state = read_state_dict(path)
    if not isinstance(state, dict) or not any(str(k).startswith(LDM_UNET_PREFIX) for k in state):
        raise InputError(f"checkpoint {path} has no '{LDM_UNET_PREFIX}*' keys: not a latent-diffusion (Make-An-Audio) "
                         "checkpoint")
    model = build_preset(name, seed)
    shape_like_trained(model, seed)  # what the file does not hold stays as --synthetic-weights would make it
    loaded = ["unet"]
    unet_keys = sum(k.startswith(LDM_UNET_PREFIX) for k in state)
    _load(model.unet, convert_unet(state, dict(model.unet.config)), "UNet", path, unet_keys)
    vae_keys = [k for k in state if k.startswith(LDM_VAE_PREFIX)]
    if vae_keys:
        if any(".attn." in k and ".mid." not in k for k in vae_keys):
            raise InputError(f"checkpoint {path}: its autoencoder has attention outside the mid block (Make-An-Audio's "
                             "attn_resolutions), which diffusers' AutoencoderKL does not have")
        _load(model.vae, convert_vae(state, dict(model.vae.config)), "autoencoder", path,
              sum(not k.startswith(LDM_VAE_PREFIX + "loss.") for k in vae_keys))
        if "scale_factor" in state:
            model.vae.register_to_config(scaling_factor=float(state["scale_factor"]))
        loaded.append("vae")
    text = {k[len(LDM_TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_TEXT_PREFIX)}
    if text:
        _load(model.text_encoder, text, "caption encoder", path, len(text))
        loaded.append("text_encoder")
    synthetic = [c for c in ("unet", "vae", "text_encoder", "vocoder") if c not in loaded]
    log.info("%s: %s from %s; %s synthetic (seed %d)", name, ", ".join(loaded), path, ", ".join(synthetic), seed)
    model.identity = {"model": name, "family": model.family, "weights": "sha256:" + sha256_file(path),
                      "checkpoint": str(path.absolute()), "layout": LAYOUT, "synthetic": False, "seed": seed,
                      "from_checkpoint": loaded, "synthetic_components": synthetic}
    return model
