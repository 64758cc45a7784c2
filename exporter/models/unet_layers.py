"""Which layers of a diffusers `UNet2DConditionModel` are quantized, and which stay in floating point.

Quantized: every dense Conv2d (group 1) and Linear of the down, mid and up blocks: the ResNet convolutions
and shortcuts, the down/up-sampling convolutions, the transformer blocks' 1x1 `proj_in`/`proj_out`,
attention projections and feed-forward layers. Kept in floating point, as for the DiT (ARCHITECTURE.md
section 3; ModelOpt's diffusers recipe and PTQ4ADM keep them too): the first and last convolutions
(`conv_in`, `conv_out`: the latent's few channels carry the whole signal), the timestep and class/text
embeddings (`time_embedding`, `class_embedding`, `add_embedding`, `encoder_hid_proj`), and the ResNets'
`time_emb_proj` (a Linear on the timestep embedding: the conditioning path, tiny in FLOPs).
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

KEEP_FLOAT = ("conv_in", "conv_out", "time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj",
              "time_emb_proj")


def quantizable_unet_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path, module) of each layer the UNet passes quantize, in module order."""
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if any(part in KEEP_FLOAT for part in name.split(".")):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        yield name, module


def unet_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """The ResNets and transformers of the down, mid and up blocks: their inputs are the residual stream, the
    UNet's counterpart of the DiT's transformer-block inputs (where range growth over the trajectory is measured)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (ResnetBlock2D, Transformer2DModel)) and name.split(".")[0] in
            ("down_blocks", "mid_block", "up_blocks")}
