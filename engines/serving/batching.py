"""Several generate requests stepped through one sampler run: one DiT call of batch <= 2n per step.

Why this reproduces each request's own single run (`Pipeline.generate`):

- The sampler math of k-diffusion (VDenoiser scalings, the dpmpp-3m-sde update) is elementwise per batch
  row, and the sigma schedule depends only on (steps, sigma_min, sigma_max, rho): requests that share those
  and the latent length (the DiT attends over the whole sequence, so lengths cannot be padded) share one
  schedule and can be stacked. `BatchKey` is that grouping.
- The starting noise and the Brownian-tree seed of a single run come from the global RNG right after
  `torch.manual_seed(seed)` (noise first, then `torch.randint` inside `BatchedBrownianTree`). Here each
  request draws both from its own `torch.Generator` seeded the same way, so no request touches another's
  (nor the process's) random stream.
- SDE samplers add noise from a Brownian tree built over `x`. `PerRequestNoise` keeps one
  `BrownianTreeNoiseSampler` per request, built over that request's [1, C, L] slice with its own seed, exactly
  as the single run builds it, and concatenates their draws.
- Classifier-free guidance: the single run evaluates [cond, uncond] as a batch of 2 and mixes them with the
  request's cfg scale (or the conditioned row alone when cfg_scale == 1). `GuidedBatchDiT` evaluates the n
  conditioned rows and the uncond rows of the requests whose cfg_scale != 1 in one call, then mixes each row
  with its own scale, so cfg scales may differ inside a batch.

What remains is the DiT kernels' own batch-size dependence (GEMM blocking), far below 1e-4 relative.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from engines.runtime.pipeline import GenerateOptions, Pipeline
from exporter.errors import InputError

log = logging.getLogger(__name__)

# k-diffusion samplers that can be batched with per-request randomness: deterministic ones, and the ones
# whose only randomness is a Brownian-tree noise sampler they accept as an argument.
DETERMINISTIC_SAMPLERS = {"dpmpp-2m": "sample_dpmpp_2m", "k-heun": "sample_heun", "k-lms": "sample_lms",
                          "k-dpm-2": "sample_dpm_2"}
BROWNIAN_SAMPLERS = {"dpmpp-2m-sde": "sample_dpmpp_2m_sde", "dpmpp-3m-sde": "sample_dpmpp_3m_sde"}
BATCHABLE_SAMPLERS = {**DETERMINISTIC_SAMPLERS, **BROWNIAN_SAMPLERS}


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys share one sigma schedule and one latent shape, so they step together."""

    latent_length: int
    steps: int
    sampler_type: str
    sigma_min: float
    sigma_max: float
    rho: float


def batch_key(pipeline: Pipeline, opts: GenerateOptions) -> BatchKey:
    return BatchKey(pipeline.latent_length(opts.seconds), opts.steps, opts.sampler_type, opts.sigma_min,
                    opts.sigma_max, opts.rho)


