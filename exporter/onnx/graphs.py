"""The torch modules that become the exported ONNX graphs, with the interface of ARCHITECTURE.md section 2.

Each wraps stable-audio-tools' own modules and calls their own forward code; nothing is re-implemented.
Graph boundaries are float32 (int64 for token ids) in every scheme, so a runtime never needs to know the
scheme to feed a graph; an FP16 graph casts inside.
"""
from __future__ import annotations

import torch
from torch import nn

# ONNX tensor names of the graph interface (tools outside the project rely on them).
DIT_INPUTS = ("x", "t", "cross_attn_cond", "global_embed")
DIT_OUTPUTS = ("v",)
TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUTS = ("last_hidden_state",)
VAE_INPUTS = ("latents",)
VAE_OUTPUTS = ("audio",)


class DiTGraph(nn.Module):
    """One DiT evaluation (`DiffusionTransformer._forward`, after the CFG batching that `forward` does):
    x [B, C, L], t [B], cross_attn_cond [B, S, D], global_embed [B, G] -> v [B, C, L]."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit
        self.dtype = next(dit.transformer.parameters()).dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, cross_attn_cond: torch.Tensor,
                global_embed: torch.Tensor) -> torch.Tensor:
        # t stays FP32: it only feeds the timestep path, which is an FP32 island in FP16 graphs.
        v = self.dit._forward(x.to(self.dtype), t.float(), cross_attn_cond=cross_attn_cond.to(self.dtype),
                              global_embed=global_embed.to(self.dtype))
        return v.float()


class TextEncoderGraph(nn.Module):
    """stable-audio-tools' T5Conditioner after tokenisation: T5 encoder, the conditioner's proj_out, and
    its zeroing of padded positions. input_ids, attention_mask [B, S] int64 -> last_hidden_state [B, S, D]."""

    def __init__(self, conditioner: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = conditioner.model if encoder is None else encoder  # e.g. precision.fp16_t5's copy
        self.proj_out = conditioner.proj_out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"]
        hidden = self.proj_out(hidden.float())
        return hidden * attention_mask.unsqueeze(-1).float()


class NumberConditionersGraph(nn.Module):
    """The number conditioners (seconds_start, seconds_total, ...): each input [B] float seconds ->
    output of the same name [B, 1, D], as NumberConditioner.forward computes it (clamp, normalise, embed)."""

    def __init__(self, conditioners: dict[str, nn.Module]) -> None:
        super().__init__()
        self.ids = list(conditioners)
        self.conds = nn.ModuleList(conditioners.values())

    def forward(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for value, cond in zip(values, self.conds):
            value = value.clamp(cond.min_val, cond.max_val)
            normalized = (value - cond.min_val) / (cond.max_val - cond.min_val)
            outs.append(cond.embedder(normalized).unsqueeze(1))
        return tuple(outs)


class VAEDecoderGraph(nn.Module):
    """The autoencoder pretransform's decode: latents [B, 64, L] -> audio [B, 2, L * 2048]."""

    def __init__(self, pretransform: nn.Module) -> None:
        super().__init__()
        self.pretransform = pretransform

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as AutoencoderPretransform.decode with iterate_batch=False (the batch loop
        # would be unrolled into the graph at a fixed batch size). FP32 in and out whatever the
        # pretransform's dtype (precision.fp16_vae), so every backend feeds and reads the same tensors.
        dtype = next(self.pretransform.parameters()).dtype
        latents = latents.to(dtype) * self.pretransform.scale
        return self.pretransform.model.decode(latents, iterate_batch=False).float()
