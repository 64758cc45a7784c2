"""ONNX Runtime execution providers for a device, and sessions that are known to run where they were asked to.

`--device cpu` (the default) is ORT's CPU provider. `--device cuda[:N]` needs the `onnxruntime-gpu` build
(the project's `gpu` extra): its CUDA provider, with ORT's TensorRT provider in front where TensorRT is
installed (engines cached on disk, so only the first session of a graph pays the build). ORT silently falls
back to the CPU when a provider's libraries do not load, so a session is checked after creation and a
missing provider is refused with a one-line error rather than run slowly on the CPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Union

from exporter.errors import InputError

log = logging.getLogger(__name__)

CPU, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
Provider = Union[str, tuple[str, dict[str, Any]]]


def default_trt_cache() -> Path:
    """Where ORT's TensorRT provider keeps its engines and timing cache (`$QUADIT_ORT_TRT_CACHE`, else
    `~/.cache/quadit/ort-trt`); the provider keys its engine files by graph, so one directory serves all."""
    env = os.environ.get("QUADIT_ORT_TRT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quadit" / "ort-trt"


def device_index(device: str) -> int:
    """'cpu' -> -1, 'cuda' -> 0, 'cuda:N' -> N; InputError otherwise."""
    if device == "cpu":
        return -1
    head, _, index = device.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise InputError(f"unknown --device '{device}' (choose from: cpu, cuda, cuda:N)")
    return int(index or 0)


def providers_for(device: str, int8: bool = False, trt_cache: Path | None = None,
                  available: list[str] | None = None, tensorrt: bool | None = None) -> list[Provider]:
    """The provider list for `device`, best first. `available` (default: what this onnxruntime build
    offers) and `tensorrt` (default: whether the tensorrt package is installed) are the facts it decides
    from. `int8` lets the TensorRT provider build INT8 kernels for a graph's Q/DQ pairs."""
    index = device_index(device)
    if index < 0:
        return [CPU]
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if CUDA_EP not in available:
        raise InputError(f"--device {device}: this onnxruntime build has no {CUDA_EP} (it has "
                         f"{', '.join(available)}); install onnxruntime-gpu in place of onnxruntime "
                         "(pip install 'quadit[gpu]'), or run with --device cpu")
    if tensorrt is None:
        tensorrt = importlib.util.find_spec("tensorrt") is not None
    out: list[Provider] = []
    if tensorrt and TRT_EP in available:
        cache = str(trt_cache or default_trt_cache())
        out.append((TRT_EP, {"device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                             "trt_int8_enable": bool(int8)}))
    out.append((CUDA_EP, {"device_id": index}))
    out.append(CPU)
    return out


def provider_names(providers: list[Provider]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def check_session(session: Any, providers: list[Provider], device: str, what: str) -> list[str]:
    """The providers `session` runs with; InputError when ORT dropped the CUDA provider asked for (its
    libraries did not load: ORT then runs everything on the CPU)."""
    used = list(session.get_providers())
    if CUDA_EP in provider_names(providers) and CUDA_EP not in used:
        raise InputError(f"--device {device}: ONNX Runtime could not start its CUDA provider for {what} (CUDA or "
                         f"cuDNN libraries not found, or no GPU); it would run on {', '.join(used)}")
    if TRT_EP in provider_names(providers) and TRT_EP not in used:
        log.warning("%s: ONNX Runtime's TensorRT provider did not load; running with %s", what, ", ".join(used))
    return used


def session(path: Path, config: dict[str, str] | None = None, device: str = "cpu", int8: bool = False) -> Any:
    """An ORT session of `path` on `device` (see `providers_for`), checked to run there."""
    from exporter.onnx.torch_export import ort_session

    providers = providers_for(device, int8=int8)
    if device != "cpu" and TRT_EP in provider_names(providers):
        default_trt_cache().mkdir(parents=True, exist_ok=True)
    sess = ort_session(Path(path), config, providers=providers)
    check_session(sess, providers, device, Path(path).name)
    return sess


def check_torch_device(device: str) -> str:
    """`device` for PyTorch work (calibration, the reference backend, ModelOpt): InputError when it names
    a GPU this machine does not have."""
    index = device_index(device)
    if index >= 0:
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for but PyTorch sees no CUDA GPU here "
                             f"(torch {torch.__version__}); run with --device cpu")
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device
