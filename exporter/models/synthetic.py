"""Synthetic weights that look trained to a quantizer, and the measurement that shows it.

Random init gives a DiT with no outlier channels and no timestep effect (channel abs-max ratios of
1.3-3.4x, range growth 0.9-1.2x; ARCHITECTURE.md section 5), and stable-audio-tools zero-initialises
`to_out`, the FF output and the pre/post 1x1 convolutions, which would make those layers trivially
exact under quantization. `shape_like_trained` puts in the structure seen in trained transformers:

- outlier input channels of the attention and FF projections come from a few large LayerNorm scale
  (gamma) entries (a LayerNorm output is bounded by sqrt(C) per token, so outliers after it can only
  come from gamma); the matching weight columns shrink by 1/sqrt(gamma) as they do in trained nets;
- `to_out` and the FF output Linear see outliers from a few large rows of the value / GLU projections;
- cross-attention `to_kv` sees outliers from a few large rows of the condition-embedding MLP;
- the timestep MLP carries a t-dependent magnitude into a few channels of the prepended global token
  (a "massive activation" on a special token), which grows as the sampler approaches t -> 0, so the
  transformer-block inputs grow in range over the trajectory as in seed 000's Fig. 2.

Deterministic by seed. The weights are synthetic and the manifest says so.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from calibration.collector import ActivationCollector, BucketSpec
from calibration.observers import outlier_fraction, range_growth
from exporter.models.layers import quantizable_linears, transformer_blocks

log = logging.getLogger(__name__)

OUTLIER_FRACTION = 0.02      # share of channels made outliers (the requirement is >= 1%)
GAMMA_RANGE = (40.0, 80.0)   # outlier LayerNorm scales / row gains
BRANCH_STD = 0.1             # to_out / FF-out init, x 1/sqrt(fan_in): residual grows gently with depth
MASSIVE_UNITS = 4            # channels of the global token that carry the t-dependent magnitude
MASSIVE_GAIN = 20.0          # their value near t -> 0 is about 7.7 x this
TIME_FREQ = 0.2              # a Fourier feature sin(2 pi 0.2 t), monotone on the sampler's t in (0, 1]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _pick(n: int, g: torch.Generator, frac: float = OUTLIER_FRACTION) -> torch.Tensor:
    return torch.randperm(n, generator=g)[: max(1, math.ceil(frac * n))]


def _init_branch(linear: nn.Module, g: torch.Generator, std: float = BRANCH_STD) -> None:
    fan_in = linear.weight.shape[1]
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * std / math.sqrt(fan_in))
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=g) * 0.01)


def _gamma_outliers(norm: nn.Module, consumers: list[nn.Linear], g: torch.Generator,
                    massive: torch.Tensor) -> None:
    dim = norm.gamma.shape[0]
    norm.gamma.copy_(1.0 + 0.1 * torch.randn(dim, generator=g))
    # The massive channels are among the large-gamma ones (as in trained transformers, where the
    # attention-sink token's channels are amplified): the global token's normalised value in them grows
    # as t -> 0, which carries the timestep effect past the LayerNorm into the Linear inputs.
    idx = torch.unique(torch.cat([_pick(dim, g), massive]))
    gain = _uniform(len(idx), *GAMMA_RANGE, g)
    norm.gamma[idx] = gain
    for linear in consumers:
        linear.weight[:, idx] /= gain.sqrt()


def _row_outliers(weight: torch.Tensor, rows: slice, g: torch.Generator) -> None:
    block = weight[rows]
    idx = _pick(block.shape[0], g)
    block[idx] *= _uniform(len(idx), *GAMMA_RANGE, g)[:, None]


def _shape_block(block: nn.Module, g: torch.Generator, massive: torch.Tensor) -> None:
    dim = block.dim
    sa = block.self_attn
    _gamma_outliers(block.pre_norm, [sa.to_qkv], g, massive)
    _row_outliers(sa.to_qkv.weight, slice(2 * dim, 3 * dim), g)  # value rows -> to_out input outliers
    _init_branch(sa.to_out, g)
    if block.cross_attend:
        ca = block.cross_attn
        _gamma_outliers(block.cross_attend_norm, [ca.to_q], g, massive)
        kv = ca.to_kv.weight.shape[0] // 2
        _row_outliers(ca.to_kv.weight, slice(kv, 2 * kv), g)
        _init_branch(ca.to_out, g)
    glu, ff_out = block.ff.ff[0], block.ff.ff[2]
    _gamma_outliers(block.ff_norm, [glu.proj], g, massive)
    _row_outliers(glu.proj.weight, slice(0, glu.proj.weight.shape[0] // 2), g)  # GLU value half
    _init_branch(ff_out, g)


def _massive_timestep_token(dit: nn.Module, g: torch.Generator, channels: torch.Tensor) -> None:
    """Make a few channels of the timestep embedding ~ A * (1 - sin(2 pi f t)), large as t -> 0."""
    feats = dit.timestep_features.weight  # [F/2, 1]: features are [cos(2 pi w t), sin(2 pi w t)]
    half = feats.shape[0]
    feats[0, 0] = TIME_FREQ
    lin1, lin2 = dit.to_timestep_embed[0], dit.to_timestep_embed[2]
    units = torch.randperm(lin1.weight.shape[0], generator=g)[:MASSIVE_UNITS]
    amp = 10.0
    for u, c in zip(units.tolist(), channels.tolist()):
        lin1.weight[u] = 0.0
        lin1.weight[u, half] = -amp
        lin1.bias[u] = amp
        lin2.weight[:, u] = 0.0
        lin2.weight[c, u] = MASSIVE_GAIN


@torch.no_grad()
def shape_like_trained(wrapper: Any, seed: int) -> None:
    """Reshape the seeded random weights of a stable-audio-tools DiT wrapper in place (see module doc)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    dit = wrapper.model.model
    for conv in (dit.preprocess_conv, dit.postprocess_conv):
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1 / math.sqrt(conv.weight.shape[1]))
    massive = torch.randperm(dit.to_timestep_embed[2].weight.shape[0], generator=g)[:MASSIVE_UNITS]
    for block in dit.transformer.layers:
        _shape_block(block, g, massive)
    if hasattr(dit, "to_cond_embed"):
        _row_outliers(dit.to_cond_embed[2].weight, slice(None), g)
    _massive_timestep_token(dit, g, massive)


@torch.no_grad()
def measure_quantizer_view(wrapper: Any, prompts: list[str], steps: int = 20, seconds: float = 2.0,
                           cfg_scale: float = 7.0, seed: int = 0) -> dict[str, Any]:
    """Run the real sampler (stable-audio-tools' `generate_diffusion_cond`) with observers and report, per
    quantizable Linear, the fraction of input channels with abs-max >= 20x the median channel's, and per
    transformer block, the growth of its input range from the first to the last quarter of the steps.
    """
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    dit = wrapper.model.model
    linears, blocks = quantizable_linears(dit), transformer_blocks(dit)
    collector = ActivationCollector({**linears, **blocks}, BucketSpec((2.0, -1.0)), num_steps=steps)
    calls = {"n": 0}

    def step_counter(_module, args):
        collector.begin_step(calls["n"], float(args[1].reshape(-1)[0]))
        calls["n"] += 1

    ratio = wrapper.pretransform.downsampling_ratio
    sample_size = max(1, round(seconds * wrapper.sample_rate / ratio)) * ratio
    handle = wrapper.model.register_forward_pre_hook(step_counter)
    try:
        with collector:
            for i, prompt in enumerate(prompts):
                calls["n"] = 0
                cond = [{"prompt": prompt, "seconds_start": 0, "seconds_total": seconds}]
                generate_diffusion_cond(wrapper, steps=steps, cfg_scale=cfg_scale, conditioning=cond,
                                        sample_size=sample_size, seed=seed + i, device="cpu",
                                        sampler_type="dpmpp-3m-sde", sigma_min=0.3, sigma_max=500,
                                        return_latents=True)
    finally:
        handle.remove()
    outliers = {n: outlier_fraction(collector.state[f"{n}.ch_absmax"]) for n in linears}
    growth = {n: range_growth(collector.state[f"{n}.step_absmax"]) for n in blocks}
    return {"outlier_fraction": outliers, "range_growth": growth,
            "min_outlier_fraction": min(outliers.values()), "min_range_growth": min(growth.values()),
            "steps": steps, "prompts": len(prompts)}
