"""Check a UNet-family export (AudioLDM, TANGO): each FP32 graph against the PyTorch module it was exported from.

`scripts/check.py` runs this on an export whose manifest says `family: "unet"`. The PyTorch model is rebuilt
from the manifest's identity (`exporter.models.unet_audio.reload_from_identity`: refused where its configs or
weights differ from the exported ones), and every graph runs in ONNX Runtime beside its module on inputs the
export's parity check did not see:

- `sampler`: the real inputs of a short FP32 run of the pipeline's scheduler (CFG as a batch of 2) on seed
  prompts: their tokens and the empty prompt's (text encoder), the UNet inputs of every step, the final latents
  (VAE decoder) and the mel spectrogram they decode to (vocoder);
- `random`: the export's parity cases (batch 1 and 3, other lengths, a padded TANGO mask) drawn with another seed.

A graph passes when max|onnx - torch| / max|torch| over all its inputs is within the export's FP32 tolerance
(the manifest's `parity.tolerance`); the lowest SQNR and cosine are reported beside it. A quantized graph (the
UNet of a w8a8 export) passes when its mean SQNR and cosine against the FP32 module reach the scheme's
thresholds (`exporter.passes.recipe.DEFAULT_CHECK`, the DiT check's), on the same inputs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.evaluation.accuracy import cosine, heldout_prompts, sqnr_db
from engines.evaluation.check import REPORT, json_safe
from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_file, read_manifest

log = logging.getLogger(__name__)

SCHEMA = 1
REFERENCE = "torch-fp32"


@dataclass(frozen=True)
class UNetCheckSettings:
    version: int = 1
    prompts: int = 2
    steps: int = 4
    seconds: float = 1.0  # not a multiple of the UNet's latent frames: the runtime's rounding is checked too
    seed: int = 0
    heldout_seed: int = 1234

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.steps < 1:
            raise ValueError("prompts and steps must be >= 1")


@torch.no_grad()
def sampler_cases(model: Any, modules: dict[str, torch.nn.Module], cfg_scale: float, settings: UNetCheckSettings
                  ) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Per graph, the inputs it gets in FP32 sampler runs of `settings.prompts` seed prompts (module docstring)."""
    from exporter.models.unet_sampling import sample_latents, tokenize, torch_conditioning

    prompts = heldout_prompts([], settings.prompts, settings.heldout_seed)
    cases: dict[str, list[tuple[torch.Tensor, ...]]] = {  # one prompt at a time, as the runtime encodes them
        "text_encoder": [tokenize(model.tokenizer, [p], model.text_length) for p in [*prompts, ""]], "unet": []}

    def record(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        case = (x, t, *cond.values())
        cases["unet"].append(case)
        return modules["unet"](*case)

    uncond = torch_conditioning(model, [""]) if cfg_scale > 1.0 else None
    latents = [sample_latents(model.dims(), model.scheduler_config, record, torch_conditioning(model, [p]), uncond,
                              settings.steps, cfg_scale, settings.seconds, settings.seed + i) for i, p in enumerate(prompts)]
    cases["vae_decoder"] = [(x,) for x in latents]
    cases["vocoder"] = [(modules["vae_decoder"](x).squeeze(1),) for x in latents]
    return cases


def _worst(errors: list[dict[str, float]]) -> dict[str, float]:
    return {"max_rel_error": max(e["max_rel_error"] for e in errors), "max_abs_error": max(e["max_abs_error"] for e in errors),
            "sqnr_db": min(e["sqnr_db"] for e in errors), "cosine": min(e["cosine"] for e in errors)}


@torch.no_grad()
def compare_graph(session: Any, module: torch.nn.Module, input_names: list[str],
                  cases: list[tuple[str, tuple[torch.Tensor, ...]]], tolerance: float,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """ONNX Runtime against the PyTorch module on every (source, inputs) case. An FP32 graph: the worst relative
    error decides. A quantized one (`thresholds`): the mean SQNR and cosine over the cases, as the DiT's check
    (the scheme's `Recipe.check_thresholds()`), and no NaN."""
    from exporter.onnx.torch_export import relative_error

    rows = []
    for source, case in cases:
        ref = module(*case)
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, {n: c.numpy() for n, c in zip(input_names, case)})
        errors = []
        for out, r in zip(outs, refs):
            r = r.float().numpy()
            rel, abs_err = relative_error(out, r)
            errors.append({"max_rel_error": rel, "max_abs_error": abs_err, "sqnr_db": sqnr_db(r, out),
                           "cosine": cosine(r, out)})
        rows.append({"source": source, "shape": list(case[0].shape), **_worst(errors)})
    worst = _worst(rows)
    if thresholds is not None:
        mean_sqnr = float(np.mean([r["sqnr_db"] for r in rows]))
        mean_cos = float(np.mean([r["cosine"] for r in rows]))
        passed = bool(mean_sqnr >= thresholds["min_sqnr_db"] and mean_cos >= thresholds["min_cosine"])  # NaN fails
        return {"inputs": len(rows), **worst, "mean_sqnr_db": mean_sqnr, "mean_cosine": mean_cos, **thresholds,
                "status": "passed" if passed else "failed",
                "failures": [] if passed else [f"mean SQNR {mean_sqnr:.2f} dB (min {thresholds['min_sqnr_db']}), "
                                               f"cosine {mean_cos:.5f} (min {thresholds['min_cosine']})"],
                "cases": rows}
    passed = bool(worst["max_rel_error"] <= tolerance)  # False on NaN
    return {"inputs": len(rows), **worst, "tolerance": tolerance, "status": "passed" if passed else "failed",
            "failures": [] if passed else [f"max relative error {worst['max_rel_error']:.2e} exceeds {tolerance:.0e}"],
            "cases": rows}


def run_unet_checks(export_dir: Path, device: str = "cpu", settings: UNetCheckSettings = UNetCheckSettings()
                    ) -> dict[str, Any]:
    """Compare every FP32 graph of a UNet export (ONNX Runtime on `device`) with its PyTorch module on the
    inputs of the module docstring; writes and returns `check_report.json`."""
    from engines.runtime.backends import session_providers
    from engines.runtime.providers import providers_for, session
    from exporter.models.unet_audio import reload_from_identity
    from exporter.models.unet_sampling import check_seconds
    from exporter.stages.unet_export import graph_specs, parity_cases

    providers_for(device)  # a device this onnxruntime cannot run on is refused before any work
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(f"--export {export_dir} is not a directory")
    manifest = read_manifest(export_dir)
    if manifest.get("family") != "unet":
        raise InputError(f"{export_dir} is not a UNet-family export")
    check_seconds(manifest["dims"], settings.seconds)
    tolerance = float(manifest["parity"]["tolerance"])
    model = reload_from_identity(manifest)
    specs = graph_specs(model)
    modules = {spec.name: spec.module for spec in specs}
    cfg_scale = float(manifest["sampler_defaults"]["cfg_scale"])
    log.info("running the FP32 model on %d seed prompt(s) x %d steps for the sampler inputs", settings.prompts,
             settings.steps)
    sampled = sampler_cases(model, modules, cfg_scale, settings)
    random_seed = int(manifest.get("options", {}).get("seed", 0)) + 1  # the export's parity used its own seed
    comparisons = []
    for spec in specs:
        entry = manifest["graphs"].get(spec.name)
        base = {"graph": spec.name, "backend": "onnxruntime", "reference": REFERENCE}
        if entry is None:
            raise InputError(f"{export_dir}: the manifest lists no {spec.name} graph")
        precision = entry.get("precision", "fp32")
        thresholds = None
        if precision != "fp32":
            from exporter.passes.recipe import DEFAULT_CHECK

            sqnr, cos = DEFAULT_CHECK[precision]
            thresholds = {"min_sqnr_db": sqnr, "min_cosine": cos}
        sess = session(export_dir / entry["file"], entry.get("ort_session_config"), device)
        cases = [("sampler", c) for c in sampled[spec.name]] + \
                [("random", c) for c in parity_cases(model, spec, random_seed)]
        log.info("comparing %s on %d input(s)", spec.name, len(cases))
        comparisons.append({**base, "candidate": f"{precision}-onnxrt", "device": device,
                            "providers": session_providers(sess),
                            **compare_graph(sess, modules[spec.name], list(spec.input_names), cases, tolerance,
                                            thresholds)})
    report = json_safe({
        "schema_version": SCHEMA, "kind": "quadit-check", "family": "unet", "export": str(export_dir.resolve()),
        "scheme": manifest.get("scheme", "fp32"), "model": manifest["model"], "tolerance": tolerance,
        "rule": "FP32 graphs: max|onnx - torch| / max|torch| over every input <= the export's FP32 tolerance; "
                "quantized graphs: mean SQNR and cosine against the FP32 module >= the scheme's thresholds",
        "reference": {"runner": REFERENCE, "source": "the PyTorch modules rebuilt from the manifest's identity"},
        "settings": {**asdict(settings), "cfg_scale": cfg_scale, "random_seed": random_seed},
        "comparisons": comparisons, "passed": all(c["status"] != "failed" for c in comparisons)})
    with atomic_file(export_dir / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report
