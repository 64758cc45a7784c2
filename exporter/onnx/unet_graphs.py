"""The UNet family's graphs: text encoder, UNet, VAE decoder (to the mel spectrogram) and vocoder.

Interface (names are stable; float32 at every boundary; B and the frame axis are dynamic):

| graph | inputs | outputs |
|---|---|---|
| `text_encoder.onnx` (AudioLDM) | `input_ids`, `attention_mask` [B, S] int64 | `class_labels` [B, E] |
| `text_encoder.onnx` (TANGO) | the same | `encoder_hidden_states` [B, S, D], `encoder_attention_mask` [B, S] |
| `unet.onnx` | `sample` [B, C, H, W], `timestep` [B], then the text encoder's outputs | `noise_pred` [B, C, H, W] |
| `vae_decoder.onnx` | `latents` [B, C, H, W] | `mel` [B, 1, H * 4, W * 4] |
| `vocoder.onnx` | `mel` [B, T, M] | `waveform` [B, T * 160] |

The VAE graph includes the pipeline's `1 / scaling_factor`, the text graph CLAP's L2 normalisation, so each
graph's output is what the pipeline passes on.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import nn

from exporter.models.unet_text import encode_text, text_outputs, unet_kwargs

TEXT_INPUTS = ("input_ids", "attention_mask")
UNET_INPUTS = ("sample", "timestep")
UNET_OUTPUTS = ("noise_pred",)
VAE_INPUTS, VAE_OUTPUTS = ("latents",), ("mel",)
VOCODER_INPUTS, VOCODER_OUTPUTS = ("mel",), ("waveform",)


class UNetTextGraph(nn.Module):
    def __init__(self, family: str, encoder: nn.Module) -> None:
        super().__init__()
        self.family, self.encoder = family, encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = encode_text(self.family, self.encoder, input_ids, attention_mask)
        return tuple(out[k] for k in text_outputs(self.family))


class UNetGraph(nn.Module):
    """`UNet2DConditionModel.forward(...).sample` with the family's conditioning as positional inputs."""

    def __init__(self, family: str, unet: nn.Module) -> None:
        super().__init__()
        self.family, self.unet = family, unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        # explicit arguments, not *cond: torch.export's dynamic shapes follow the positional signature
        named = dict(zip(text_outputs(self.family), (cond, cond_mask)))
        return self.unet(sample, timestep, **unet_kwargs(self.family, named)).sample


class MelDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents * self.inv_scale).sample


class VocoderGraph(nn.Module):
    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.vocoder(mel)


def _broadcast_mask(attn: Any, attention_mask: torch.Tensor, target_length: int, batch_size: int,
                    out_dim: int = 3) -> torch.Tensor:
    """`Attention.prepare_attention_mask` for one mask row per sample ([B, 1, L] additive): repeated over
    the heads by expand + reshape. diffusers' own method uses `repeat_interleave(output_size=...)`, which
    torch.export specialises to the example's batch; the values are the same."""
    b, _, length = attention_mask.shape
    mask = attention_mask[:, None].expand(b, attn.heads, 1, length)
    return mask.reshape(b * attn.heads, 1, length) if out_dim == 3 else mask


@contextlib.contextmanager
def exportable_masks(unet: nn.Module) -> Iterator[None]:
    """While exporting, cross-attention masks are repeated over heads with `_broadcast_mask`; restored after,
    so the parity reference is diffusers' unpatched forward."""
    from diffusers.models.attention_processor import Attention

    patched = [m for m in unet.modules() if isinstance(m, Attention)]
    for m in patched:
        m.prepare_attention_mask = types.MethodType(_broadcast_mask, m)
    try:
        yield
    finally:
        for m in patched:
            del m.prepare_attention_mask


def unet_inputs(family: str) -> tuple[str, ...]:
    return UNET_INPUTS + text_outputs(family)


def graph_modules(model: Any) -> dict[str, nn.Module]:
    """The four graph modules of a `UNetAudioModel`, FP32."""
    return {"text_encoder": UNetTextGraph(model.family, model.text_encoder).eval(),
            "unet": UNetGraph(model.family, model.unet).eval(),
            "vae_decoder": MelDecoderGraph(model.vae).eval(),
            "vocoder": VocoderGraph(model.vocoder).eval()}
