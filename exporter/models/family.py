"""The seam between the passes and a model family.

Export, calibration and the runtime never branch on a model's architecture or objective: they ask its
family. A family says whether it handles a stable-audio-tools config, how its conditioning is laid out
(what the runtime feeds the graphs), which sampler it ships with (written to the manifest), which `t`
its DiT receives over a run (calibration buckets), and runs its own sampler from the library that
defines the model (never re-implemented here). Adding a family (a UNet family such as AudioLDM or
TANGO) means one module beside `stable_audio.py` and one line in `_families()`; the graph passes do not
change.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from exporter.errors import InputError


class ModelFamily(Protocol):
    name: str

    def reason_not_handled(self, config: dict[str, Any]) -> str | None:
        """None when this family handles `config`, else a short reason (for the refusal message)."""

    def conditioning_layout(self, config: dict[str, Any]) -> dict[str, Any]:
        """Text conditioner id and length, number conditioners and their ranges, cross-attention and
        global condition ids (the manifest's `conditioning`)."""

    def sampler_defaults(self, config: dict[str, Any]) -> dict[str, Any]:
        """The sampler the model ships with: sampler_type, steps, cfg_scale, sigma_min, sigma_max, rho."""

    def sample(self, model_fn: Callable[..., torch.Tensor], noise: torch.Tensor, sampler: dict[str, Any],
               conditioning_inputs: dict[str, Any], config: dict[str, Any], device: str) -> torch.Tensor:
        """Run the model's own sampler over `model_fn` (a DiTWrapper-compatible callable)."""

    def dit_timesteps(self, config: dict[str, Any], sampler: dict[str, Any]) -> list[float]:
        """The `t` the DiT receives at each model evaluation of one run with `sampler`."""


def _families() -> list[ModelFamily]:
    from exporter.models.stable_audio import StableAudioDiT

    return [StableAudioDiT()]


def family_of(config: dict[str, Any], where: str = "model config") -> ModelFamily:
    """The family that handles `config`; InputError naming why none does."""
    reasons = []
    for family in _families():
        reason = family.reason_not_handled(config)
        if reason is None:
            return family
        reasons.append(reason)
    raise InputError(f"{where} is not a Stable Audio Open-family config: {'; '.join(reasons)}")
