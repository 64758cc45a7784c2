"""Synthetic UNet weights that look trained to a quantizer (the UNet counterpart of `synthetic.py`).

Random init gives a UNet whose Conv2d and Linear inputs have no outlier channels (every GroupNorm and
LayerNorm scale is 1). A normalisation output is bounded per group, so in a trained UNet the outlier input
channels of a convolution come from a few large GroupNorm scale (gamma) entries, and those of the
transformer projections from LayerNorm gammas, with the consumer's weights on those channels smaller by
1/sqrt(gamma); the residual stream (read unnormalised by the shortcut, down- and up-sampling convolutions)
carries outliers from a few large output rows of each ResNet's `conv2`; attention's `to_out` and the GEGLU
output Linear see outliers from a few large value / GEGLU rows. `shape_like_trained` plants these,
deterministically by seed; `measure_quantizer_view` reports what a quantizer then sees over real sampler runs.
The text encoder and VAE keep their seeded init (they stay unquantized); the vocoder's conv weights are
scaled to their fan-in so that it writes audible audio (`_audible_vocoder`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

OUTLIER_FRACTION = 0.03   # share of channels made outliers (the requirement is >= 1%)
GAMMA_RANGE = (30.0, 60.0)
ROW_RANGE = (10.0, 20.0)


def _pick(n: int, g: torch.Generator, frac: float = OUTLIER_FRACTION) -> torch.Tensor:
    return torch.randperm(n, generator=g)[: max(1, math.ceil(frac * n))]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gamma_outliers(norm: nn.Module, consumers: list[nn.Module], g: torch.Generator) -> None:
    """Large scale entries on a few channels of `norm`; the consumers' weights on them shrink by 1/sqrt."""
    dim = norm.weight.shape[0]
    norm.weight.copy_(1.0 + 0.1 * torch.randn(dim, generator=g))
    idx = _pick(dim, g)
    gain = _uniform(len(idx), *GAMMA_RANGE, g)
    norm.weight[idx] = gain
    for layer in consumers:
        shape = (1, -1) + (1,) * (layer.weight.dim() - 2)  # Linear [out, in]; Conv2d [out, in, kh, kw]
        scale = torch.ones(dim)
        scale[idx] = gain.rsqrt()
        layer.weight.mul_(scale.reshape(shape))


def _row_outliers(weight: torch.Tensor, g: torch.Generator, rows: slice = slice(None)) -> None:
    block = weight[rows]
    idx = _pick(block.shape[0], g)
    block[idx] *= _uniform(len(idx), *ROW_RANGE, g).reshape((-1,) + (1,) * (block.dim() - 1))


def _shape_resnet(resnet: nn.Module, g: torch.Generator) -> None:
    _gamma_outliers(resnet.norm1, [resnet.conv1], g)
    _gamma_outliers(resnet.norm2, [resnet.conv2], g)
    _row_outliers(resnet.conv2.weight, g)  # residual-stream outlier channels


def _shape_transformer(t2d: nn.Module, g: torch.Generator) -> None:
    _gamma_outliers(t2d.norm, [t2d.proj_in], g)
    for block in t2d.transformer_blocks:
        a1 = block.attn1
        _gamma_outliers(block.norm1, [a1.to_q, a1.to_k, a1.to_v], g)
        _row_outliers(a1.to_v.weight, g)
        if block.attn2 is not None:
            a2 = block.attn2
            # without a context (AudioLDM) attn2 reads norm2's output for q, k and v
            consumers = [a2.to_q] + ([] if a2.is_cross_attention else [a2.to_k, a2.to_v])
            _gamma_outliers(block.norm2, consumers, g)
            _row_outliers(a2.to_v.weight, g)
        proj = block.ff.net[0].proj
        _gamma_outliers(block.norm3, [proj], g)
        _row_outliers(proj.weight, g, slice(0, proj.weight.shape[0] // 2))  # GEGLU's value half


@torch.no_grad()
def shape_like_trained(model: Any, seed: int) -> None:
    """Reshape the seeded random weights of `model.unet` in place (see the module docstring)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    g = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    unet = model.unet
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            _shape_resnet(module, g)
        elif isinstance(module, Transformer2DModel):
            _shape_transformer(module, g)
    _gamma_outliers(unet.conv_norm_out, [unet.conv_out], g)
    _audible_vocoder(model.vocoder, g)


def _audible_vocoder(vocoder: nn.Module, g: torch.Generator) -> None:
    """Fan-in scaled conv weights (std 1/sqrt(fan_in)): SpeechT5HifiGan's own init (std 0.01) shrinks the
    signal about 10x per layer, so a random vocoder writes a WAV of peak 1e-9 (silence to a listener and a
    0/0 to an audio SNR); with this init its output peaks near 0.5 on a unit-variance mel."""
    for module in vocoder.modules():
        if isinstance(module, nn.Conv1d):
            fan_in = module.weight.shape[1] * module.weight.shape[2]
        elif isinstance(module, nn.ConvTranspose1d):
            fan_in = module.weight.shape[0] * module.weight.shape[2] // module.stride[0]
        else:
            continue
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in ** 0.5)


@torch.no_grad()
def measure_quantizer_view(model: Any, layers: dict[str, nn.Module], prompts: list[str], steps: int = 10,
                           seconds: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Per quantizable layer, the fraction of input channels with abs-max >= 20x the median channel's, and
    the growth of its input range from the first to the last quarter of the sampler's steps, over real runs
    of the pipeline's own scheduler (`engines`-free: the torch forward of `unet_graphs`)."""
    from calibration.collector import ActivationCollector, BucketSpec
    from calibration.observers import outlier_fraction, range_growth
    from exporter.models.unet_sampling import sample_latents, torch_conditioning

    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    collector = ActivationCollector(layers, BucketSpec((1001.0, -1.0)), num_steps=steps, channels_first=convs)
    with collector:
        for i, prompt in enumerate(prompts):
            dims = model.dims()
            sample_latents(dims, model.scheduler_config, lambda x, t, c: model_call(model, x, t, c),
                           torch_conditioning(model, [prompt]), torch_conditioning(model, [""]), steps=steps,
                           cfg_scale=model.defaults["cfg_scale"], seconds=seconds or dims["default_seconds"],
                           seed=seed + i, on_step=lambda k, t: collector.begin_step(k, float(t)))
    outliers = {n: outlier_fraction(collector.state[f"{n}.ch_absmax"]) for n in layers}
    growth = {n: range_growth(collector.state[f"{n}.step_absmax"]) for n in layers}
    return {"outlier_fraction": outliers, "range_growth": growth,
            "share_with_outliers": sum(v >= 0.01 for v in outliers.values()) / len(outliers),
            "median_range_growth": float(torch.tensor(list(growth.values())).median()),
            "steps": steps, "prompts": len(prompts)}


def model_call(model: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """One UNet evaluation as the pipelines make it (AudioLDM: class_labels; TANGO: context and its mask)."""
    from exporter.models.unet_text import unet_kwargs

    return model.unet(x, t, **unet_kwargs(model.family, cond)).sample
