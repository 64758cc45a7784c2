"""A Triton Python-backend model that runs one ONNX graph with ONNX Runtime (CPU).

For Triton builds without the onnxruntime backend (the PyTriton wheel's server has only the Python
backend): `scripts/triton_repo.py --graph-backend python` serves each graph with this model, so the whole
repository, BLS sampler included, runs on such a server. Each request runs as it came (no concatenation);
an error answers its own request only. Imported by the stub only: `triton_python_backend_utils` exists there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from exporter.onnx.torch_export import ort_session

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        self.session = ort_session(Path(args["model_repository"]) / args["model_version"] / onnx_file)
        self.outputs = [o["name"] for o in config["output"]]
        # Triton hands the Python backend the client's shape; apply the config's reshape here
        self.inputs = [(i["name"], i["reshape"].get("shape", []) if "reshape" in i else None) for i in config["input"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name, reshape in self.inputs:
                    value = self.pb.get_input_tensor_by_name(request, name).as_numpy()
                    feeds[name] = value.reshape(value.shape[0], *[int(d) for d in reshape]) if reshape is not None \
                        else value
                outs = self.session.run(self.outputs, feeds)
                responses.append(self.pb.InferenceResponse([self.pb.Tensor(n, o) for n, o in zip(self.outputs, outs)]))
            except Exception as exc:  # noqa: BLE001 - answered as this request's error
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses
