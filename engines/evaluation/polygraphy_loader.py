"""Polygraphy data loader: the DiT inputs a quadit export saved for its accuracy checks (`check/inputs.json`).

    polygraphy run EXPORT/dit.onnx --onnxrt --data-loader-script engines/evaluation/polygraphy_loader.py
    polygraphy run EXPORT/dit.onnx --trt --data-loader-script engines/evaluation/polygraphy_loader.py \\
        --load-outputs EXPORT/check/reference_outputs.json --compare snr cosine_similarity --check-average

The export directory is `$QUADIT_EXPORT` when set, else the directory of the model file Polygraphy runs
(the first `.onnx` argument on its command line), else the current directory. For a per-bucket graph
(`dit.bucket{k}.onnx`) only the inputs of bucket k are yielded. Polygraphy imports this file by path
(`mod.import_from_script`), so it imports nothing from quadit: only the standard library and Polygraphy.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

ENV = "QUADIT_EXPORT"
INPUTS = Path("check") / "inputs.json"
BUCKETS = Path("check") / "buckets.json"
_BUCKET_GRAPH = re.compile(r"\.bucket(\d+)\.onnx$")


def _model_path() -> Path | None:
    """The model Polygraphy was asked to run: the first existing `.onnx` file among its arguments."""
    for arg in sys.argv[1:]:
        if arg.endswith(".onnx") and Path(arg).is_file():
            return Path(arg)
    return None


def export_dir() -> Path:
    from polygraphy.logger import G_LOGGER

    if os.environ.get(ENV):
        found = Path(os.environ[ENV])
        if not (found / INPUTS).is_file():
            G_LOGGER.critical(f"${ENV}={found} has no {INPUTS}: point it at a quantized quadit export made with "
                              "--report-prompts N (N >= 1)")
        return found
    model = _model_path()
    for candidate in ([model.parent] if model else []) + [Path.cwd()]:
        if (candidate / INPUTS).is_file():
            return candidate
    G_LOGGER.critical(f"no quadit check inputs found ({INPUTS} beside the model or in the current directory): "
                      f"set ${ENV} to the export directory")


def load_data() -> Iterator[dict]:
    """Yield the saved feed dicts {x, t, cross_attn_cond, global_embed} (float32), in saved order."""
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    directory = export_dir()
    feeds = load_json(str(directory / INPUTS), description="quadit check inputs")
    model = _model_path()
    match = _BUCKET_GRAPH.search(model.name) if model else None
    if match:
        bucket = int(match.group(1))
        buckets = json.loads((directory / BUCKETS).read_text())["buckets"]
        feeds = [f for f, b in zip(feeds, buckets) if b == bucket]
        G_LOGGER.info(f"quadit check inputs: {len(feeds)} of bucket {bucket} (graph {model.name})")
    yield from feeds
