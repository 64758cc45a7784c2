"""The Stable Audio Open family: stable-audio-tools' conditioned DiT (`model_type` diffusion_cond, `dit`),
T5 + number conditioners, an Oobleck VAE. SAO 1.0 (v objective, k-diffusion's dpmpp-3m-sde) and SAO
Small (`rf_denoiser`: rectified flow distilled for stable-audio-tools' pingpong sampler) differ only in
the objective, which picks the sampler, its defaults and the `t` the DiT sees; everything is called
from stable-audio-tools itself.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from exporter.errors import InputError

# objective -> the sampler the published model ships with (SAO 1.0's model card; SAO Small's card:
# 8 steps of pingpong, CFG 1). sigma_min and rho are unused by rectified-flow sampling.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "v": {"sampler_type": "dpmpp-3m-sde", "steps": 100, "cfg_scale": 7.0, "sigma_min": 0.3, "sigma_max": 500.0,
          "rho": 1.0},
    "rf_denoiser": {"sampler_type": "pingpong", "steps": 8, "cfg_scale": 1.0, "sigma_min": 0.0, "sigma_max": 1.0,
                    "rho": 1.0},
}


def objective_of(config: dict[str, Any]) -> str:
    return config["model"]["diffusion"].get("diffusion_objective", "v")


class StableAudioDiT:
    """The family object (see exporter.models.family.ModelFamily)."""

    name = "stable-audio-dit"

    def reason_not_handled(self, config: dict[str, Any]) -> str | None:
        return _problem(config)

    def conditioning_layout(self, config: dict[str, Any]) -> dict[str, Any]:
        model_cfg = config["model"]
        conds = model_cfg["conditioning"]["configs"]
        diffusion = model_cfg["diffusion"]
        numbers = {c["id"]: {"min_val": c["config"].get("min_val", 0), "max_val": c["config"].get("max_val", 1)}
                   for c in conds if c["type"] == "number"}
        t5 = [c for c in conds if c["type"] == "t5"][0]
        return {"text_id": t5["id"], "text_max_length": int(t5["config"].get("max_length", 128)),
                "number_ids": list(numbers), "numbers": numbers,
                "cross_attention_cond_ids": diffusion.get("cross_attention_cond_ids", []),
                "global_cond_ids": diffusion.get("global_cond_ids", [])}

    def sampler_defaults(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"objective": objective_of(config), **OBJECTIVES[objective_of(config)]}

    def sample(self, model_fn: Callable[..., torch.Tensor], noise: torch.Tensor, sampler: dict[str, Any],
               conditioning_inputs: dict[str, Any], config: dict[str, Any], device: str) -> torch.Tensor:
        """Exactly the call `generate_diffusion_cond` makes for this objective (same arguments, same
        order of random draws), so a PyTorch run reproduces it bit for bit."""
        from stable_audio_tools.inference.sampling import sample_k, sample_rf

        steps, cfg = int(sampler["steps"]), float(sampler["cfg_scale"])
        if objective_of(config) == "v":
            return sample_k(model_fn, noise, None, steps, sampler_type=sampler["sampler_type"],
                            sigma_min=sampler["sigma_min"], sigma_max=sampler["sigma_max"], rho=sampler["rho"],
                            device=device, **conditioning_inputs, cfg_scale=cfg, batch_cfg=True, rescale_cfg=True)
        return sample_rf(model_fn, noise, init_data=None, steps=steps, sampler_type=sampler["sampler_type"],
                         sigma_max=sampler["sigma_max"], device=device, **conditioning_inputs,
                         dist_shift=_dist_shift(config), cfg_scale=cfg, batch_cfg=True, rescale_cfg=True)

    def dit_timesteps(self, config: dict[str, Any], sampler: dict[str, Any]) -> list[float]:
        """Run the sampler itself over a recording stand-in for the DiT (zeros out, one latent frame)
        and keep the `t` of each call: no schedule formula is restated here."""
        seen: list[float] = []

        def record(x: torch.Tensor, t: torch.Tensor, **_kwargs: Any) -> torch.Tensor:
            seen.append(float(t.reshape(-1)[0]))
            return torch.zeros_like(x)

        import warnings

        channels = int(config["model"].get("io_channels", 64))
        with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde's Brownian tree on one frame
            torch.manual_seed(0)
            self.sample(record, torch.randn(1, channels, 1), {**sampler, "cfg_scale": 1.0}, {}, config, "cpu")
        return seen


def _dist_shift(config: dict[str, Any]):
    options = config["model"]["diffusion"].get("distribution_shift_options")
    if options is None:
        return None
    from stable_audio_tools.inference.sampling import DistributionShift

    return DistributionShift(**options)


def validate_sao_family(config: dict[str, Any], where: str = "model config") -> None:
    """Accept exactly what quadit's exporter and runtime handle: a conditioned DiT (v or rf_denoiser
    objective, prepend global conditioning), T5 and number conditioners, an Oobleck autoencoder."""
    reason = _problem(config)
    if reason is not None:
        raise InputError(f"{where} is not a Stable Audio Open-family config: {reason}")


class _Refused(Exception):
    pass


def _problem(config: dict[str, Any]) -> str | None:
    try:
        _check(config)
    except _Refused as exc:
        return str(exc)
    return None


def _check(config: dict[str, Any]) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise _Refused(what)

    need(isinstance(config, dict), "top level is not an object")
    need(config.get("model_type") == "diffusion_cond", f"model_type is {config.get('model_type')!r}, "
         "expected 'diffusion_cond'")
    model = config.get("model", {})
    diffusion = model.get("diffusion", {})
    need(diffusion.get("type") == "dit", f"diffusion.type is {diffusion.get('type')!r}, expected 'dit'")
    objective = diffusion.get("diffusion_objective", "v")
    need(objective in OBJECTIVES, f"diffusion_objective {objective!r} (supported: {', '.join(OBJECTIVES)})")
    dit = diffusion.get("config", {})
    need(dit.get("global_cond_type", "prepend") == "prepend", "only global_cond_type 'prepend' is supported")
    need(dit.get("patch_size", 1) == 1, "only patch_size 1 is supported")
    pre = model.get("pretransform", {})
    need(pre.get("type") == "autoencoder", "pretransform is not an autoencoder")
    dec = pre.get("config", {}).get("decoder", {})
    need(dec.get("type") == "oobleck", f"decoder type is {dec.get('type')!r}, expected 'oobleck'")
    conds = model.get("conditioning", {}).get("configs", [])
    types = {c.get("id"): c.get("type") for c in conds}
    need(set(types.values()) <= {"t5", "number"}, f"conditioners {sorted(set(types.values()))} (only t5, number)")
    need(list(types.values()).count("t5") == 1, "exactly one t5 conditioner is required")
    need(bool(diffusion.get("cross_attention_cond_ids")), "no cross_attention_cond_ids")
    embed, heads = dit.get("embed_dim", 0), dit.get("num_heads", 0)
    need(heads > 0 and embed % heads == 0, "embed_dim is not a multiple of num_heads")
    head_dim = embed // heads
    cond_dim = dit.get("cond_token_dim", 0) if not dit.get("project_cond_tokens", True) else embed
    need(cond_dim % head_dim == 0 and cond_dim <= embed and (embed // head_dim) % max(cond_dim // head_dim, 1) == 0,
         f"cross-attention width {cond_dim} must be a multiple of the head size {head_dim} dividing embed_dim {embed}")
