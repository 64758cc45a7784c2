"""The ModelOpt (NVIDIA TensorRT Model Optimizer) PyTorch baseline that quadit's quantizer is compared against.

A comparison is only fair at equal bits on the same layers, so ModelOpt's stock recipe is restricted to the
Linears quadit quantizes (`exporter.models.layers.quantizable_linears`): every other Linear/Conv of the DiT (timestep,
condition and global MLPs, project_in/out, the 1x1 pre/post convs) gets its quantizers disabled *in the config*,
before calibration, so SmoothQuant / AWQ neither smooth nor search those layers and the excluded layers stay
exactly float. Disabling after `mtq.quantize` would be too late: calibration would already have folded
smoothing scales into them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from exporter.errors import InputError

log = logging.getLogger(__name__)

# quadit scheme -> name of the ModelOpt preset in `modelopt.torch.quantization` it is compared against.
MODELOPT_CONFIGS = {"w8a8": "INT8_SMOOTHQUANT_CFG", "w4a16": "INT4_AWQ_CFG", "w4a8": "W4A8_AWQ_BETA_CFG",
                    "fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
# ModelOpt's NVFP4 fake quantization computes block scales with CUDA kernels only ("amax must be a CUDA tensor
# for dynamic block quantization", modelopt 0.47 on a CPU): its peer row needs --device cuda
NEEDS_CUDA = ("nvfp4",)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _glob_escape(name: str) -> str:
    """ModelOpt matches `quantizer_name` with fnmatch; make a module name match only itself."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def build_config(dit: nn.Module, scheme: str, quantizable: Iterable[str]) -> tuple[str, dict[str, Any]]:
    """The named ModelOpt preset (deep-copied, never the shared module-level dict) plus one
    `{"quantizer_name": "<module>.*", "enable": False}` entry per non-quantizable Linear/Conv of `dit`.

    The entries go last, so they win over the preset's `*weight_quantizer` / `*input_quantizer` enables.
    """
    if scheme not in MODELOPT_CONFIGS:
        raise InputError(f"unknown ModelOpt baseline scheme {scheme!r}; choose one of {', '.join(MODELOPT_CONFIGS)}")
    import modelopt.torch.quantization as mtq

    name = MODELOPT_CONFIGS[scheme]
    cfg = copy.deepcopy(getattr(mtq, name))
    keep = set(quantizable)
    # a DiT quantizes Linears; a UNet (issue 21) its Conv2d layers too
    unknown = keep - {n for n, m in dit.named_modules() if isinstance(m, (nn.Linear, *_CONV_TYPES))}
    if unknown:
        raise InputError(f"quantizable names are not Linear/Conv layers of the model: {', '.join(sorted(unknown)[:5])}")
    # every other leaf module is excluded: the Linears/Convs quadit keeps float, and any leaf ModelOpt would
    # otherwise give an input quantizer of its own (nn.LayerNorm in diffusers' transformer blocks)
    excluded = [n for n, m in dit.named_modules()
                if n and n not in keep and (isinstance(m, (nn.Linear, *_CONV_TYPES)) or not any(m.children()))]
    # and every quantizable layer gets the preset's weight and input quantizers back where one of the preset's
    # LLM-oriented name rules disabled them ('*proj_out.*': a diffusers transformer block's output projection)
    presets = {e["quantizer_name"]: e for e in cfg["quant_cfg"] if isinstance(e, dict) and "cfg" in e}
    restored = [{"quantizer_name": f"{_glob_escape(n)}.{kind}", "cfg": copy.deepcopy(presets[f"*{kind}"]["cfg"])}
                for n in sorted(keep) for kind in ("weight_quantizer", "input_quantizer")
                if f"*{kind}" in presets and _disabled_by_preset(cfg["quant_cfg"], f"{n}.{kind}")]
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + restored + [
        {"quantizer_name": f"{_glob_escape(n)}.*", "enable": False} for n in excluded]
    return name, cfg


def _disabled_by_preset(entries: Iterable[Any], quantizer: str) -> bool:
    """Whether the preset's last name rule matching `quantizer` (besides the leading '*' disable) disables it."""
    import fnmatch

    state = None
    for e in entries:
        if isinstance(e, dict) and "parent_class" not in e and e.get("quantizer_name") != "*" and \
                fnmatch.fnmatch(quantizer, e.get("quantizer_name", "")):
            state = e.get("enable", True)
    return state is False


def enabled_quantized_layers(model: nn.Module) -> list[str]:
    """Names of modules that own at least one enabled ModelOpt quantizer (weight, input or output).

    Quantizers themselves are skipped: W4A8's weight quantizer is a SequentialQuantizer (INT4 block, then
    FP8) whose member TensorQuantizers would otherwise count it as a quantized layer of its own.
    """
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    kinds = (TensorQuantizer, SequentialQuantizer)
    found = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, kinds):
            continue
        own = [q for q in mod.children() if isinstance(q, kinds)]
        if any(q.is_enabled for q in own):
            found.append(mod_name)
    return found


def modelopt_quantize(dit: nn.Module, scheme: str, forward_loop: Callable[[nn.Module], None],
                      quantizable: Iterable[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize a deep copy of `dit` with ModelOpt's preset for `scheme`, restricted to `quantizable`.

    `forward_loop(model)` runs calibration data through the copy (the DiT's own call). Runs on whatever
    device `dit` is on (CPU is fine: ModelOpt falls back to its PyTorch fake-quant kernels). Returns the
    quantized copy in eval mode and an info dict: config name, modelopt version, quantized layer names
    and count. The caller's module is never modified.
    """
    quantizable = list(quantizable)
    config_name, cfg = build_config(dit, scheme, quantizable)
    import modelopt
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(dit).eval()
    log.info("ModelOpt %s: quantizing %d Linears with %s (%d exclusion entries)", modelopt.__version__,
             len(quantizable), config_name, len(cfg["quant_cfg"]) - len(getattr(mtq, config_name)["quant_cfg"]))
    printed = io.StringIO()
    # PTQ only: calibration needs activations, never gradients. ModelOpt prints its progress to stdout (where
    # the CLIs write their JSON summary): it goes to the log. Its "<layer> is not calibrated, skip smoothing"
    # warning is expected for exactly the layers excluded above (shown with -v).
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        excluded = sorted(set(n for n, m in dit.named_modules() if isinstance(m, (nn.Linear, *_CONV_TYPES)))
                          - set(quantizable))
        if excluded and not log.isEnabledFor(logging.DEBUG):
            warnings.filterwarnings("ignore", message=f"({'|'.join(map(re.escape, excluded))}) is not calibrated, "
                                                      "skip smoothing$")
        model = mtq.quantize(model, cfg, forward_loop)
    for line in printed.getvalue().splitlines():
        log.info("ModelOpt: %s", line)
    model.eval()

    layers = enabled_quantized_layers(model)
    missing, extra = sorted(set(quantizable) - set(layers)), sorted(set(layers) - set(quantizable))
    if missing or extra:  # the comparison would no longer be at equal bits on the same layers
        log.warning("ModelOpt %s quantized a different layer set: missing %s, extra %s", config_name, missing, extra)
    info = {"scheme": scheme, "config": config_name, "modelopt_version": modelopt.__version__,
            "algorithm": copy.deepcopy(cfg.get("algorithm")), "quantized_layers": len(layers), "layers": layers}
    log.info("ModelOpt %s: %d quantized layers", config_name, len(layers))
    return model, info