def initial_state(opts: GenerateOptions, shape: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(starting noise [1, C, L], Brownian-tree seed) as a single run draws them after manual_seed(seed)."""
    g = torch.Generator().manual_seed(opts.seed)
    noise = torch.randn([1, *shape], generator=g)
    tree_seed = int(torch.randint(0, 2 ** 63 - 1, [], generator=g).item())
    return noise, tree_seed


class PerRequestNoise:
    """A noise sampler made of one Brownian tree per batch row, each as that row's single run builds it."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int]):
        from k_diffusion.sampling import BrownianTreeNoiseSampler

        if x.shape[0] != len(seeds):
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        self.samplers = [BrownianTreeNoiseSampler(x[i:i + 1], sigma_min, sigma_max, seed=s)
                         for i, s in enumerate(seeds)]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.cat([s(sigma, sigma_next) for s in self.samplers])


def split_rows(n: int, sizes: Sequence[int]) -> list[int]:
    """Chunks of `n` rows in the allowed batch sizes: the largest that fits, else the smallest (padded)."""
    out, left, sizes = [], n, sorted(set(sizes))
    while left > 0:
        fits = [s for s in sizes if s <= left]
        out.append(fits[-1] if fits else sizes[0])
        left -= out[-1]
    return out


RawDiT = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def raw_dit(backend: Any) -> RawDiT:
    """The backend's unguided DiT: (x, t, cross_attn_cond, global_embed) -> v, any batch size."""
    dit = backend.dit
    if hasattr(dit, "run"):  # OrtDiT, TrtDiT
        return dit.run
    model = getattr(dit, "model", None)  # stable-audio-tools' DiTWrapper -> DiffusionTransformer
    if model is None:
        raise InputError(f"backend '{backend.name}' has no batchable DiT")
    return lambda x, t, cross, g: model(x, t, cross_attn_cond=cross, global_embed=g, cfg_scale=1.0)


class GuidedBatchDiT:
    """Per-row classifier-free guidance over one DiT call: rows 0..n-1 conditioned, then the unconditioned
    rows (zero cross-attention tokens, same global embedding) of the requests whose cfg_scale != 1."""

    def __init__(self, run: RawDiT, cfg_scales: Sequence[float], batch_sizes: Sequence[int] | None = None) -> None:
        self.run = run
        self.cfg = torch.tensor([float(c) for c in cfg_scales], dtype=torch.float32)
        self.guided = [i for i, c in enumerate(cfg_scales) if float(c) != 1.0]
        self.batch_sizes = sorted(set(batch_sizes)) if batch_sizes else None
        self.calls = 0
        self.rows = 0

    def _run_rows(self, x: torch.Tensor, t: torch.Tensor, cross: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        if self.batch_sizes is None or x.shape[0] in self.batch_sizes:
            return self.run(x, t, cross, g)
        outs, start, n = [], 0, x.shape[0]
        for size in split_rows(n, self.batch_sizes):  # engines with fixed batch profiles (TensorRT)
            rows = list(range(start, min(start + size, n)))
            rows += [rows[-1]] * (size - len(rows))  # pad by repeating the last row; dropped below
            outs.append(self.run(x[rows], t[rows], cross[rows], g[rows])[:min(size, n - start)])
            start += size
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cross_attn_cond: torch.Tensor | None = None,
                 global_cond: torch.Tensor | None = None, **_ignored: Any) -> torch.Tensor:
        if cross_attn_cond is None or global_cond is None:
            raise ValueError("the exported DiT needs cross-attention and global conditioning")
        n, idx = x.shape[0], self.guided
        if not idx:
            return self._run_rows(x, t, cross_attn_cond, global_cond)
        out = self._run_rows(torch.cat([x, x[idx]]), torch.cat([t, t[idx]]),
                             torch.cat([cross_attn_cond, torch.zeros_like(cross_attn_cond[idx])]),
                             torch.cat([global_cond, global_cond[idx]]))
        cond, uncond = out[:n], out[n:]
        mixed = cond.clone()
        scale = self.cfg[idx].to(out.device).view(-1, *([1] * (x.dim() - 1)))
        mixed[idx] = uncond + (cond[idx] - uncond) * scale
        return mixed


@dataclass
class BatchResult:
    latents: torch.Tensor  # [n, C, L]
    audio: list[torch.Tensor]  # n x [2, samples_i], each trimmed to its request's length
    sample_rate: int
    dit_calls: int
    dit_rows: int


@torch.no_grad()
def sample_batch(pipeline: Pipeline, requests: Sequence[GenerateOptions], dit_batch_sizes: Sequence[int] | None = None,
                 on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, GuidedBatchDiT]:
    """Latents [n, C, L] of `requests` (all with one BatchKey) from one batched sampler run.

    `on_step(i)` is called before each DiT evaluation; raising from it abandons the batch."""
    import k_diffusion as K
    from stable_audio_tools.models.diffusion import ConditionedDiffusionModelWrapper

    if not requests:
        raise ValueError("no requests")
    for opts in requests:
        opts.validate(pipeline.max_seconds)
    keys = {batch_key(pipeline, o) for o in requests}
    if len(keys) != 1:
        raise ValueError(f"requests of one batch must share latent length, steps and sampler settings: {keys}")
    key = keys.pop()
    if key.sampler_type not in BATCHABLE_SAMPLERS:
        raise InputError(f"sampler '{key.sampler_type}' cannot be batched (batchable: "
                         f"{', '.join(sorted(BATCHABLE_SAMPLERS))})")
    device = getattr(pipeline.backend, "device", "cpu")
    shape = (pipeline.dims["io_channels"], key.latent_length)
    states = [initial_state(o, shape) for o in requests]
    noise = torch.cat([s[0] for s in states]).to(device)
    text_id = pipeline.manifest["conditioning"]["text_id"]
    metadata = [{text_id: o.prompt, "seconds_start": o.seconds_start, "seconds_total": o.seconds} for o in requests]
    inputs = ConditionedDiffusionModelWrapper.get_conditioning_inputs(pipeline._ids,
                                                                      pipeline.backend.conditioning(metadata))
    dit = GuidedBatchDiT(raw_dit(pipeline.backend), [o.cfg_scale for o in requests], dit_batch_sizes)
    denoiser = K.external.VDenoiser(dit)
    sigmas = K.sampling.get_sigmas_polyexponential(key.steps, key.sigma_min, key.sigma_max, key.rho, device=device)
    x = noise * sigmas[0]
    extra_args = {"cross_attn_cond": inputs["cross_attn_cond"], "global_cond": inputs["global_cond"]}
    kwargs: dict[str, Any] = {}
    if key.sampler_type in BROWNIAN_SAMPLERS:
        kwargs["noise_sampler"] = PerRequestNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), [s[1] for s in states])
    callback = (lambda info: on_step(int(info["i"]) + 1)) if on_step is not None else None
    sampler = getattr(K.sampling, BATCHABLE_SAMPLERS[key.sampler_type])
    if on_step is not None:
        on_step(0)
    latents = sampler(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=True, **kwargs)
    return latents, dit


@torch.no_grad()
def generate_batch(pipeline: Pipeline, requests: Sequence[GenerateOptions], dit_batch_sizes: Sequence[int] | None = None,
                   on_step: Callable[[int], None] | None = None) -> BatchResult:
    """Audio of each request from one batched sampler run; the VAE decodes one latent at a time, as the
    single run does (VAE activations are the largest of the pipeline)."""
    latents, dit = sample_batch(pipeline, requests, dit_batch_sizes, on_step)
    rate = pipeline.dims["sample_rate"]
    audio = []
    for i, opts in enumerate(requests):
        decoded = pipeline.backend.decode(latents[i:i + 1].float())
        audio.append(decoded[0, :, :int(round(opts.seconds * rate))])
    return BatchResult(latents=latents, audio=audio, sample_rate=rate, dit_calls=dit.calls, dit_rows=dit.rows)
