"""UNet latent-diffusion audio models (seed 002's systems): presets as diffusers / transformers configs.

Each preset is data for the real classes (diffusers' `UNet2DConditionModel`, `AutoencoderKL` and schedulers,
transformers' `ClapTextModelWithProjection`, `T5EncoderModel` and `SpeechT5HifiGan`); nothing re-implements a
model. Two families share the UNet, VAE and vocoder and differ in how the text enters:

- `audioldm` (diffusers' `AudioLDMPipeline`): the CLAP text embedding, L2-normalised, enters as the UNet's
  class embedding (`class_embed_type="simple_projection"`, concatenated with the time embedding); no
  cross-attention context. CFG's unconditioned input is the embedding of the empty prompt.
- `tango` (declare-lab's TANGO): FLAN-T5 hidden states enter by cross-attention with their padding mask.
- `make-an-audio` (Text-to-Audio/Make-An-Audio, a CompVis latent-diffusion model): MS-CLAP's caption encoder
  (BERT + projection, per token, no padding mask) enters by cross-attention. Its preset is the LDM yaml
  (`ldm`, as `configs/text_to_audio/txt2audio_args.yaml` lays it out, at a small size); the diffusers UNet and
  VAE configs are derived from it by diffusers' own converters (`exporter.models.unet_ldm`).

The `-mini` presets are the same classes at a size that runs on 2 CPU cores in minutes; they have no
published weights (`--synthetic-weights`). Their sizes keep the real models' structure: a 4x VAE over a 64-bin
16 kHz mel spectrogram (hop 160, so 100 frames per second) and a vocoder that upsamples x160.
"""
from __future__ import annotations

import copy
from typing import Any

from exporter.errors import InputError

FAMILIES = ("audioldm", "tango", "make-an-audio")
SAMPLE_RATE = 16000

_VAE_MINI = {"in_channels": 1, "out_channels": 1, "latent_channels": 8, "block_out_channels": [32, 64, 64],
             "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
             "layers_per_block": 1, "norm_num_groups": 16, "scaling_factor": 0.9227914}
_VOCODER_MINI = {"model_in_dim": 64, "sampling_rate": SAMPLE_RATE, "upsample_initial_channel": 64,
                 "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [10, 8, 4, 4, 4],
                 "resblock_kernel_sizes": [3, 7], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
                 "normalize_before": True}
_UNET_MINI = {"sample_size": 128, "in_channels": 8, "out_channels": 8, "block_out_channels": [64, 128, 128],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
              "norm_num_groups": 16}
# AudioLDM's and TANGO's scheduler: DDIM over the scaled-linear betas of latent diffusion (AudioLDM: epsilon
# prediction; TANGO samples Stable Diffusion 2.1's v-prediction schedule)
_DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
         "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
         "prediction_type": "epsilon"}

AUDIOLDM_MINI: dict[str, Any] = {
    "family": "audioldm",
    "unet": {**_UNET_MINI, "cross_attention_dim": [64, 128, 128], "class_embed_type": "simple_projection",
             "projection_class_embeddings_input_dim": 64, "class_embeddings_concat": True},
    "vae": _VAE_MINI,
    "vocoder": _VOCODER_MINI,
    "text_encoder": {"type": "clap", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
                     "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0, "bos_token_id": 0,
                     "eos_token_id": 1, "projection_dim": 64, "max_position_embeddings": 80},
    "tokenizer": {"type": "byt5", "model_max_length": 64},
    "scheduler": _DDIM,
    # AudioLDMPipeline's own defaults: 10 steps, guidance 2.5, unet.sample_size * 4 * 0.01 s of audio
    "defaults": {"steps": 10, "cfg_scale": 2.5},
}

TANGO_MINI: dict[str, Any] = {
    "family": "tango",
    "unet": {**_UNET_MINI, "cross_attention_dim": 64},
    "vae": _VAE_MINI,
    "vocoder": _VOCODER_MINI,
    "text_encoder": {"type": "t5", "vocab_size": 384, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                     "d_kv": 16},
    "tokenizer": {"type": "byt5", "model_max_length": 64},
    "scheduler": {**_DDIM, "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"},
    # TANGO's inference defaults: 100 steps, guidance 3 (the mini keeps the guidance, with 10 steps)
    "defaults": {"steps": 10, "cfg_scale": 3.0},
}

# Make-An-Audio's txt2audio_args.yaml at a small size: openaimodel UNet with spatial transformers at both levels
# (its attention_resolutions [1, 2], channel_mult [1, 2], num_heads 8, context_dim 1024, model_channels 320, 2 res
# blocks: here 4 heads, context 64, 64 channels, 1 res block), the KL autoencoder over one-channel mel (its ch 128,
# ch_mult [1, 2, 2, 4], attention at resolutions 78 and 156, which diffusers' AutoencoderKL does not have: here
# ch 32, ch_mult [1, 2, 2], none), 4 latent channels, its scaled-linear betas 0.00085..0.012 over 1000 steps
_MAA_LDM = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "channels": 4, "conditioning_key": "crossattn",
    "scale_factor": 1.0,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 4, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 64, "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 1, "out_ch": 1, "ch": 32,
        "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLAPEmbedder"}}}}

MAKE_AN_AUDIO_MINI: dict[str, Any] = {
    "family": "make-an-audio",
    "ldm": _MAA_LDM,
    "image_size": 256,  # mel frames of the default length: the UNet's sample_size is image_size / the VAE's 4
    # Make-An-Audio: 80 mel bins at 16 kHz, hop 256 (624 frames for 10 s); a SpeechT5HifiGan stand-in for BigVGAN
    "vocoder": {**_VOCODER_MINI, "model_in_dim": 80, "upsample_rates": [4, 4, 4, 4], "upsample_kernel_sizes": [8, 8, 8, 8]},
    # MS-CLAP's caption encoder (BERT-base + a 768 -> 1024 projection) at a small size
    "text_encoder": {"type": "clap-caption", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
                     "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 80,
                     "pad_token_id": 0, "projection_dim": 64},
    "tokenizer": {"type": "byt5", "model_max_length": 77},  # FrozenCLAPEmbedder pads to 77 tokens
    "scheduler": {**_DDIM, "beta_start": 0.00085, "beta_end": 0.012},
    # Make-An-Audio's README samples with --ddim_steps 100 --scale 3; the mini keeps the guidance, with 10 steps
    "defaults": {"steps": 10, "cfg_scale": 3.0},
}

PRESETS: dict[str, dict[str, Any]] = {"audioldm-mini": AUDIOLDM_MINI, "tango-mini": TANGO_MINI,
                                      "make-an-audio-mini": MAKE_AN_AUDIO_MINI}
# diffusers pipelines and the family each is read as (model_index.json `_class_name`)
PIPELINE_CLASSES = {"AudioLDMPipeline": "audioldm", "TangoPipeline": "tango"}
# published repositories searched offline in the Hugging Face cache for a preset name
HUB_REPOS = {"audioldm": "cvssp/audioldm-s-full-v2"}
# per family, the defaults of the published pipeline (read when a directory's own config carries none)
FAMILY_DEFAULTS = {"audioldm": {"steps": 10, "cfg_scale": 2.5}, "tango": {"steps": 100, "cfg_scale": 3.0},
                   "make-an-audio": {"steps": 100, "cfg_scale": 3.0}}


def is_unet_preset(name: str | None) -> bool:
    return name in PRESETS or name in HUB_REPOS


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise InputError(f"unknown UNet preset '{name}' (choose from: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
