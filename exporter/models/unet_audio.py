"""The UNet audio family (AudioLDM, TANGO): build from a preset, load or save a diffusers-layout directory.

A diffusers directory (`model_index.json` with `unet/`, `vae/`, `vocoder/`, `text_encoder/`, `tokenizer/`,
`scheduler/`) is read with each class's own `from_pretrained(local_files_only=True)`; `_class_name`
`AudioLDMPipeline` is AudioLDM as diffusers publishes it (cvssp/audioldm-*), `TangoPipeline` is quadit's
name for TANGO's components in the same layout (declare-lab publishes TANGO as `main_config.json` +
`pytorch_model_main.bin`, which this module does not read). The text path follows the pipelines exactly:
AudioLDM tokenizes to the tokenizer's `model_max_length`, takes CLAP's `text_embeds` and L2-normalises them;
TANGO takes the T5 encoder's `last_hidden_state` and its padding mask. Nothing is downloaded.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import InputError
from exporter.models import unet_presets

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
COMPONENTS = ("unet", "vae", "vocoder", "text_encoder", "tokenizer", "scheduler")


@dataclass
class UNetAudioModel:
    """The components of one UNet audio pipeline, in eval mode, float32, gradients off."""

    family: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    vocoder: Any
    scheduler_config: dict[str, Any]
    defaults: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_down_factor(self) -> int:
        """The UNet's total down-sampling (2 per down block but the last): its latent frames divide by it."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def mel_bins(self) -> int:
        return int(self.vocoder.config.model_in_dim)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_seconds(self) -> float:
        """Seconds per mel frame: the vocoder's total upsampling over its sample rate (AudioLDM: 160/16000)."""
        return math.prod(self.vocoder.config.upsample_rates) / self.sample_rate

    @property
    def text_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def dims(self) -> dict[str, Any]:
        """What the runtime needs besides the graphs (the manifest's `dims`)."""
        unet = self.unet.config
        default_seconds = unet.sample_size * self.vae_scale * self.hop_seconds
        out = {"latent_channels": int(unet.in_channels), "vae_scale": self.vae_scale, "mel_bins": self.mel_bins,
               "sample_rate": self.sample_rate, "hop_seconds": self.hop_seconds, "text_length": self.text_length,
               "latent_frame_multiple": self.unet_down_factor,
               "default_seconds": round(default_seconds, 4), "max_seconds": round(4 * default_seconds, 4)}
        if self.family == "audioldm":
            out["text_embed_dim"] = int(self.text_encoder.config.projection_dim)
        elif self.family == "make-an-audio":
            out["text_hidden_dim"] = int(self.text_encoder.config.projection_dim)
        else:
            out["text_hidden_dim"] = int(self.text_encoder.config.d_model)
        return out


def config_sha256(model: UNetAudioModel) -> str:
    """sha256 over the component configs: what defines the networks (a calibration must match it)."""
    configs = {"family": model.family, "unet": dict(model.unet.config), "vae": dict(model.vae.config),
               "vocoder": model.vocoder.config.to_dict(), "text_encoder": model.text_encoder.config.to_dict(),
               "scheduler": model.scheduler_config}
    # bookkeeping keys say nothing about the network, and diffusers' `_use_default_values` is a list made from
    # a set (its order changes between processes)
    for name, c in list(configs.items()):
        if isinstance(c, dict):
            configs[name] = {k: v for k, v in c.items()
                             if not k.startswith("_") or name == "scheduler" and k == "_class_name"}
            configs[name].pop("transformers_version", None)
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer(spec: dict[str, Any]) -> Any:
    from transformers import ByT5Tokenizer

    if spec["type"] != "byt5":
        raise InputError(f"unknown tokenizer type {spec['type']!r} in the preset")
    return ByT5Tokenizer(model_max_length=int(spec["model_max_length"]))


