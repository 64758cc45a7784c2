"""Write a diffusers StableAudioPipeline directory with random weights, built from diffusers' own classes at
Stable Audio Open 1.0's published sizes (as its diffusers conversion script configures them): a stand-in for
the diffusers layout a user's cache holds, to try `scripts/export.py --checkpoint DIR` at full size without
the gated weights. The T5 is T5-base-shaped with ByT5's byte vocabulary and tokenizer (no vocabulary file
exists offline). The weights are random: the manifest of an export from it records their sha256, nothing
claims they are trained."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("diffusers_standin")


def execute(args: argparse.Namespace) -> int:
    """`quadit diffusers-standin` after argument parsing (the parser: `engines.cli.diffusers_standin`)."""

    import torch
    from diffusers import AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from exporter.errors import InputError

    out = Path(args.out)
    if out.exists():
        raise InputError(f"--out {out} exists")
    torch.manual_seed(args.seed)
    # SAO 1.0: embed 1536 = 24 heads x 64, 24 layers, 12 KV heads over the 768-wide T5 tokens, global 1536
    transformer = StableAudioDiTModel(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
                                      num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
                                      cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
                                      cross_attention_input_dim=768)
    vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
                             channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
                             audio_channels=2, sampling_rate=44100)
    projection = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512)
    text = T5EncoderModel(T5Config(vocab_size=384, d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64,
                                   is_encoder_decoder=False, use_cache=False))
    scheduler = CosineDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, solver_order=2,
                                                  prediction_type="v_prediction", sigma_data=1.0,
                                                  sigma_schedule="exponential")
    pipe = StableAudioPipeline(vae=vae, text_encoder=text, projection_model=projection,
                               tokenizer=ByT5Tokenizer(model_max_length=128), transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(str(out))
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.iterdir() if p.is_dir()}
    log.info("wrote %s: %s", out, ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(sizes.items())))
    print(json.dumps({"out": str(out.resolve()), "bytes": sizes}))
    return 0
