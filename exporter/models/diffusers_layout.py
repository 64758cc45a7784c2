"""The diffusers layout of Stable Audio Open (StableAudioPipeline.save_pretrained / its cache snapshot)."""
from __future__ import annotations

from pathlib import Path

from exporter.errors import InputError
from exporter.models.checkpoint import WeightSource

MODEL_INDEX = "model_index.json"


def is_pipeline_dir(path: Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def pipeline_source(path: Path) -> WeightSource:
    raise InputError(f"{path}: the diffusers layout is not supported yet")
