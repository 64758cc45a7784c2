"""What the server needs of a model family, behind one small record: `ServedFamily`.

`quadit serve` dispatches on the export manifest's `family` (as `quadit generate` does): a Stable Audio Open
export runs `engines.runtime.pipeline.Pipeline` and the k-diffusion batcher of `engines.serving.batching`; a
UNet-family export (`family: "unet"`: AudioLDM, TANGO) runs `engines.runtime.unet_pipeline.UNetPipeline` and
the diffusers-scheduler batcher of `engines.serving.unet_batching`. The server, the scheduler (admission,
queue delay, time limits, drain) and the Triton binding are the same for both; only request parsing, the
batch key, the batched run and the audio's channel count differ, and those are the fields below.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger(__name__)

# (options of a batch, DiT batch sizes or None, on_step or None) -> a result with .audio, .sample_rate,
# .dit_calls and .dit_rows (engines.serving.batching.BatchResult, unet_batching.UNetBatchResult)
BatchRunner = Callable[[Sequence[Any], Sequence[int] | None, Callable[[int], None] | None], Any]


@dataclass(frozen=True)
class ServedFamily:
    name: str  # "sao" or "unet"
    parse: Callable[[Any], list[Any]]  # a Triton request -> validated options per row; raises RequestError
    key: Callable[[Any], Hashable]  # options -> batch key (with .latent_length and .steps, for the log)
    run: BatchRunner
    channels: int  # rows of each answer's `audio` [channels, samples]
    sample_rate: int


def sao_family(pipeline: Any) -> ServedFamily:
    """Stable Audio Open: dpmpp-3m-sde over the DiT, 44.1 kHz stereo."""
    from engines.serving.api import parse_request
    from engines.serving.batching import batch_key, generate_batch

    defaults, window = pipeline.manifest["sampler_defaults"], pipeline.max_seconds
    return ServedFamily(name="sao", parse=lambda request: parse_request(request, defaults, window),
                        key=lambda opts: batch_key(pipeline, opts),
                        run=lambda opts, sizes, on_step: generate_batch(pipeline, opts, sizes, on_step),
                        channels=2, sample_rate=int(pipeline.dims["sample_rate"]))


def unet_family(pipeline: Any, max_rows: int | None = None) -> ServedFamily:
    """AudioLDM / TANGO: the export's diffusers scheduler over the UNet, mono at the vocoder's rate. The DiT
    batch sizes do not apply; `max_rows` (default: a TensorRT UNet engine's largest profile batch, else
    none) caps the rows of one UNet call."""
    from engines.serving.api import parse_unet_request
    from engines.serving.unet_batching import generate_unet_batch, unet_batch_key, unet_max_rows

    max_rows = max_rows or unet_max_rows(pipeline.backend)
    return ServedFamily(name="unet", parse=lambda request: parse_unet_request(request, pipeline.dims),
                        key=lambda opts: unet_batch_key(pipeline, opts),
                        run=lambda opts, _sizes, on_step: generate_unet_batch(pipeline, opts, max_rows, on_step),
                        channels=1, sample_rate=int(pipeline.dims["sample_rate"]))


def served_family(pipeline: Any) -> ServedFamily:
    """The family of an open pipeline (`open_pipeline` or `open_unet_pipeline`)."""
    from engines.runtime.unet_pipeline import UNetPipeline

    return unet_family(pipeline) if isinstance(pipeline, UNetPipeline) else sao_family(pipeline)


def warm_up(family: ServedFamily, dit_batch_sizes: Sequence[int] | None = None) -> float:
    """Run one short generation (0.5 s, 2 steps, guided) through the family's own parse and batched run before
    the server opens; returns its seconds. Why: the first generation of a process imports the sampler's
    libraries (k-diffusion and stable-audio-tools for SAO, diffusers' schedulers for the UNet family: 7 s
    on a busy 2-core machine) and runs each ONNX Runtime session for the first time; without this, the
    request that readiness lets in first pays for all of it and can pass a short time limit."""
    import time

    import numpy as np

    request = {"prompt": np.array([[b"warm-up"]], dtype=object), "seconds": np.array([[0.5]], np.float32),
               "steps": np.array([[2]], np.int32), "cfg_scale": np.array([[2.0]], np.float32),
               "seed": np.array([[0]], np.int64)}
    from engines.serving.api import RequestError

    t0 = time.perf_counter()
    try:
        options = family.parse(request)
    except RequestError as exc:  # a model whose shortest or longest output excludes 0.5 s: not warmed
        log.warning("no warm-up generation: %s", exc)
        return 0.0
    family.run(options, dit_batch_sizes, None)
    return time.perf_counter() - t0
