#!/usr/bin/env python
"""Export a Stable Audio Open-family model to ONNX: dit.onnx, text_encoder.onnx, conditioners.onnx,
vae_decoder.onnx, tokenizer/ and manifest.json (with the DiT's ONNX Runtime vs PyTorch parity)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import add_model_args, model_spec, run, setup_logging  # noqa: E402

log = logging.getLogger("export")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--scheme", default="fp32", help="fp32 or fp16")
    parser.add_argument("--out", required=True, help="export directory (replaced atomically)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    from exporter.export import ExportOptions, export_model
    from exporter.models import load_model

    options = ExportOptions(scheme=args.scheme)  # validates the scheme before any heavy work
    loaded = load_model(model_spec(args))
    manifest = export_model(loaded, Path(args.out), options)
    out = Path(args.out).resolve()
    for name, graph in manifest["graphs"].items():
        log.info("%-13s %8.1f MB  parity max rel err %.2e  (%s)", name, graph["weight_bytes"] / 1e6,
                 graph["parity"]["max_rel_error"], graph["precision"])
    log.info("export written to %s in %.0f s (weights %s)", out, manifest["export_seconds"],
             manifest["model"]["weights"])
    print(json.dumps({"out": str(out), "parity.max_rel_error": manifest["parity"]["max_rel_error"]}))
    return 0


if __name__ == "__main__":
    run(main)
