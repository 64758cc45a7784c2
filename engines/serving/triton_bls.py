"""`quadit_generate` as a Triton Python-backend model: the sampler, calling the graph models with BLS.

The same API as scripts/serve.py (engines.serving.server), with Triton's own dynamic batcher in front: each
execute call gets the requests Triton batched, answers bad ones with their own error, groups the rest by
batch key and steps each group through the family's batched run (`engines.serving.families`: here
`engines.serving.batching.generate_batch`; the UNet family's model is `engines.serving.triton_bls_unet`).
The graphs are other models of the repository (written by engines.serving.triton_repo): `BlsSession` makes
each look like an ONNX Runtime session, so `OrtBackend`'s conditioning and decode and `OrtDiT`'s CFG batching
run unchanged on top of them.

Runs inside Triton's Python-backend stub, whose Python needs torch, k-diffusion, stable-audio-tools,
transformers and this repository (the model.py shim puts QUADIT_ROOT on sys.path).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class BlsSession:
    """One repository model behind `session.run(output_names, feeds)`, as ONNX Runtime's sessions are called."""

    def __init__(self, pb: Any, model: str, io_types: dict[str, str], column_inputs: Sequence[str],
                 outputs: Sequence[str]) -> None:
        self.pb, self.model, self.io_types = pb, model, io_types
        self.column_inputs, self.outputs = set(column_inputs), list(outputs)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names or self.outputs)
        tensors = []
        for name, value in feeds.items():
            value = np.ascontiguousarray(np.asarray(value).astype(self.io_types[name]))
            tensors.append(self.pb.Tensor(name, value[:, None] if name in self.column_inputs else value))
        response = self.pb.InferenceRequest(model_name=self.model, requested_output_names=names,
                                            inputs=tensors).exec()
        if response.has_error():
            raise RuntimeError(f"{self.model}: {response.error().message()}")
        out = []
        for name in names:
            tensor = self.pb.get_output_tensor_by_name(response, name)
            if tensor.is_cpu():
                value = tensor.as_numpy()
            else:  # a GPU model's output: through DLPack
                import torch.utils.dlpack

                value = torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()
            out.append(value.astype(np.float32) if value.dtype == np.float16 else value)
        return out


def bls_backend(pb: Any, settings: dict[str, Any], version_dir: Path) -> Any:
    """An `OrtBackend` whose sessions are BLS calls to the repository's graph models."""
    from transformers import AutoTokenizer

    from engines.runtime.backends import BucketedSession, OrtBackend, OrtDiT

    io = settings["io"]

    def session(model: str) -> BlsSession:
        return BlsSession(pb, model, settings["io_types"][model], io[model]["column_inputs"], io[model]["outputs"])

    models = settings["models"]
    backend = OrtBackend.__new__(OrtBackend)  # its methods, not its __init__ (which opens local sessions)
    backend.manifest = settings["manifest"]
    backend.layout = backend.manifest["conditioning"]
    dit = [session(m) for m in models["dit"]]
    backend.sessions = {"text_encoder": session(models["text_encoder"]), "conditioners": session(models["conditioners"]),
                        "vae_decoder": session(models["vae_decoder"]),
                        "dit": BucketedSession(dit, settings["bucket_edges"]) if len(dit) > 1 else dit[0]}
    backend.tokenizer = AutoTokenizer.from_pretrained(str(version_dir / "tokenizer"), local_files_only=True)
    backend.dit = OrtDiT(backend.sessions["dit"])
    backend.name = "triton-bls"
    return backend


class TimeLimitExceeded(Exception):
    pass


def time_limit(limit_s: float, clock: Callable[[], float] = time.monotonic) -> Callable[[int], None]:
    """An `on_step` for `generate_batch` that abandons the batch once `limit_s` has passed since this call
    (the start of the execute call): the sampler's half of the repository's request time limit; Triton's
    queue policy is the other (`engines.serving.triton_repo.sampler_config`)."""
    deadline = clock() + limit_s

    def on_step(_: int) -> None:
        if clock() >= deadline:
            raise TimeLimitExceeded(f"request exceeded the server's time limit of {limit_s:g} s while running")

    return on_step


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from engines.runtime.pipeline import Pipeline
        from engines.serving.families import sao_family

        self.pb = pb_utils
        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version_dir / "quadit.json").read_text())
        self.pipeline = Pipeline(bls_backend(pb_utils, settings, version_dir), settings["manifest"])
        self.max_batch = int(settings["max_batch"])
        self.dit_batch_sizes = settings.get("dit_batch_sizes")
        self.family = sao_family(self.pipeline)
        self.request_timeout_s = settings.get("request_timeout_s")  # None in repositories written before it

    def execute(self, requests: list[Any]) -> list[Any]:
        import torch

        from engines.serving.api import INPUTS, RequestError

        on_step = time_limit(float(self.request_timeout_s)) if self.request_timeout_s else None
        errors: dict[int, str] = {}
        rows: dict[int, list] = {}
        for i, request in enumerate(requests):
            arrays = {}
            for name in INPUTS:
                tensor = self.pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            try:
                rows[i] = self.family.parse(arrays)
            except RequestError as exc:
                errors[i] = str(exc)
        groups: dict[Any, list[tuple[int, int]]] = {}
        for i, opts in rows.items():
            for j, o in enumerate(opts):
                groups.setdefault(self.family.key(o), []).append((i, j))
        audio: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        with torch.no_grad():
            for members in groups.values():
                for start in range(0, len(members), self.max_batch):
                    chunk = [m for m in members[start:start + self.max_batch] if m[0] not in errors]
                    if not chunk:
                        continue
                    try:
                        result = self.family.run([rows[i][j] for i, j in chunk], self.dit_batch_sizes, on_step)
                    except Exception as exc:  # noqa: BLE001 - every request of the chunk gets it
                        for i, _ in chunk:
                            errors[i] = str(exc) if isinstance(exc, TimeLimitExceeded) else f"{type(exc).__name__}: {exc}"
                        continue
                    for (i, j), a in zip(chunk, result.audio):
                        audio[(i, j)] = (a.float().numpy(), len(chunk))
        responses = []
        rate = self.family.sample_rate
        for i in range(len(requests)):
            if i in errors:
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(errors[i])))
                continue
            outs = [audio[(i, j)] for j in range(len(rows[i]))]
            responses.append(self.pb.InferenceResponse([
                self.pb.Tensor("audio", np.stack([a for a, _ in outs]).astype(np.float32)),
                self.pb.Tensor("sample_rate", np.full((len(outs), 1), rate, dtype=np.int32)),
                self.pb.Tensor("batch_size", np.array([[n] for _, n in outs], dtype=np.int32))]))
        return responses
