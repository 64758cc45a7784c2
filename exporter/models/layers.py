"""Which Linears of a DiffusionTransformer a quantization recipe may touch.

Default exclusions follow seed 000 and TensorRT practice: the timestep, condition and global-embedding
MLPs, `project_in`/`project_out` and the pre/post 1x1 convolutions stay in float, because they are
small, feed every token, and carry the timestep signal whose error compounds over the sampler steps.
"""
from __future__ import annotations

from torch import nn

EXCLUDED_PREFIXES = ("to_timestep_embed", "to_cond_embed", "to_global_embed", "to_prepend_embed",
                     "transformer.project_in", "transformer.project_out", "preprocess_conv", "postprocess_conv")


def quantizable_linears(dit: nn.Module) -> dict[str, nn.Linear]:
    """Linears inside the transformer blocks, in module (= ONNX graph) order, named relative to `dit`."""
    return {name: m for name, m in dit.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer.layers.")
            and not name.startswith(EXCLUDED_PREFIXES)}


def transformer_blocks(dit: nn.Module) -> dict[str, nn.Module]:
    return {f"transformer.layers.{i}": block for i, block in enumerate(dit.transformer.layers)}
