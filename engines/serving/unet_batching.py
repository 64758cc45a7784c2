"""Several UNet-family generate requests (AudioLDM, TANGO) stepped together: one UNet call per scheduler step.

Why this reproduces each request's own single run (`UNetPipeline.generate`, whose loop is
`exporter.models.unet_sampling.sample_latents`):

- Every request keeps its own diffusers scheduler object (built from the export's `scheduler_config.json`)
  and its own `torch.Generator` seeded with its seed, so its starting noise, the scheduler's state
  (multistep schedulers keep past outputs) and any noise a stochastic scheduler draws in `step` are exactly
  its single run's. Only the UNet evaluation is shared.
- Requests batch when they share the latent shape (the UNet convolves and attends over the whole mel
  latent; lengths are not padded) and the step count (one timestep sequence). `UNetBatchKey` is that
  grouping; the latent frames are rounded up (`latent_shape`), so e.g. 0.9 s and 1.0 s share a key and each
  request's audio is cut to its own length afterwards, as the single run cuts it.
- Classifier-free guidance: a request with cfg_scale > 1 adds the rows [uncond, cond] in the single run's
  order (negative prompt "" as the unconditioned text), one with cfg_scale <= 1 only its conditioned row;
  each prediction is mixed with its own scale. Text is encoded one prompt at a time, as the single run does.
- The VAE decoder and vocoder run one request at a time, as the single run does.

What remains is the UNet kernels' own batch-size dependence (measured in tests/test_serving_unet.py).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from engines.runtime.unet_pipeline import UNetGenerateOptions, UNetPipeline
from exporter.models.unet_sampling import latent_shape, make_scheduler


@dataclass(frozen=True)
class UNetBatchKey:
    """Requests with equal keys share one latent shape and one timestep sequence, so they step together."""

    latent_shape: tuple[int, int, int]
    steps: int

    @property
    def latent_length(self) -> int:  # the latent frames, as the scheduler's log line names a length
        return self.latent_shape[1]


def unet_batch_key(pipeline: UNetPipeline, opts: UNetGenerateOptions) -> UNetBatchKey:
    return UNetBatchKey(tuple(latent_shape(pipeline.dims, opts.seconds)), int(opts.steps))


@dataclass
class UNetBatchResult:
    latents: list[torch.Tensor]  # n x [1, C, H, W]
    audio: list[torch.Tensor]  # n x [1, samples] mono, each trimmed to its request's length
    sample_rate: int
    dit_calls: int  # UNet calls (named as the DiT's so that the scheduler logs both alike)
    dit_rows: int


class _Request:
    """One request's own scheduler, generator, latents and conditioning rows."""

    def __init__(self, pipeline: UNetPipeline, opts: UNetGenerateOptions, texts: dict[str, dict[str, torch.Tensor]]):
        self.opts = opts
        self.scheduler = make_scheduler(pipeline.manifest["scheduler_config"])
        self.scheduler.set_timesteps(opts.steps)
        self.generator = torch.Generator().manual_seed(opts.seed)
        shape = (1, *latent_shape(pipeline.dims, opts.seconds))
        self.latents = torch.randn(shape, generator=self.generator) * self.scheduler.init_noise_sigma
        self.guided = opts.cfg_scale > 1.0
        for text in (opts.prompt, opts.negative_prompt) if self.guided else (opts.prompt,):
            if text not in texts:
                texts[text] = pipeline.conditioning([text])
        cond = texts[opts.prompt]
        self.cond = ({k: torch.cat([texts[opts.negative_prompt][k], cond[k]]) for k in cond} if self.guided
                     else cond)
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        self.extra = {k: v for k, v in (("eta", 0.0), ("generator", self.generator)) if k in accepted}

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    def model_input(self, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.latents] * 2) if self.guided else self.latents
        return self.scheduler.scale_model_input(x, t)

    def step(self, pred: torch.Tensor, t: torch.Tensor) -> None:
        if self.guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + self.opts.cfg_scale * (cond - uncond)
        self.latents = self.scheduler.step(pred, t, self.latents, **self.extra).prev_sample


def _chunked(unet: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
             max_rows: int | None) -> tuple[torch.Tensor, int]:
    """The UNet over all rows, in calls of at most `max_rows` (TensorRT profiles); (prediction, calls)."""
    n = x.shape[0]
    if max_rows is None or n <= max_rows:
        return unet(x, t, cond), 1
    outs = [unet(x[s:s + max_rows], t[s:s + max_rows], {k: v[s:s + max_rows] for k, v in cond.items()})
            for s in range(0, n, max_rows)]
    return torch.cat(outs), len(outs)


@torch.no_grad()
def sample_unet_batch(pipeline: UNetPipeline, requests: Sequence[UNetGenerateOptions], max_rows: int | None = None,
                      on_step: Callable[[int], None] | None = None) -> tuple[list[torch.Tensor], int, int]:
    """Latents of each request (all with one UNetBatchKey) from one batched loop: (latents, UNet calls, rows).
    `on_step(k)` runs before the k-th UNet evaluation; raising from it abandons the batch."""
    if not requests:
        raise ValueError("no requests")
    for opts in requests:
        opts.validate(pipeline.dims)
    keys = {unet_batch_key(pipeline, o) for o in requests}
    if len(keys) != 1:
        raise ValueError(f"requests of one batch must share latent shape and steps: {keys}")
    texts: dict[str, dict[str, torch.Tensor]] = {}
    items = [_Request(pipeline, o, texts) for o in requests]
    calls = rows = 0
    for k, t in enumerate(items[0].scheduler.timesteps):
        if on_step is not None:
            on_step(k)
        x = torch.cat([it.model_input(t) for it in items])
        cond = {name: torch.cat([it.cond[name] for it in items]) for name in items[0].cond}
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        pred, n_calls = _chunked(pipeline.backend.unet, x, tt, cond, max_rows)
        calls, rows = calls + n_calls, rows + x.shape[0]
        start = 0
        for it in items:
            it.step(pred[start:start + it.rows], t)
            start += it.rows
    return [it.latents for it in items], calls, rows


@torch.no_grad()
def generate_unet_batch(pipeline: UNetPipeline, requests: Sequence[UNetGenerateOptions], max_rows: int | None = None,
                        on_step: Callable[[int], None] | None = None) -> UNetBatchResult:
    """Audio of each request from one batched loop; decoded one request at a time, as the single run does."""
    latents, calls, rows = sample_unet_batch(pipeline, requests, max_rows, on_step)
    rate = int(pipeline.dims["sample_rate"])
    audio = [pipeline.backend.decode(lat)[:, :int(opts.seconds * rate)] for lat, opts in zip(latents, requests)]
    return UNetBatchResult(latents=latents, audio=audio, sample_rate=rate, dit_calls=calls, dit_rows=rows)


def unet_max_rows(backend: Any) -> int | None:
    """Rows one UNet call may take: the TensorRT engine's largest profile batch, else unbounded."""
    meta = getattr(backend, "meta", None)
    if not meta:
        return None
    profiles = meta.get("engines", {}).get("unet", {}).get("profiles") or []
    sizes = [spec["max"][0] for profile in profiles for spec in profile.values()]
    return min(sizes) if sizes else None
