"""`quadit_generate` of a UNet-family export (AudioLDM, TANGO) as a Triton Python-backend model: the
diffusers-scheduler loop of `engines.serving.unet_batching`, calling the repository's graph models with BLS.

The SAO sampler model (`engines.serving.triton_bls`) with the UNet family's parts: `BlsSession`s stand in for
the ONNX Runtime sessions of `OrtUNetBackend` (text encoder, UNet, VAE decoder, vocoder), so its encode, UNet
and decode run unchanged on top of them, and `unet_family` supplies request parsing, batch key and the batched
run. Mono audio at the vocoder's rate. Runs inside Triton's Python-backend stub, whose Python needs torch,
diffusers, transformers and this repository (the model.py shim puts QUADIT_ROOT on sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engines.serving.triton_bls import BlsSession
from engines.serving.triton_bls import TritonPythonModel as SaoSamplerModel


def bls_unet_pipeline(pb: Any, settings: dict[str, Any], version_dir: Path) -> Any:
    """A `UNetPipeline` whose backend's sessions are BLS calls to the repository's graph models."""
    from transformers import AutoTokenizer

    from engines.runtime.unet_pipeline import OrtUNetBackend, UNetPipeline

    io, manifest = settings["io"], settings["manifest"]
    backend = OrtUNetBackend.__new__(OrtUNetBackend)  # its methods, not its __init__ (which opens local sessions)
    backend.sessions = {graph: BlsSession(pb, model, settings["io_types"][model], io[model]["column_inputs"],
                                          io[model]["outputs"]) for graph, model in settings["models"].items()}
    backend.inputs = manifest["conditioning"]["inputs"]
    backend.providers, backend.calls, backend.name = {}, 0, "triton-bls"
    tokenizer = AutoTokenizer.from_pretrained(str(version_dir / "tokenizer"), local_files_only=True)
    return UNetPipeline(backend, manifest, tokenizer)


class TritonPythonModel(SaoSamplerModel):
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from engines.serving.families import unet_family

        self.pb = pb_utils
        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version_dir / "quadit.json").read_text())
        self.pipeline = bls_unet_pipeline(pb_utils, settings, version_dir)
        self.max_batch = int(settings["max_batch"])
        self.dit_batch_sizes = None
        self.family = unet_family(self.pipeline, settings.get("unet_max_rows"))
        self.request_timeout_s = settings.get("request_timeout_s")
