"""The UNet family's calibration artifact on disk: `quadit calibrate --model audioldm-mini ... --out DIR` writes it,
`quadit export --scheme w8a8 --calibration DIR` quantizes from it instead of calibrating again.

The files are the DiT artifact's (`calibration/artifact.py`: `calibration.json` + `calibration.safetensors`, the
schema version, the tensors' sha256 and the artifact's own hash), with `family: "unet"`. The metadata holds the
model identity (preset, config sha256, weights hash or synthetic seed), the scheduler config, the settings, the
bucket edges, the prompt list and its hash, each layer's name, kind and input width, and `statistics`: which
fields of `engines.calibrate.unet.UNetCalibration` the tensors hold. Every per-layer field of that object
(`ch_absmax` [K, C]; `xtx` when second moments were collected; whatever per-layer statistics it gains later) is
stored as `<layer>.<field>` and read back into the same field, so the artifact stores whatever the statistics
object holds without this module naming each one.

Reading refuses, with one line (exit 2), an artifact that is missing or corrupt, of another schema, of the other
family, or made for another model (identity) or other layer shapes (`calibration.artifact.check_matches`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from calibration import artifact
from calibration.artifact import ArtifactError, prompts_hash
from engines.calibrate.unet import UNetCalibration, UNetCalibrationSettings, calibrate_unet
from exporter.errors import InputError
from exporter.models.unet_layers import quantizable_unet_layers

log = logging.getLogger(__name__)
FAMILY = "unet"
# UNetCalibration fields that are not per-layer statistics of the whole run (a selection study's scratch)
_NOT_STORED = ("samples", "full")


def _per_layer_fields(calibration: UNetCalibration, layers: Sequence[str]) -> list[str]:
    """The fields of `calibration` that map (some) layer names to arrays."""
    names = set(layers)
    out = []
    for f in dataclasses.fields(calibration):
        value = getattr(calibration, f.name)
        if f.name in _NOT_STORED or not isinstance(value, dict) or not value:
            continue
        if set(value) <= names and all(isinstance(v, (np.ndarray, torch.Tensor)) for v in value.values()):
            out.append(f.name)
    return out


def layer_widths(unet: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {kind, channels} of each quantized layer (what an artifact must match)."""
    return {name: {"kind": "Conv" if isinstance(m, nn.Conv2d) else "Linear",
                   "channels": int(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)}
            for name, m in quantizable_unet_layers(unet)}


def write_unet_artifact(directory: Path, model: Any, calibration: UNetCalibration, prompts: Sequence[str],
                        settings: UNetCalibrationSettings, prompt_source: str = "seed") -> dict[str, Any]:
    """Write the artifact into `directory` (the caller makes it atomic); returns its metadata."""
    widths = layer_widths(model.unet)
    fields = _per_layer_fields(calibration, list(widths))
    tensors = {f"{layer}.{name}": torch.as_tensor(np.asarray(value)).float().contiguous()
               for name in fields for layer, value in getattr(calibration, name).items()}
    meta = {"family": FAMILY, "model": {k: v for k, v in model.identity.items()},
            "scheduler_config": model.scheduler_config, "settings": dataclasses.asdict(settings),
            "buckets": {"edges": list(calibration.edges), "by": "step"},
            "prompts": {"source": prompt_source, "list": list(prompts), "sha256": prompts_hash(list(prompts))},
            "layers": [{"name": n, **w} for n, w in widths.items()],
            "statistics": {name: {"tensor": f"<layer>.{name}"} for name in fields},
            "summary": calibration.summary}
    return artifact.write(Path(directory), meta, tensors)


def read_unet_artifact(directory: Path, model: Any) -> tuple[UNetCalibration, list[str], dict[str, Any]]:
    """The statistics, prompts and metadata of an artifact made for `model`; InputError (one line) otherwise."""
    try:
        meta, tensors = artifact.read(Path(directory))
        if meta.get("family") != FAMILY:
            raise ArtifactError(f"calibration artifact {directory} is of the {meta.get('family', 'DiT')} family, "
                                "not a UNet's: re-run quadit calibrate for this model")
        widths = layer_widths(model.unet)
        artifact.check_matches(meta, model.identity, {n: w["channels"] for n, w in widths.items()})
    except ArtifactError as exc:
        raise InputError(str(exc)) from None
    known = {f.name for f in dataclasses.fields(UNetCalibration)}
    fields: dict[str, dict[str, np.ndarray]] = {}
    for name in meta["statistics"]:
        if name not in known:
            raise InputError(f"calibration artifact {directory} holds '{name}' statistics this quadit does not read")
        fields[name] = {layer: tensors[f"{layer}.{name}"].double().numpy() for layer in widths
                        if f"{layer}.{name}" in tensors}
    ch = fields.pop("ch_absmax", {})
    if len(ch) != len(widths):
        raise InputError(f"calibration artifact {directory} lacks channel statistics for "
                         f"{len(widths) - len(ch)} of {len(widths)} layers")
    summary = {**meta["summary"], "artifact": str(Path(directory).absolute()), "artifact_sha256": meta["artifact_sha256"]}
    calibration = UNetCalibration(tuple(meta["buckets"]["edges"]), ch, summary, **fields)
    return calibration, list(meta["prompts"]["list"]), meta


def calibrate_command(args: argparse.Namespace) -> int:
    """`quadit calibrate` for a UNet-family model (see the module docstring); the DiT-only options are refused."""
    from calibration.prompts import select_prompts
    from exporter.models.cli_args import unet_model_name
    from exporter.models.unet_audio import load_unet_model
    from exporter.onnx.artifacts import atomic_dir

    dit_only = {"selection": "all", "budget": 0, "device": "cpu", "bucket_by": "step", "t5": None}
    for name, default in dit_only.items():
        if getattr(args, name, default) != default:
            raise InputError(f"--{name.replace('_', '-')} is not available for UNet-family calibration")
    if args.num_prompts < 1:
        raise InputError("--num-prompts must be >= 1")
    try:
        prompts = select_prompts(args.prompts, args.num_prompts, seed=args.calib_seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    model = load_unet_model(unet_model_name(args), args.checkpoint, args.synthetic_weights, args.seed)
    dims = model.dims()
    settings = UNetCalibrationSettings(steps=args.steps, buckets=args.buckets, cfg_scale=args.cfg_scale,
                                       seed=args.calib_seed,
                                       seconds=float(args.seconds if args.seconds is not None else dims["default_seconds"]))
    from exporter.models.unet_sampling import check_seconds

    check_seconds(dims, settings.seconds)
    calibration = calibrate_unet(model, prompts, settings, second_moments=not args.no_second_moments)
    with atomic_dir(Path(args.out)) as tmp:
        meta = write_unet_artifact(tmp, model, calibration, prompts, settings, prompt_source=args.prompts)
    summary = calibration.summary
    log.info("UNet calibration artifact in %s: %d layers (%d Conv2d), %d buckets, median range growth %.2fx",
             args.out, summary["layers"], summary["convs"], len(calibration.edges) - 1, summary["range_growth_median"])
    print(json.dumps({"out": str(Path(args.out).resolve()), "family": FAMILY, "artifact_sha256": meta["artifact_sha256"],
                      "layers": summary["layers"], "statistics": sorted(meta["statistics"]),
                      "range_growth_median": summary["range_growth_median"],
                      "layers_with_outliers": summary["layers_with_outliers"]}))
    return 0
