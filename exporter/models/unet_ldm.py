"""Make-An-Audio (Text-to-Audio/Make-An-Audio): its text encoder, and its latent-diffusion checkpoint layout.

Make-An-Audio is a CompVis latent-diffusion model (`ldm.models.diffusion.ddpm_audio.LatentDiffusion_audio`,
its `configs/text_to_audio/txt2audio_args.yaml`): an `openaimodel.UNetModel` with spatial transformers over a
4-channel mel latent, cross-attending (`conditioning_key: crossattn`) to the per-token output of
`FrozenCLAPEmbedder` (`ldm/modules/encoders/modules.py`): MS-CLAP's caption encoder, a BERT run on
`input_ids` alone (no attention mask; padded to 77 tokens) whose `last_hidden_state` goes through CLAP's
`Projection` (linear1 -> GELU -> linear2, added to linear1's output, LayerNorm) to `context_dim`. CFG's
unconditioned input is the embedding of the empty prompt (its `gen_wav.py`).

Checkpoints keep the LatentDiffusion module tree: `model.diffusion_model.*` (the UNet),
`first_stage_model.*` (the KL autoencoder) and `cond_stage_model.*` (the text encoder). quadit reads the UNet
with diffusers' own conversion, `diffusers.loaders.single_file_utils.create_unet_diffusers_config_from_ldm`
(the diffusers config from the LDM yaml) and `convert_ldm_unet_checkpoint` (the keys), into diffusers'
`UNet2DConditionModel`; the autoencoder likewise with `create_vae_diffusers_config_from_ldm` and
`convert_ldm_vae_checkpoint`, into `AutoencoderKL`. `ldm_unet_state_dict` is the inverse key mapping (the
openaimodel layout of a diffusers UNet), used to write such a file from a diffusers model.

Simplifications (stated in docs/models.md): the latent is laid out [B, C, time, mel] as AudioLDM's pipeline
has it (Make-An-Audio's own code puts mel on H, time on W); the mini's tokenizer is ByT5's file-free byte
tokenizer (Make-An-Audio: bert-base-uncased's); its vocoder is transformers' `SpeechT5HifiGan` at hop 256
(Make-An-Audio ships a separate BigVGAN checkpoint, not read here).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.caption_encoder."
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


class CaptionProjection(nn.Module):
    """MS-CLAP's `Projection` (the parameter names of its state dict): LayerNorm(l1 + l2(gelu(l1))), l1 = linear1(x)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.linear1(x)
        return self.layer_norm(first + self.linear2(F.gelu(first)))


class CaptionEncoder(nn.Module):
    """`FrozenCLAPEmbedder.caption_encoder`: transformers' `BertModel` (`base`) and the projection, per token."""

    def __init__(self, bert_config: Any, projection_dim: int) -> None:
        super().__init__()
        from transformers import BertModel

        self.base = BertModel(bert_config)
        self.projection = CaptionProjection(bert_config.hidden_size, projection_dim)
        self.config = bert_config
        self.config.projection_dim = projection_dim

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # as FrozenCLAPEmbedder.encode: input_ids only, so padding tokens are attended
        return self.projection(self.base(input_ids=input_ids).last_hidden_state)


def build_caption_encoder(spec: dict[str, Any]) -> CaptionEncoder:
    from transformers import BertConfig

    kwargs = {k: v for k, v in spec.items() if k not in ("type", "projection_dim")}
    return CaptionEncoder(BertConfig(**kwargs), int(spec["projection_dim"]))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # diffusers' converters warn that `image_size` is deprecated; quadit passes it so that no model type is
    # guessed from the keys (`set_image_size` would otherwise infer a Stable Diffusion type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def unet_config_from_ldm(ldm_config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config of an LDM yaml (diffusers' own function)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    with _quiet():
        return create_unet_diffusers_config_from_ldm(ldm_config, {}, image_size=image_size)


def vae_config_from_ldm(ldm_config: dict[str, Any], image_size: int) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    with _quiet():
        return create_vae_diffusers_config_from_ldm(ldm_config, {}, image_size=image_size)


def convert_unet(state: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` -> diffusers UNet keys (diffusers' `convert_ldm_unet_checkpoint`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(state, unet_config)


def convert_vae(state: dict[str, torch.Tensor], vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`first_stage_model.*` -> diffusers AutoencoderKL keys (diffusers' `convert_ldm_vae_checkpoint`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, vae_config)


def _ldm_prefixes(config: Any) -> dict[str, str]:
    """diffusers module path -> openaimodel module path, for a UNet2DConditionModel config: input_blocks.0 is
    conv_in; then per down level `layers_per_block` (ResNet, transformer) pairs and a down-sampler but the last;
    middle_block is ResNet, transformer, ResNet; output_blocks mirror the down path with one more layer per level,
    the up-sampler in the level's last output block."""
    levels, per = len(config["block_out_channels"]), int(config["layers_per_block"])
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    i = 1
    for b in range(levels):
        for j in range(per):
            out[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b != levels - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    for b in range(levels):
        attn = "CrossAttn" in config["up_block_types"][b]
        for j in range(per + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == per and b != levels - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attn else 1}.conv"
            i += 1
    return out


def ldm_unet_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under openaimodel's keys with the `model.diffusion_model.` prefix (what a
    latent-diffusion checkpoint holds); `convert_unet` maps them back exactly."""
    prefixes = sorted(_ldm_prefixes(unet.config).items(), key=lambda kv: -len(kv[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        for src, dst in prefixes:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                if ".resnets." in src or src.startswith("mid_block.resnets"):
                    head, _, tail = rest.partition(".")
                    rest = f"{_RESNET_NAMES.get(head, head)}.{tail}"
                out[LDM_UNET_PREFIX + f"{dst}.{rest}"] = value.clone()
                break
        else:
            raise ValueError(f"no openaimodel key for the diffusers UNet key {key}")
    return out


def ldm_vae_state_dict(vae: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under the LDM autoencoder's keys with the `first_stage_model.` prefix
    (`ldm/modules/diffusionmodules/model.py`: `down.{i}.block.{j}`, `up.{n-1-i}` for diffusers' up block i,
    `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convolutions); `convert_vae` maps them back."""
    import re

    levels = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    rules = [
        (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"{m[1]}.down.{m[2]}.block.{m[3]}."),
        (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"{m[1]}.down.{m[2]}.downsample.conv."),
        (r"^(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"{m[1]}.up.{levels - 1 - int(m[2])}.block.{m[3]}."),
        (r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"{m[1]}.up.{levels - 1 - int(m[2])}.upsample.conv."),
        (r"^(\w+)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{attn[m[2]]}."),
        (r"^(\w+)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new and new.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the LDM attention's q/k/v/proj_out are 1x1 convolutions
        out[LDM_VAE_PREFIX + new] = value.clone()
    return out
