"""Build a Stable Audio Open-family model with stable-audio-tools' own factory and load its weights.

Weights come from a local checkpoint (or a Hugging Face cache snapshot, offline) or, only when asked
with `synthetic=True`, from `exporter.synthetic`, which shapes seeded random weights so that a quantizer
sees what it sees in a trained DiT. Random weights are never used silently.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.artifact import sha256_file
from exporter import presets
from exporter.errors import InputError
from exporter.t5 import T5Source, resolve_t5_source, t5_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger(__name__)

SAO_REPO = "stabilityai/stable-audio-open-1.0"
CKPT_NAMES = ("model.safetensors", "model.ckpt")


@dataclass
class ModelSpec:
    """What the user asked for; `load_model` turns it into a `LoadedModel`."""

    model: str = "sao-mini"
    model_config: str | None = None
    checkpoint: str | None = None
    t5: str | None = None
    synthetic_weights: bool = False
    seed: int = 0
    config: dict[str, Any] | None = None  # a config dict taking precedence over model/model_config


@dataclass
class LoadedModel:
    wrapper: Any  # stable_audio_tools ConditionedDiffusionModelWrapper
    config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def dit(self):
        """The DiffusionTransformer whose `_forward` is the exported DiT graph."""
        return self.wrapper.model.model

    @property
    def t5_conditioner(self):
        ids = [c["id"] for c in self.config["model"]["conditioning"]["configs"] if c["type"] == "t5"]
        return self.wrapper.conditioner.conditioners[ids[0]]

    @property
    def sample_rate(self) -> int:
        return int(self.config["sample_rate"])


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _find_in_hf_cache() -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in CKPT_NAMES:
        hit = try_to_load_from_cache(SAO_REPO, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def resolve_checkpoint(spec: ModelSpec) -> Path:
    """A checkpoint file, from --checkpoint (file or snapshot directory) or the HF cache."""
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if path.is_dir():
            found = [path / n for n in CKPT_NAMES if (path / n).is_file()]
            if not found:
                raise InputError(f"--checkpoint {path} holds neither {' nor '.join(CKPT_NAMES)}")
            path = found[0]
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        return path
    hit = _find_in_hf_cache()
    if hit is None:
        raise InputError(
            f"no weights for {spec.model}: pass --checkpoint PATH (model.safetensors or model.ckpt with "
            f"model_config.json beside it), put {SAO_REPO} in the Hugging Face cache, "
            f"or run with --synthetic-weights")
    return hit


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:  # safetensors/pickle/zip all raise their own types on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"checkpoint {path} is corrupt or unreadable: {first}") from None


def _load_weights(wrapper: Any, state: dict[str, Any], path: Path) -> None:
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


def _model_config(spec: ModelSpec, checkpoint: Path | None) -> dict[str, Any]:
    if spec.config is not None:
        presets.validate_sao_family(spec.config)
        return copy.deepcopy(spec.config)
    if spec.model_config:
        return presets.load_config_file(Path(spec.model_config))
    if checkpoint is not None and (checkpoint.parent / "model_config.json").is_file():
        return presets.load_config_file(checkpoint.parent / "model_config.json")
    return presets.preset_config(spec.model)


def build(config: dict[str, Any], t5: T5Source, seed: int) -> Any:
    """Construct the stable-audio-tools model (random init, seeded) with the T5 redirected."""
    import torch
    from stable_audio_tools.models.factory import create_model_from_config

    sat_config = {k: v for k, v in config.items() if k != "quadit"}
    with torch.random.fork_rng(), t5_source(t5):
        torch.manual_seed(seed)
        wrapper = create_model_from_config(copy.deepcopy(sat_config))
    wrapper.eval().requires_grad_(False)
    cond = wrapper.conditioner.conditioners
    for c in cond.values():
        if hasattr(c, "model") and hasattr(c, "tokenizer"):
            # T5Conditioner casts the encoder to fp16 for CUDA autocast. quadit runs and exports the text
            # encoder in fp32 (fp16 T5 on CPU is slow and overflows in T5's FF on some prompts); the
            # reference and the runtime share this object, so parity holds either way.
            c.model.float().eval()
    return wrapper


def load_model(spec: ModelSpec) -> LoadedModel:
    """The model the user asked for, with an identity record for every artifact's manifest."""
    if spec.model not in presets.PRESETS and not (spec.model_config or spec.config):
        raise InputError(f"unknown model '{spec.model}' (choose from: {', '.join(presets.PRESETS)})")
    checkpoint = None
    if not spec.synthetic_weights:
        if spec.model == "sao-mini" and not spec.checkpoint:
            raise InputError("sao-mini has no published weights: run it with --synthetic-weights "
                             "(or give --checkpoint for a model trained with this config)")
        checkpoint = resolve_checkpoint(spec)
    config = _model_config(spec, checkpoint)
    state = None
    if checkpoint is not None:  # read (and so validate) the checkpoint before the slow model build
        state = _read_state_dict(checkpoint)
        if not isinstance(state, dict) or not state:
            raise InputError(f"checkpoint {checkpoint} holds no state dict")
    overrides = config.get("quadit", {}).get("synthetic_t5", {})
    t5 = resolve_t5_source(spec.t5, spec.synthetic_weights, spec.seed, overrides)
    log.info("building %s (%s weights)", f"'{spec.model}' from {spec.model_config}" if spec.model_config else spec.model,
             "synthetic" if spec.synthetic_weights else "checkpoint")
    wrapper = build(config, t5, spec.seed)
    identity: dict[str, Any] = {"model": spec.model, "config_sha256": config_hash(config), "t5": t5.describe()}
    if spec.synthetic_weights:
        from exporter.synthetic import shape_like_trained

        shape_like_trained(wrapper, seed=spec.seed)
        identity["weights"] = f"synthetic:{spec.seed}"
        identity["synthetic"] = True
    else:
        assert checkpoint is not None and state is not None
        _load_weights(wrapper, state, checkpoint)
        identity["weights"] = f"sha256:{sha256_file(checkpoint)}"
        identity["checkpoint"] = str(checkpoint.resolve())
        identity["synthetic"] = False
    return LoadedModel(wrapper=wrapper, config=config, identity=identity)


def reload_from_identity(manifest: dict[str, Any]) -> LoadedModel:
    """Rebuild the PyTorch model an export was made from (for the reference backend), and check that it
    is the same model: config hash, and checkpoint sha256 or synthetic seed."""
    identity = manifest["model"]
    weights = identity["weights"]
    if weights.startswith("synthetic:"):
        spec = ModelSpec(model=identity["model"], synthetic_weights=True, seed=int(weights.split(":", 1)[1]),
                         config=manifest["model_config"])
    else:
        spec = ModelSpec(model=identity["model"], checkpoint=identity.get("checkpoint"),
                         config=manifest["model_config"],
                         t5=identity["t5"].split(":", 1)[1] if identity["t5"].startswith("dir:") else None)
    loaded = load_model(spec)
    for key in ("config_sha256", "weights"):
        if loaded.identity[key] != identity[key]:
            raise InputError(f"the PyTorch model rebuilt for this export differs from the exported one "
                             f"({key}: {loaded.identity[key][:24]} != {identity[key][:24]})")
    return loaded
