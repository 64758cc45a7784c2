"""Synthetic UNet weights that look trained to a quantizer (the UNet counterpart of `synthetic.py`).

Random init gives a UNet whose Conv2d and Linear inputs have no outlier channels (every GroupNorm and
LayerNorm scale is 1). A normalisation output is bounded per group, so in a trained UNet the outlier input
channels of a convolution come from a few large GroupNorm scale (gamma) entries, and those of the
transformer projections from LayerNorm gammas, with the consumer's weights on those channels smaller by
1/sqrt(gamma); the residual stream (read unnormalised by the shortcut, down- and up-sampling convolutions)
carries outliers from a few large output rows of each ResNet's `conv2`; attention's `to_out` and the GEGLU
output Linear see outliers from a few large value / GEGLU rows. `shape_like_trained` plants these,
deterministically by seed; `measure_quantizer_view` reports what a quantizer then sees over real sampler runs.

The timestep effect (block-input ranges that grow over the trajectory, seed 000's Fig. 2; ARCHITECTURE.md
section 5) has one way into a diffusers UNet: the timestep embedding, added per channel to each ResNet's
`conv1` output before `norm2` (diffusers `ResnetBlock2D.forward`, default `time_embedding_norm`). A GroupNorm
removes any magnitude a channel shares with its group, so a growing *range* needs a channel whose content is
the timestep alone: `_plant_timestep_growth` gives a few channels of each ResNet's `conv1` output nothing but
a timestep-embedding unit that rises as t -> 0 (`u(t) = A (1 - t/1000) - B` through the time MLP's SiLU,
near 0 over the first steps). While that unit is small the channel normalises to about 0; once it dominates
its group it normalises to sqrt(k - 1) (k channels per group) on every position, and `conv2` sums it
coherently over its 3x3 taps into a few residual-stream channels, which every later block reads. The
timestep MLP and `time_emb_proj` stay float (`unet_layers.KEEP_FLOAT`), as in the DiT.
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
TIME_RAMP = (12.0, 4.0)    # u(t) = A (1 - t/1000) - B: below 0 over the first ~third of the trajectory
TIME_GAIN = 5.0            # the timestep-embedding channel is TIME_GAIN * silu(u(t)), 0..~40
TIME_RESIDUAL = 100.0      # what each planted conv2 row adds to the residual stream once t -> 0


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
    _plant_timestep_growth(unet, g)
    _audible_vocoder(model.vocoder, g)


def _time_feature(unet: nn.Module) -> tuple[int, float, float]:
    """The sinusoidal timestep feature (of `unet.time_proj`) that is monotone over t in [0, 1000] and
    changes most: its index and its values at t = 0 and t = 1000."""
    ts = torch.linspace(0.0, 1000.0, 21)
    feats = unet.time_proj(ts).float()
    delta = feats[-1] - feats[0]
    monotone = (feats.diff(dim=0) * delta.sign() > 0).all(0)
    idx = int((delta.abs() * monotone).argmax())
    return idx, float(feats[0, idx]), float(feats[-1, idx])


def _plant_timestep_growth(unet: nn.Module, g: torch.Generator) -> None:
    """See the module docstring: one time-MLP unit -> one timestep-embedding channel -> a few channels of
    each ResNet's `conv1` output -> coherent `conv2` rows into the residual stream."""
    from diffusers.models.resnet import ResnetBlock2D

    idx, f0, f1 = _time_feature(unet)
    lin1, lin2 = unet.time_embedding.linear_1, unet.time_embedding.linear_2
    unit = int(torch.randint(lin1.weight.shape[0], (1,), generator=g))
    channel = int(torch.randint(lin2.weight.shape[0], (1,), generator=g))
    a, b = TIME_RAMP
    lin1.weight[unit] = 0.0  # u(t) = a (f(t) - f1) / (f0 - f1) - b: a - b at t = 0, -b at t = 1000
    lin1.weight[unit, idx] = a / (f0 - f1)
    lin1.bias[unit] = -a * f1 / (f0 - f1) - b
    lin2.weight[:, unit] = 0.0
    lin2.weight[channel] = 0.0
    lin2.weight[channel, unit] = TIME_GAIN
    lin2.bias[channel] = 0.0
    for module in unet.modules():
        if not isinstance(module, ResnetBlock2D) or module.time_emb_proj is None:
            continue
        norm, conv1, conv2 = module.norm2, module.conv1, module.conv2
        width, groups = conv1.weight.shape[0], norm.num_groups
        per_group = width // groups
        chosen = _pick(groups, g)
        rows = chosen * per_group + torch.randint(per_group, (len(chosen),), generator=g)
        settled = math.sqrt(max(per_group - 1, 1))  # the normalised value once the channel dominates its group
        gain = settled / (1 + math.exp(-settled))  # silu of it
        taps = conv2.weight.shape[2] * conv2.weight.shape[3]
        targets = _pick(conv2.weight.shape[0], g)
        for r in rows.tolist():
            conv1.weight[r] = 0.0
            conv1.bias[r] = 0.0
            module.time_emb_proj.weight[r] = 0.0
            module.time_emb_proj.weight[r, channel] = 1.0
            module.time_emb_proj.bias[r] = 0.0
            norm.weight[r] = 1.0
            norm.bias[r] = 0.0
            conv2.weight[:, r] = 0.0
            conv2.weight[targets, r] = TIME_RESIDUAL / (len(rows) * taps * gain)


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
    """Per quantizable layer, the fraction of input channels with abs-max >= 20x the median channel's and the
    growth of its input range from the first to the last quarter of the sampler's steps; the same growth of
    each block's input (`unet_layers.unet_blocks`: the residual stream); over real runs of the pipeline's own
    scheduler (`engines`-free: the model's own UNet forward)."""
    from calibration.collector import ActivationCollector, BucketSpec
    from calibration.observers import outlier_fraction, range_growth
    from exporter.models.unet_layers import unet_blocks
    from exporter.models.unet_sampling import sample_latents, torch_conditioning

    blocks = {f"block:{n}": m for n, m in unet_blocks(model.unet).items()}
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)] + list(blocks)
    collector = ActivationCollector({**layers, **blocks}, BucketSpec((1001.0, -1.0)), num_steps=steps,
                                    channels_first=convs)
    with collector:
        for i, prompt in enumerate(prompts):
            dims = model.dims()
            sample_latents(dims, model.scheduler_config, lambda x, t, c: model_call(model, x, t, c),
                           torch_conditioning(model, [prompt]), torch_conditioning(model, [""]), steps=steps,
                           cfg_scale=model.defaults["cfg_scale"], seconds=seconds or dims["default_seconds"],
                           seed=seed + i, on_step=lambda k, t: collector.begin_step(k, float(t)))
    outliers = {n: outlier_fraction(collector.state[f"{n}.ch_absmax"]) for n in layers}
    growth = {n: range_growth(collector.state[f"{n}.step_absmax"]) for n in layers}
    block_growth = {n.split(":", 1)[1]: range_growth(collector.state[f"{n}.step_absmax"]) for n in blocks}
    conv_outliers = [v for n, v in outliers.items() if isinstance(layers[n], nn.Conv2d)]
    return {"outlier_fraction": outliers, "range_growth": growth, "block_range_growth": block_growth,
            "share_with_outliers": sum(v >= 0.01 for v in outliers.values()) / len(outliers),
            "conv_share_with_outliers": sum(v >= 0.01 for v in conv_outliers) / max(1, len(conv_outliers)),
            "median_range_growth": float(torch.tensor(list(growth.values())).median()),
            "median_block_range_growth": float(torch.tensor(list(block_growth.values())).median()),
            "steps": steps, "prompts": len(prompts)}


def model_call(model: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """One UNet evaluation as the pipelines make it (AudioLDM: class_labels; TANGO: context and its mask)."""
    from exporter.models.unet_text import unet_kwargs

    return model.unet(x, t, **unet_kwargs(model.family, cond)).sample
