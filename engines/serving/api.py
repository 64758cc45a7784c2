"""The `quadit_generate` request API: its inputs, their parsing and validation per model family, and the
error a bad request gets.

    inputs   prompt BYTES [1], seconds FP32 [1], steps INT32 [1], cfg_scale FP32 [1], seed INT64 [1]

Both families read the same five inputs. A Stable Audio Open export answers `audio` FP32 [2, samples] at
44.1 kHz (stereo); a UNet-family export (AudioLDM, TANGO) answers `audio` FP32 [1, samples] at the export's
vocoder rate (16 kHz mono), with `steps` from 1 (the UNet runtime's lower bound; SAO's sampler needs 2) and
"" as the negative prompt, as `quadit generate` runs it. `sample_rate` in every answer says which rate.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from engines.runtime.pipeline import GenerateOptions
from exporter.errors import InputError

MAX_STEPS = 1000  # a bound on one request's compute; the model card uses 100


class RequestError(Exception):
    """A bad request. Its message reaches the client as Triton's error text without a Python traceback:
    PyTriton formats `exc.__traceback__` into the error response, so this class reports none."""

    @property
    def __traceback__(self):  # type: ignore[override]
        return None

    @__traceback__.setter
    def __traceback__(self, _value) -> None:
        pass


class RequestErrorsAtDebug(logging.Filter):
    """PyTriton logs every exception an infer callable raises, with its traceback, at WARNING. A RequestError
    is a bad or refused request (the client gets its one-line message), not a server fault, so its record
    is lowered to DEBUG: under load "server busy" refusals would otherwise fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and f"{__name__}.RequestError" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


INPUTS = {"prompt": np.bytes_, "seconds": np.float32, "steps": np.int32, "cfg_scale": np.float32, "seed": np.int64}


def _column(request: Any, name: str, kind: str) -> np.ndarray:
    try:
        value = np.asarray(request[name])
    except KeyError:
        raise RequestError(f"input '{name}' is missing") from None
    if value.ndim != 2 or value.shape[1] != 1:
        raise RequestError(f"input '{name}' must have shape [batch, 1], got {list(value.shape)}")
    if kind == "bytes":
        if value.dtype.kind not in "SOU":
            raise RequestError(f"input '{name}' must be BYTES, got {value.dtype}")
    elif np.dtype(value.dtype).kind != kind:
        raise RequestError(f"input '{name}' must be {'a float' if kind == 'f' else 'an integer'}, got {value.dtype}")
    return value[:, 0]


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("input 'prompt' is not valid UTF-8") from None
    return str(value)


def parse_request(request: Any, defaults: dict[str, Any], max_seconds: float) -> list[GenerateOptions]:
    """One GenerateOptions per row of a Triton request, validated; a RequestError names what is wrong."""
    cols, n = _columns(request)
    out = []
    for i in range(n):
        prompt, seconds = _text(cols["prompt"][i]), float(cols["seconds"][i])
        steps, cfg, seed = int(cols["steps"][i]), float(cols["cfg_scale"][i]), int(cols["seed"][i])
        if not prompt.strip():
            raise RequestError("input 'prompt' is empty")
        if not math.isfinite(seconds) or seconds <= 0:
            raise RequestError(f"input 'seconds' must be positive, got {seconds:g}")
        if seconds > max_seconds + 1e-6:
            raise RequestError(f"input 'seconds' {seconds:g} is longer than this model's window of {max_seconds:.2f} s")
        if not 2 <= steps <= MAX_STEPS:
            raise RequestError(f"input 'steps' must be from 2 to {MAX_STEPS}, got {steps}")
        if not math.isfinite(cfg) or cfg < 0:
            raise RequestError(f"input 'cfg_scale' must be a finite number >= 0, got {cfg:g}")
        opts = GenerateOptions(prompt=prompt, seconds=seconds, steps=steps, cfg_scale=cfg, seed=seed,
                               sampler_type=defaults["sampler_type"], sigma_min=defaults["sigma_min"],
                               sigma_max=defaults["sigma_max"], rho=defaults["rho"])
        try:
            opts.validate(max_seconds)
        except InputError as exc:
            raise RequestError(str(exc).replace("--", "")) from None
        out.append(opts)
    _same_seconds(out)
    return out


def _same_seconds(rows: list[Any]) -> None:
    if len({round(o.seconds * 1e6) for o in rows}) > 1:
        raise RequestError("rows of one request must share 'seconds' (their audio is one tensor); send them "
                           "as separate requests")


def _columns(request: Any) -> tuple[dict[str, np.ndarray], int]:
    cols = {"prompt": _column(request, "prompt", "bytes"), "seconds": _column(request, "seconds", "f"),
            "steps": _column(request, "steps", "i"), "cfg_scale": _column(request, "cfg_scale", "f"),
            "seed": _column(request, "seed", "i")}
    rows = {len(c) for c in cols.values()}
    if len(rows) != 1 or rows == {0}:
        raise RequestError(f"inputs must have the same, non-zero batch size, got { {k: len(v) for k, v in cols.items()} }")
    return cols, rows.pop()


def _decimal(value: Any) -> float:
    """An FP32 input as the shortest decimal that names it (FP32 1.05 -> 1.05, not 1.0499999523). The UNet
    runtime cuts its audio to `int(seconds * rate)` samples, as diffusers' pipelines do, so the FP32 value
    itself would give one sample fewer than `quadit generate --seconds 1.05` for such lengths."""
    return float(str(value)) if isinstance(value, np.float32) else float(value)


def parse_unet_request(request: Any, dims: dict[str, Any]) -> list[Any]:
    """One `UNetGenerateOptions` per row of a Triton request to a UNet-family export, validated as
    `quadit generate` validates them (`UNetGenerateOptions.validate`); a RequestError names what is wrong."""
    from engines.runtime.unet_pipeline import UNetGenerateOptions

    cols, n = _columns(request)
    out = []
    for i in range(n):
        prompt, seconds = _text(cols["prompt"][i]), _decimal(cols["seconds"][i])
        steps, cfg, seed = int(cols["steps"][i]), float(cols["cfg_scale"][i]), int(cols["seed"][i])
        if not prompt.strip():
            raise RequestError("input 'prompt' is empty")
        if not 1 <= steps <= MAX_STEPS:
            raise RequestError(f"input 'steps' must be from 1 to {MAX_STEPS}, got {steps}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise RequestError(f"input 'seconds' must be positive, got {seconds:g}")
        least, window = dims["hop_seconds"] * dims["vae_scale"], float(dims["max_seconds"])
        if seconds < least:
            raise RequestError(f"input 'seconds' {seconds:g} is shorter than this model's shortest output, {least:.3f} s")
        if seconds > window + 1e-6:
            raise RequestError(f"input 'seconds' {seconds:g} is longer than this model's window of {window:.2f} s")
        if not math.isfinite(cfg) or cfg < 0:
            raise RequestError(f"input 'cfg_scale' must be a finite number >= 0, got {cfg:g}")
        opts = UNetGenerateOptions(prompt=prompt, seconds=seconds, steps=steps, cfg_scale=cfg, seed=seed)
        opts.validate(dims)  # the runtime's own checks, all covered above (an InputError here is a bug)
        out.append(opts)
    _same_seconds(out)
    return out
