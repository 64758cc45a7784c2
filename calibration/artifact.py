"""The calibration artifact: `calibration.json` (metadata) + `calibration.safetensors` (statistics).

Tensor layout, per quantizable layer `<layer>` (named relative to the DiT, in ONNX graph order):
  `<layer>.ch_absmax` [K, C_in] float32   per-bucket, per-input-channel abs-max
  `<layer>.absmax`    [K] float32         per-bucket per-tensor abs-max
  `<layer>.pctl`      [K, P] float32      per-bucket |x| percentiles (`observer.percentiles` in the JSON)
  `<layer>.hist`      [K, NB] int64       per-bucket log2 histogram of |x| (mergeable, exact counts)
  `<layer>.step_absmax` [S] float32       per-step abs-max (range growth along the trajectory)
and per probe `probe.<module>.{min,max,median,median_sum,median_count}` [S] and `.snapshot` [T, C].
Buckets are descending edges in `t` (see `BucketSpec`); K = len(edges) - 1.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

SCHEMA_VERSION = 1
JSON_NAME = "calibration.json"
TENSORS_NAME = "calibration.safetensors"
IDENTITY_KEYS = ("model", "config_sha256", "weights")


class ArtifactError(ValueError):
    """A calibration artifact that is missing, corrupt, or belongs to another model or graph."""


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed (checkpoints and external data run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def write(directory: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write both files into `directory` (the caller makes it atomic); returns the final metadata."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(dict(tensors), str(directory / TENSORS_NAME))
    meta = {"schema_version": SCHEMA_VERSION, "kind": "quadit-calibration", **meta,
            "tensors": {"file": TENSORS_NAME, "sha256": sha256_file(directory / TENSORS_NAME)}}
    meta["artifact_sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    (directory / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_versioned_json(path: Path, version: int, what: str) -> dict[str, Any]:
    """A stage's JSON file, refused (one line) when missing, not JSON, or of another schema version."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not {what} (no {path.name})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != version:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise ArtifactError(f"{path} has schema version {found}, this quadit reads {version}: re-create it")
    return data


def read(directory: Path, verify_hash: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_versioned_json(directory / JSON_NAME, SCHEMA_VERSION, "a calibration artifact")
    tensors_path = directory / TENSORS_NAME
    if not tensors_path.is_file():
        raise ArtifactError(f"calibration artifact {directory} is incomplete: {TENSORS_NAME} is missing")
    if verify_hash and sha256_file(tensors_path) != meta["tensors"]["sha256"]:
        raise ArtifactError(f"{tensors_path} does not match the sha256 recorded in {JSON_NAME} (modified or corrupt)")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{tensors_path} is unreadable: {exc}") from None
    return meta, tensors


def check_matches(meta: dict[str, Any], identity: Mapping[str, Any], layers: Mapping[str, int]) -> None:
    """Refuse an artifact made for another model: say exactly what differs.

    `identity` is the model identity of the manifest (preset, config sha256, weights hash or synthetic
    seed); `layers` maps each quantizable layer to its input channel count.
    """
    diffs = [f"{k}: artifact {meta['model'].get(k)!r} != model {identity.get(k)!r}"
             for k in IDENTITY_KEYS if meta["model"].get(k) != identity.get(k)]
    recorded = {layer["name"]: layer["channels"] for layer in meta["layers"]}
    missing = sorted(set(layers) - set(recorded))
    if missing:
        diffs.append(f"{len(missing)} layers have no statistics (e.g. {missing[0]})")
    shapes = [n for n in layers if n in recorded and recorded[n] != layers[n]]
    if shapes:
        diffs.append(f"{len(shapes)} layers have other input widths (e.g. {shapes[0]}: "
                     f"{recorded[shapes[0]]} != {layers[shapes[0]]})")
    if diffs:
        raise ArtifactError("calibration artifact does not belong to this model: " + "; ".join(diffs))
