"""The text path of the UNet family, as the pipelines compute it (shared by the graphs and the reference).

AudioLDM (`AudioLDMPipeline._encode_prompt`): CLAP's `text_embeds`, L2-normalised over the last dim, enter
the UNet as `class_labels`. TANGO: the T5 encoder's `last_hidden_state` enters by cross-attention with the
tokenizer's mask as `encoder_attention_mask` (diffusers turns it into an additive -10000 bias). Make-An-Audio
(`exporter.models.unet_ldm`): the caption encoder's per-token output by cross-attention with no mask at all (its
BERT sees `input_ids` alone); the graph keeps TANGO's interface with a mask of ones, which adds 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def text_outputs(family: str) -> tuple[str, ...]:
    """The UNet conditioning inputs a family's text encoder produces, in graph order."""
    return ("class_labels",) if family == "audioldm" else ("encoder_hidden_states", "encoder_attention_mask")


def encode_text(family: str, encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask [B, S] -> the UNet's conditioning inputs (see the module docstring)."""
    if family == "audioldm":
        embeds = encoder(input_ids, attention_mask=attention_mask).text_embeds
        return {"class_labels": F.normalize(embeds, dim=-1)}
    if family == "make-an-audio":
        hidden = encoder(input_ids)
        # attention_mask * 0 + 1 rather than ones_like: the graph input stays a graph input
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": (attention_mask * 0 + 1).to(hidden.dtype)}
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return {"encoder_hidden_states": hidden, "encoder_attention_mask": attention_mask.to(hidden.dtype)}


def unet_kwargs(family: str, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel.forward` keyword arguments for the conditioning dict."""
    if family == "audioldm":
        return {"encoder_hidden_states": None, "class_labels": cond["class_labels"]}
    return {"encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_attention_mask": cond["encoder_attention_mask"]}
