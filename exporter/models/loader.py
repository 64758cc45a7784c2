"""Build a Stable Audio Open-family model with stable-audio-tools' own factory and load its weights.

Weights come from a `WeightSource` (a stable-audio-tools checkpoint or a diffusers pipeline directory, given
or found offline in the Hugging Face cache) or, only when asked with `synthetic=True`, from `exporter.models.synthetic`,
which shapes seeded random weights so that a quantizer
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

from exporter.errors import InputError
from exporter.models import presets
from exporter.models.checkpoint import CKPT_NAMES, WeightSource, checkpoint_source, load_weights
from exporter.models.family import family_of
from exporter.models.t5 import T5Source, resolve_t5_source, t5_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger(__name__)

SAO_REPO = presets.HUB_REPOS["stable-audio-open"]


@dataclass
class ModelSpec:
    """What the user asked for; `load_model` turns it into a `LoadedModel`."""

    model: str = "sao-mini"
    model_config: str | None = None
    checkpoint: str | None = None
    t5: str | None = None
    t5_tokenizer: str | None = None  # a tokenizer directory apart from --t5 (a snapshot's tokenizer/)
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
    def family(self):
        """This model's family (objective, sampler defaults, conditioning layout; exporter.models.family)."""
        return family_of(self.config)

    @property
    def sample_rate(self) -> int:
        return int(self.config["sample_rate"])


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of what defines the network: the config's `model` section (and quadit's synthetic-T5
    shape, when present). A published model_config.json also carries `training` (and top-level sample
    fields); a calibration made from the preset must match an export made from that file."""
    keyed = {"model": config.get("model")}
    if "quadit" in config:
        keyed["quadit"] = config["quadit"]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def resolve_source(spec: ModelSpec) -> WeightSource:
    """The weights, from --checkpoint (a file, a snapshot directory, a diffusers StableAudioPipeline
    directory) or found offline in the Hugging Face cache under the preset's hub repository."""
    from exporter.models import diffusers_layout, hf_cache

    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if path.is_dir() and diffusers_layout.is_pipeline_dir(path):
            return diffusers_layout.pipeline_source(path)
        return checkpoint_source(path)
    repo = presets.HUB_REPOS.get(spec.model, presets.HUB_REPOS["stable-audio-open"])
    snap = hf_cache.find_snapshot([repo], ["|".join(CKPT_NAMES)])
    if snap is not None:
        return checkpoint_source(snap)
    snap = hf_cache.find_snapshot([repo], [diffusers_layout.MODEL_INDEX, "transformer/config.json"])
    if snap is not None:
        return diffusers_layout.pipeline_source(snap)
    raise InputError(
        f"no weights for {spec.model}: pass --checkpoint PATH (model.safetensors or model.ckpt with "
        f"model_config.json beside it, or a diffusers pipeline directory), put {repo} in the Hugging Face "
        f"cache, or run with --synthetic-weights")


def resolve_checkpoint(spec: ModelSpec) -> Path:
    """The checkpoint path (file or pipeline directory) `load_model` would read."""
    return resolve_source(spec).path


def _model_config(spec: ModelSpec, source: WeightSource | None) -> dict[str, Any]:
    """--model-config, else the config the weights carry, else the preset; checked by its family."""
    if spec.config is not None:
        family_of(spec.config)
        return copy.deepcopy(spec.config)
    if spec.model_config:
        return presets.load_config_file(Path(spec.model_config))
    if source is not None and source.config is not None:
        family_of(source.config, f"the model config of {source.path}")
        return copy.deepcopy(source.config)
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
        raise InputError(f"unknown model '{spec.model}' (choose from: {', '.join(presets.model_names())})")
    source = None
    if not spec.synthetic_weights:
        if spec.model in presets.SYNTHETIC_ONLY and not spec.checkpoint:
            raise InputError(f"{spec.model} has no published weights: run it with --synthetic-weights "
                             "(or give --checkpoint for a model trained with this config)")
        source = resolve_source(spec)
    config = _model_config(spec, source)
    state = None
    if source is not None:  # read (and so validate) the weights before the slow model build
        state = source.read_state(config)
        if not isinstance(state, dict) or not state:
            raise InputError(f"checkpoint {source.path} holds no state dict")
    overrides = config.get("quadit", {}).get("synthetic_t5", {})
    t5_name = [c for c in config["model"]["conditioning"]["configs"] if c["type"] == "t5"][0]["config"].get(
        "t5_model_name", "t5-base")
    bundled = (source.text_encoder, source.tokenizer) if source is not None and source.text_encoder else None
    t5 = resolve_t5_source(spec.t5, spec.synthetic_weights, spec.seed, overrides, name=t5_name, bundled=bundled,
                           tokenizer_dir=spec.t5_tokenizer)
    log.info("building %s (%s weights)", f"'{spec.model}' from {spec.model_config}" if spec.model_config else spec.model,
             "synthetic" if spec.synthetic_weights else "checkpoint")
    wrapper = build(config, t5, spec.seed)
    identity: dict[str, Any] = {"model": spec.model, "config_sha256": config_hash(config), "t5": t5.describe(),
                                "t5_source": t5.to_json()}
    if spec.synthetic_weights:
        from exporter.models.synthetic import shape_like_trained

        shape_like_trained(wrapper, seed=spec.seed)
        identity["weights"] = f"synthetic:{spec.seed}"
        identity["synthetic"] = True
    else:
        assert source is not None and state is not None
        load_weights(wrapper, source.adapt(wrapper, state), source.path)
        identity["weights"] = source.weights_id()
        # the path as the user (or the cache search) named it: a cache snapshot's symlink, not the blob
        identity["checkpoint"] = str(source.path.absolute())
        identity["layout"] = source.layout
        identity["synthetic"] = False
        from exporter.models import hf_cache

        snapshot = hf_cache.snapshot_info(source.path)
        if snapshot is not None:
            identity["hf_snapshot"] = snapshot
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
        source = identity.get("t5_source") or (  # manifests written before t5_source: "dir:<path>"
            {"path": identity["t5"].split(":", 1)[1]} if identity.get("t5", "").startswith("dir:") else {})
        spec = ModelSpec(model=identity["model"], checkpoint=identity.get("checkpoint"),
                         config=manifest["model_config"], t5=source.get("path"),
                         t5_tokenizer=source.get("tokenizer"))
    loaded = load_model(spec)
    for key in ("config_sha256", "weights"):
        if loaded.identity[key] != identity[key]:
            raise InputError(f"the PyTorch model rebuilt for this export differs from the exported one "
                             f"({key}: {loaded.identity[key][:24]} != {identity[key][:24]})")
    return loaded
