"""The diffusers layout of Stable Audio Open: what `StableAudioPipeline.save_pretrained` writes and what the
Hugging Face cache holds after `StableAudioPipeline.from_pretrained` (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, projection_model/, scheduler/).

quadit runs stable-audio-tools' classes, so this module derives the stable-audio-tools model config from the
component configs and renames the weights to stable-audio-tools' keys: the inverse of the key mapping in
diffusers' own conversion script (scripts/convert_stable_audio.py). Rules, per stable-audio-tools key:

- DiT (`model.model.*` <- `transformer/`): `transformer.layers.i` <- `transformer_blocks.i`; `self_attn`/
  `cross_attn` <- `attn1`/`attn2`; `pre_norm`/`cross_attend_norm`/`ff_norm` <- `norm1`/`norm2`/`norm3` with
  LayerNorm `gamma`/`beta` <- `weight`/`bias`; `to_out` <- `to_out.0`; `ff.ff` <- `ff.net`; the fused
  `to_qkv` <- concat(`to_q`, `to_k`, `to_v`) and `to_kv` <- concat(`to_k`, `to_v`) along the output dim;
  `transformer.project_in/out` <- `proj_in/out`; `to_timestep_embed` <- `timestep_proj`;
  `timestep_features` [F, 1] <- `time_proj` [F]; `to_global_embed` <- `global_proj`; `to_cond_embed` <-
  `cross_attention_proj`; the pre/post 1x1 convolutions keep their names.
- Number conditioners (`conditioner.conditioners.{seconds_start,seconds_total}.embedder.embedding.*` <-
  `projection_model/{start,end}_number_conditioner.time_positional_embedding.*`); the T5 conditioner's
  `proj_out` <- `text_projection` when the widths differ (an identity otherwise).
- Oobleck VAE (`pretransform.model.*` <- `vae/`): `{en,de}coder.layers.0` <- `conv1`; `layers.k` for the
  k-th block (1..n) <- `block.(k-1)` with the block's inner layers: encoder res units 0-2 <- `res_unit1-3`,
  3 <- `snake1`, 4 <- `conv1`; decoder 0 <- `snake1`, 1 <- `conv_t1`, 2-4 <- `res_unit1-3`; inside a residual
  unit 0/1/2/3 <- `snake1`/`conv1`/`snake2`/`conv2`; `layers.(n+1)` <- `snake1`, `layers.(n+2)` <- `conv2`;
  snake `alpha`/`beta` [C] <- [1, C, 1].
- Buffers with no diffusers counterpart (rotary `inv_freq`, bias-free LayerNorm `beta`) keep the values
  stable-audio-tools' constructor gives them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

from calibration.artifact import sha256_file
from exporter.errors import InputError
from exporter.models.checkpoint import WeightSource

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
COMPONENTS = ("transformer", "vae", "projection_model", "text_encoder", "tokenizer")
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.bin")
T5_NAMES = {512: "t5-small", 768: "t5-base", 1024: "t5-large"}  # stable-audio-tools' names by width


def is_pipeline_dir(path: Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"diffusers pipeline {path.parent.parent} is incomplete: {path.parent.name}/{path.name} "
                         "is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def _weight_files(component: Path) -> list[Path]:
    for name in _WEIGHTS:
        path = component / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(_json(path).get("weight_map", {}).values()))
                return [component / s for s in shards]
            return [path]
    raise InputError(f"diffusers pipeline {component.parent} has no weights in {component.name}/ "
                     f"(looked for {', '.join(_WEIGHTS)})")


def _read(files: list[Path]) -> dict[str, Any]:
    import torch

    from exporter.models.checkpoint import is_safetensors

    state: dict[str, Any] = {}
    for path in files:
        try:
            if is_safetensors(path):
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(str(path), map_location="cpu", weights_only=True))
        except Exception as exc:  # safetensors/pickle/zip raise their own types on a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"weights {path} are corrupt or unreadable: {first}") from None
    return state


def derive_config(root: Path) -> dict[str, Any]:
    """The stable-audio-tools `model_config.json` equivalent of a diffusers Stable Audio pipeline."""
    t = _json(root / "transformer" / "config.json")
    v = _json(root / "vae" / "config.json")
    p = _json(root / "projection_model" / "config.json")
    te = _json(root / "text_encoder" / "config.json")
    tok_cfg = root / "tokenizer" / "tokenizer_config.json"
    tok = _json(tok_cfg) if tok_cfg.is_file() else {}

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise InputError(f"diffusers pipeline {root} is not one quadit can map to stable-audio-tools: {what}")

    head, heads = int(t["attention_head_dim"]), int(t["num_attention_heads"])
    embed = head * heads
    cross_in, cross = int(t["cross_attention_input_dim"]), int(t["cross_attention_dim"])
    need(cross in (cross_in, embed), f"cross_attention_dim {cross} is neither the input width {cross_in} nor {embed}")
    need(int(t["num_key_value_attention_heads"]) * head == cross,
         f"num_key_value_attention_heads x attention_head_dim != cross_attention_dim ({cross})")
    need(int(t.get("time_proj_dim", 256)) == 256, "time_proj_dim must be 256 (stable-audio-tools' Fourier features)")
    need(int(t["in_channels"]) == int(t["out_channels"]), "in_channels != out_channels")
    latent = int(v["decoder_input_channels"])
    need(int(v["encoder_hidden_size"]) == 2 * latent,
         f"the VAE encoder writes {v['encoder_hidden_size']} channels, not mean and scale of {latent} latents")
    strides, mults = list(v["downsampling_ratios"]), list(v["channel_multiples"])
    ratio = int(math.prod(strides))
    cond_dim = int(p["conditioning_dim"])
    need(int(t["global_states_input_dim"]) == 2 * cond_dim, "global conditioning is not seconds_start + seconds_total")
    width = int(te["d_model"])
    need(width in T5_NAMES and int(p["text_encoder_dim"]) == width, f"text encoder width {width} is not a T5's")
    max_length = int(tok.get("model_max_length", 128))
    max_length = max_length if 0 < max_length <= 4096 else 128  # transformers writes 1e30 when unset
    number = {"min_val": p["min_value"], "max_val": p["max_value"]}
    common = {"channels": None, "c_mults": mults, "strides": strides, "use_snake": True}
    return {
        "model_type": "diffusion_cond",
        "sample_size": int(t["sample_size"]) * ratio,
        "sample_rate": int(v.get("sampling_rate", 44100)),
        "audio_channels": int(v.get("audio_channels", 2)),
        "model": {
            "pretransform": {"type": "autoencoder", "iterate_batch": True, "config": {
                "encoder": {"type": "oobleck", "requires_grad": False, "config": {
                    **common, "channels": int(v["encoder_hidden_size"]), "in_channels": int(v.get("audio_channels", 2)),
                    "latent_dim": 2 * latent}},
                "decoder": {"type": "oobleck", "config": {
                    **common, "channels": int(v["decoder_channels"]), "out_channels": int(v.get("audio_channels", 2)),
                    "latent_dim": latent, "final_tanh": False}},
                "bottleneck": {"type": "vae"}, "latent_dim": latent, "downsampling_ratio": ratio,
                "io_channels": int(v.get("audio_channels", 2))}},
            "conditioning": {"configs": [
                {"id": "prompt", "type": "t5", "config": {"t5_model_name": T5_NAMES[width], "max_length": max_length}},
                {"id": "seconds_start", "type": "number", "config": dict(number)},
                {"id": "seconds_total", "type": "number", "config": dict(number)},
            ], "cond_dim": cond_dim},
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                "global_cond_ids": ["seconds_start", "seconds_total"],
                "type": "dit",
                "config": {"io_channels": int(t["in_channels"]), "embed_dim": embed, "depth": int(t["num_layers"]),
                           "num_heads": heads, "cond_token_dim": cross_in, "global_cond_dim": 2 * cond_dim,
                           "project_cond_tokens": cross != cross_in,
                           "transformer_type": "continuous_transformer"},
            },
            "io_channels": int(t["in_channels"]),
        },
    }


# --- weight names -------------------------------------------------------------------------------------
_DIT_RENAMES = (("transformer.layers.", "transformer_blocks."), ("self_attn.", "attn1."), ("cross_attn.", "attn2."),
                ("pre_norm.", "norm1."), ("cross_attend_norm.", "norm2."), ("ff_norm.", "norm3."),
                ("ff.ff.", "ff.net."), (".to_out.", ".to_out.0."), ("transformer.project_in.", "proj_in."),
                ("transformer.project_out.", "proj_out."), ("to_timestep_embed.", "timestep_proj."),
                ("timestep_features.", "time_proj."), ("to_global_embed.", "global_proj."),
                ("to_cond_embed.", "cross_attention_proj."))


def _dit_sources(key: str) -> tuple[list[str], Callable[[list[Any]], Any]]:
    name = key
    for old, new in _DIT_RENAMES:
        name = name.replace(old, new)
    if re.search(r"norm[123]\.(gamma|beta)$", name):
        name = name[: -len("gamma")] + "weight" if name.endswith("gamma") else name[: -len("beta")] + "bias"
    if name.endswith("to_qkv.weight"):
        stem = name[: -len("to_qkv.weight")]
        return [f"{stem}to_q.weight", f"{stem}to_k.weight", f"{stem}to_v.weight"], _cat
    if name.endswith("to_kv.weight"):
        stem = name[: -len("to_kv.weight")]
        return [f"{stem}to_k.weight", f"{stem}to_v.weight"], _cat
    if name == "time_proj.weight":
        return [name], lambda ts: ts[0].unsqueeze(1)
    return [name], lambda ts: ts[0]


def _cat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat(tensors, dim=0)


def _vae_sources(key: str, blocks: int) -> tuple[list[str], Callable[[list[Any]], Any]]:
    m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
    if m is None:
        return [key], lambda ts: ts[0]
    part, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if index == 0:
        name = f"{part}.conv1.{rest}"
    elif index == blocks + 1:
        name = f"{part}.snake1.{rest}"
    elif index == blocks + 2:
        name = f"{part}.conv2.{rest}"
    else:
        inner = re.match(r"layers\.(\d+)\.(.*)$", rest)
        if inner is None:
            return [key], lambda ts: ts[0]
        j, tail = int(inner.group(1)), inner.group(2)
        if part == "encoder":
            piece = f"res_unit{j + 1}" if j < 3 else ("snake1" if j == 3 else "conv1")
        else:
            piece = "snake1" if j == 0 else ("conv_t1" if j == 1 else f"res_unit{j - 1}")
        unit = re.match(r"layers\.(\d+)\.(.*)$", tail)
        if piece.startswith("res_unit") and unit is not None:
            tail = f"{('snake1', 'conv1', 'snake2', 'conv2')[int(unit.group(1))]}.{unit.group(2)}"
        name = f"{part}.block.{index - 1}.{piece}.{tail}"
    if name.endswith((".alpha", ".beta")):
        return [name], lambda ts: ts[0].reshape(-1)
    return [name], lambda ts: ts[0]


def _number_sources(key: str) -> tuple[list[str], Callable[[list[Any]], Any]]:
    name = key.replace("seconds_start.", "start_number_conditioner.").replace(
        "seconds_total.", "end_number_conditioner.").replace("embedder.embedding.", "time_positional_embedding.")
    name = re.sub(r"^prompt\.proj_out\.", "text_projection.", name)
    return [name], lambda ts: ts[0]


def to_stable_audio_tools(template: dict[str, Any], buffers: set[str], parts: dict[str, dict[str, Any]],
                          blocks: int, where: Path) -> dict[str, Any]:
    """stable-audio-tools' state dict (keys and shapes of `template`) from the diffusers component state
    dicts `parts` (transformer, vae, projection_model)."""
    out: dict[str, Any] = {}
    missing: list[str] = []
    used = {name: set() for name in parts}
    routes = (("model.model.", "transformer", _dit_sources), ("pretransform.model.", "vae",
              lambda k: _vae_sources(k, blocks)), ("conditioner.conditioners.", "projection_model", _number_sources))
    for key, like in template.items():
        route = next(((p, c, f) for p, c, f in routes if key.startswith(p)), None)
        if route is None:
            continue  # nothing of the wrapper lives elsewhere; load_weights reports it if it did
        prefix, component, sources = route
        names, combine = sources(key[len(prefix):])
        if all(n in parts[component] for n in names):
            value = combine([parts[component][n] for n in names])
            if tuple(value.shape) != tuple(like.shape):
                raise InputError(f"diffusers pipeline {where}: {component}/{names[0]} has shape {tuple(value.shape)}, "
                                 f"stable-audio-tools' {key} needs {tuple(like.shape)}")
            out[key] = value.to(like.dtype)
            used[component].update(names)
        elif key in buffers:
            out[key] = like
        else:
            missing.append(f"{component}/{names[0]}")
    unused = [f"{c}/{k}" for c, state in parts.items() for k in state if k not in used[c]]
    if missing or unused:
        raise InputError(f"diffusers pipeline {where} does not match the derived config: {len(missing)} weights "
                         f"missing (e.g. {missing[:2]}), {len(unused)} unused (e.g. {unused[:2]})")
    return out


def pipeline_source(path: Path) -> WeightSource:
    """A StableAudioPipeline directory (or cache snapshot) as a weight source for the loader."""
    root = Path(path)
    index = _json(root / MODEL_INDEX)
    absent = [c for c in COMPONENTS if not (root / c).is_dir()]
    if absent:
        raise InputError(f"diffusers pipeline {root} lacks {', '.join(c + '/' for c in absent)}")
    if index.get("_class_name") not in (None, "StableAudioPipeline"):
        raise InputError(f"{root}/{MODEL_INDEX} names {index.get('_class_name')}, not a StableAudioPipeline")
    files = {c: _weight_files(root / c) for c in ("transformer", "vae", "projection_model")}
    config = derive_config(root)

    def read_state(model_config: dict[str, Any]) -> dict[str, Any]:
        parts = {c: _read(f) for c, f in files.items()}
        return {"__diffusers__": parts, "__config__": model_config}  # renamed once the model exists

    def weights_id() -> str:
        listing = {str(f.relative_to(root)): sha256_file(f) for fs in files.values() for f in fs}
        return "sha256:" + hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()

    blocks = len(config["model"]["pretransform"]["config"]["decoder"]["config"]["c_mults"])

    def adapt(wrapper: Any, state: dict[str, Any]) -> dict[str, Any]:
        template = wrapper.state_dict()
        buffers = {name for name, _ in wrapper.named_buffers()}
        return to_stable_audio_tools(template, buffers, state["__diffusers__"], blocks, root)

    return WeightSource("diffusers", root, config, read_state, weights_id, root / "text_encoder", root / "tokenizer",
                        adapt=adapt)
