"""FP16 copies of the DiT, the T5 encoder and the VAE decoder with FP32 islands where the numerics need them.

A strongly typed TensorRT build keeps exactly the types the ONNX graph carries (TRT 10.12 deprecated and
TRT 11 removed the FP16 builder flag), so the graph itself must say FP32 where FP16 is not good enough:
- LayerNorm: mean/variance over 1536 channels with outlier channels of 40-80x lose digits in FP16;
  stable-audio-tools' own `force_fp32` switch computes it in FP32 and casts back.
- RoPE: position x frequency products reach ~1e3 at 1024 tokens; FP16 keeps 3 digits, so the angles
  would be off by radians. The rotary module and `apply_rotary_pos_emb` run in FP32.
- The timestep path (Fourier features and the timestep MLP): sin/cos of 2*pi*w*t with |w| up to ~4 and
  the t-dependent magnitudes of the global token; kept FP32, cast to FP16 where it joins the stream.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _cast_inputs(dtype: torch.dtype):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    return hook


def _cast_output(dtype: torch.dtype):
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return hook


def fp16_dit(dit: nn.Module) -> nn.Module:
    """A deep copy of a DiffusionTransformer in FP16 with the FP32 islands above."""
    from stable_audio_tools.models.transformer import LayerNorm

    half = copy.deepcopy(dit).half()
    for module in half.modules():
        if isinstance(module, LayerNorm):
            module.force_fp32 = True
    if half.transformer.rotary_pos_emb is not None:
        half.transformer.rotary_pos_emb.float()
    half.timestep_features.float()
    half.to_timestep_embed.float()
    half.timestep_features.register_forward_pre_hook(_cast_inputs(torch.float32))
    half.to_timestep_embed.register_forward_hook(_cast_output(torch.float16))
    return half


def fp16_t5(encoder: nn.Module) -> nn.Module:
    """A deep copy of a Hugging Face T5 encoder in FP16 with transformers' own FP32 island: the feed-forward
    output projection `wo` (T5's `_keep_in_fp32_modules`). Its input is the ReLU/GELU expansion whose
    products overflow FP16 in trained T5 checkpoints; transformers casts into `wo`'s dtype, so the residual
    stream after the first block stays FP32 and T5LayerNorm casts back to FP16 for attention and `wi`."""
    half = copy.deepcopy(encoder).half()
    for module in half.modules():
        wo = getattr(module, "wo", None)
        if isinstance(wo, nn.Linear):
            wo.float()
    return half


def fp16_vae(pretransform: nn.Module, config: dict, sample_rate: int) -> nn.Module:
    """An FP16 copy of the autoencoder pretransform. The Oobleck decoder is convolutions and Snake activations
    over bounded audio-rate signals, with no reduction wide enough to lose digits in FP16.

    Rebuilt from its config and state dict rather than deep-copied: its convolutions use the old-style
    `weight_norm` hook, whose computed `weight` is a non-leaf tensor that deepcopy refuses."""
    from stable_audio_tools.models.factory import create_pretransform_from_config

    half = create_pretransform_from_config(copy.deepcopy(config), sample_rate)
    # AutoencoderPretransform.load_state_dict forwards to its autoencoder, so load at that level
    half.model.load_state_dict(pretransform.model.state_dict())
    return half.eval().requires_grad_(False).half()


def fp16_unet(unet: nn.Module) -> nn.Module:
    """A deep copy of a diffusers `UNet2DConditionModel` in FP16 with FP32 islands, for the TensorRT target's
    strongly typed graph (the UNet analogue of `fp16_dit`):
    - GroupNorm and LayerNorm: mean/variance over C/G x H x W values with 20-80x outlier channels lose
      digits in FP16 (the same reason as the DiT's LayerNorm); computed in FP32 and cast back.
    Everything else is FP16 as diffusers' own FP16 pipelines run it: convolutions, Linears, attention
    (Q.K^T -> Softmax -> .V, what TensorRT fuses) and the timestep MLP (its input is the sinusoidal features,
    bounded by 1, which diffusers casts to the UNet's dtype; unlike the DiT's, whose Fourier features are FP32
    for the angle products), so no GEMM or convolution of the graph runs in FP32."""
    half = copy.deepcopy(unet).half()
    for module in half.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.float()
            module.register_forward_pre_hook(_cast_inputs(torch.float32))
            module.register_forward_hook(_cast_output(torch.float16))
    return half
