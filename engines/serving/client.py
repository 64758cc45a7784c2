"""The client side of `quadit_generate`: its request as tritonclient input tensors (HTTP or gRPC alike)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

MODEL = "quadit_generate"


def infer_inputs(module: Any, prompt: str, seconds: float, steps: int, cfg: float, seed: int,
                 replace: Mapping[str, tuple[str, np.ndarray]] | None = None, drop: Sequence[str] = ()) -> list[Any]:
    """One request (batch 1) for `module` (`tritonclient.http` or `tritonclient.grpc`). `replace` swaps an
    input's data type and value and `drop` leaves inputs out, so tests and the soak can send malformed ones."""
    values = {"prompt": ("BYTES", np.array([[prompt.encode()]], dtype=object)),
              "seconds": ("FP32", np.array([[seconds]], np.float32)),
              "steps": ("INT32", np.array([[steps]], np.int32)),
              "cfg_scale": ("FP32", np.array([[cfg]], np.float32)),
              "seed": ("INT64", np.array([[seed]], np.int64))}
    values.update(replace or {})
    out = []
    for name, (dtype, value) in values.items():
        if name in drop:
            continue
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out