def _text_encoder(spec: dict[str, Any]) -> Any:
    from transformers import ClapTextConfig, ClapTextModelWithProjection, T5Config, T5EncoderModel

    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] == "clap":
        return ClapTextModelWithProjection(ClapTextConfig(**kwargs))
    if spec["type"] == "t5":
        return T5EncoderModel(T5Config(is_encoder_decoder=False, use_cache=False, **kwargs))
    if spec["type"] == "clap-caption":
        from exporter.models.unet_ldm import build_caption_encoder

        return build_caption_encoder(spec)
    raise InputError(f"unknown text encoder type {spec['type']!r} in the preset")


def _eval(model: UNetAudioModel) -> UNetAudioModel:
    for m in (model.text_encoder, model.unet, model.vae, model.vocoder):
        m.float().eval().requires_grad_(False)
    return model


def build_preset(name: str, seed: int) -> UNetAudioModel:
    """The preset's components from the real classes, seeded random init (shaped by `unet_synthetic`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    cfg = unet_presets.preset(name)
    if "ldm" in cfg:  # Make-An-Audio: the diffusers configs from the LDM yaml, by diffusers' converters
        from exporter.models.unet_ldm import unet_config_from_ldm, vae_config_from_ldm

        cfg["unet"] = unet_config_from_ldm(cfg["ldm"], cfg["image_size"])
        cfg["vae"] = vae_config_from_ldm(cfg["ldm"], cfg["image_size"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UNetAudioModel(
            family=cfg["family"], tokenizer=_tokenizer(cfg["tokenizer"]), text_encoder=_text_encoder(cfg["text_encoder"]),
            unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]),
            vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**cfg["vocoder"])),
            scheduler_config=copy.deepcopy(cfg["scheduler"]), defaults=dict(cfg["defaults"]))
    return _eval(model)


def is_pipeline_dir(path: Path) -> bool:
    """A diffusers directory of a UNet audio pipeline quadit reads (AudioLDMPipeline, TangoPipeline)."""
    index = Path(path) / MODEL_INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") in unet_presets.PIPELINE_CLASSES
    except (ValueError, UnicodeDecodeError):
        return False


def _directory_sha256(path: Path) -> str:
    """sha256 over the weight files of a pipeline directory (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")):
        digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_pipeline_dir(path: Path) -> UNetAudioModel:
    """Every component of a diffusers UNet audio pipeline directory, offline; InputError naming what is
    missing or unreadable."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, ClapTextModelWithProjection, SpeechT5HifiGan, T5EncoderModel

    path = Path(path)
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path / MODEL_INDEX} cannot be read: {exc}") from None
    family = unet_presets.PIPELINE_CLASSES.get(index.get("_class_name"))
    if family is None:
        raise InputError(f"{path} holds a {index.get('_class_name')}, not one of: {', '.join(unet_presets.PIPELINE_CLASSES)}")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise InputError(f"{path} ({index['_class_name']}) lacks component folder(s): {', '.join(missing)}")
    text_cls = ClapTextModelWithProjection if family == "audioldm" else T5EncoderModel
    # diffusers' default low_cpu_mem_usage needs `accelerate` and warns over several lines without it
    plain = {"low_cpu_mem_usage": False}
    loaders = {"unet": (UNet2DConditionModel, plain), "vae": (AutoencoderKL, plain), "vocoder": (SpeechT5HifiGan, {}),
               "text_encoder": (text_cls, {}), "tokenizer": (AutoTokenizer, {})}
    parts: dict[str, Any] = {}
    for name, (cls, kwargs) in loaders.items():
        try:
            parts[name] = cls.from_pretrained(str(path / name), local_files_only=True, **kwargs)
        except Exception as exc:  # the libraries raise OSError, ValueError, EnvironmentError, safetensors errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"{path / name} cannot be loaded as {cls.__name__}: {first}") from None
    try:
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'scheduler'}: no readable scheduler_config.json ({exc})") from None
    defaults = dict(unet_presets.FAMILY_DEFAULTS[family])
    defaults.update(index.get("_quadit_defaults", {}))
    model = UNetAudioModel(family=family, scheduler_config=scheduler, defaults=defaults, **parts)
    return _eval(model)


def save_pipeline_dir(model: UNetAudioModel, out: Path) -> None:
    """Write `model` as a diffusers-layout directory (the classes' own `save_pretrained`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    for name in ("unet", "vae", "vocoder", "text_encoder", "tokenizer"):
        getattr(model, name).save_pretrained(str(out / name))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    cls = {v: k for k, v in unet_presets.PIPELINE_CLASSES.items()}[model.family]
    text_cls = "ClapTextModelWithProjection" if model.family == "audioldm" else "T5EncoderModel"
    index = {"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "vocoder": ["transformers", "SpeechT5HifiGan"], "text_encoder": ["transformers", text_cls],
             "tokenizer": ["transformers", type(model.tokenizer).__name__],
             "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "DDIMScheduler")],
             "_quadit_defaults": model.defaults}
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2))


def load_unet_model(name: str, checkpoint: str | None, synthetic: bool, seed: int) -> UNetAudioModel:
    """The model a command names: a `-mini` preset with synthetic weights, a pipeline directory, or a
    published preset found offline in the Hugging Face cache."""
    from exporter.models import hf_cache

    if synthetic:
        if name not in unet_presets.PRESETS:
            raise InputError(f"--synthetic-weights builds a preset ({', '.join(unet_presets.PRESETS)}), not '{name}'")
        from exporter.models.unet_synthetic import shape_like_trained

        model = build_preset(name, seed)
        shape_like_trained(model, seed)
        model.identity = {"model": name, "family": model.family, "weights": f"synthetic:{seed}", "synthetic": True}
    elif checkpoint and unet_presets.PRESETS.get(name, {}).get("ldm"):
        from exporter.models.unet_ldm_checkpoint import load_ldm_checkpoint

        model = load_ldm_checkpoint(name, Path(checkpoint), seed)
    else:
        if checkpoint:
            path = Path(checkpoint)
            if not path.is_dir() or not is_pipeline_dir(path):
                raise InputError(f"--checkpoint {checkpoint} is not a diffusers AudioLDMPipeline/TangoPipeline "
                                 "directory (model_index.json)")
        elif name in unet_presets.PRESETS:
            raise InputError(f"{name} has no published weights: run it with --synthetic-weights")
        else:
            repo = unet_presets.HUB_REPOS[name]
            path = hf_cache.find_snapshot([repo], [MODEL_INDEX, "unet/config.json"])
            if path is None:
                raise InputError(f"no weights for {name}: pass --checkpoint DIR (a diffusers pipeline directory) or "
                                 f"put {repo} in the Hugging Face cache {hf_cache.cache_root()}")
        model = load_pipeline_dir(path)
        model.identity = {"model": name, "family": model.family, "weights": "sha256:" + _directory_sha256(path),
                          "checkpoint": str(Path(path).absolute()), "layout": "diffusers", "synthetic": False}
        snapshot = hf_cache.snapshot_info(path)
        if snapshot is not None:
            model.identity["hf_snapshot"] = snapshot
    model.identity["config_sha256"] = config_sha256(model)
    return model


def reload_from_identity(manifest: dict[str, Any]) -> UNetAudioModel:
    """The PyTorch model an export was made from (the reference backend); refuses one that differs."""
    identity = manifest["model"]
    weights = identity["weights"]
    synthetic = weights.startswith("synthetic:")
    model = load_unet_model(identity["model"], identity.get("checkpoint"), synthetic,
                            int(weights.split(":", 1)[1]) if synthetic else int(identity.get("seed", 0)))
    for key in ("config_sha256", "weights"):
        if model.identity[key] != identity[key]:
            raise InputError(f"the PyTorch model rebuilt for this export differs from the exported one "
                             f"({key}: {model.identity[key][:24]} != {identity[key][:24]})")
    return model
