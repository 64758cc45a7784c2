"""The quantization recipe: a versioned, validated, JSON-serialisable description of what to quantize how.

A recipe names a scheme, a method, the smoothing strength, the low-rank rank, the activation mode, how
per-bucket statistics are deployed, the INT4 block size, and ordered layer rules (glob -> skip or
override). Rules are resolved against the model's quantizable layers; a rule that matches no layer is an
error (a typo would otherwise silently quantize what the user meant to keep in float).

What each backend can run (ARCHITECTURE.md section 3) is enforced here, before any work is done:
TensorRT runs INT8 Q/DQ with constant activation scales and INT4 weight-only; it has no dynamic INT8
activation quantization (only FP8/FP4) and no W4A8 outside TensorRT-LLM.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from exporter.errors import InputError

RECIPE_VERSION = 1
SCHEMES = ("w8a8", "w4a16", "w4a8", "fp8", "nvfp4")
# bits of each scheme's weights; fp8 is E4M3 (8 bits, 3 of mantissa) with per-tensor scales, TensorRT only;
# nvfp4 is E2M1 in blocks of 16 with E4M3 block scales (W4A4, Blackwell; exporter/passes/nvfp4.py), TensorRT only
WEIGHT_BITS = {"w8a8": 8, "fp8": 8, "w4a16": 4, "w4a8": 4, "nvfp4": 4}
# schemes whose weights and activations are floats with their own block/tensor scales (no INT4 block size)
FLOAT_SCHEMES = ("fp8", "nvfp4")
METHODS = ("minmax", "smoothquant", "timestep-smoothquant")
ACTIVATIONS = ("static", "dynamic")
# shared: one activation scale over all buckets; per-bucket-scale: one graph, per-bucket activation
# pre-scale gathered by the bucket of t (exact, since the MatMul is linear); per-bucket-graph: one weight
# set (and graph) per bucket, needed when smoothing factors differ per bucket.
BUCKET_POLICIES = ("shared", "per-bucket-scale", "per-bucket-graph")
TARGETS = ("onnxruntime", "tensorrt")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
CLIPS = ("absmax", "mse")
ALPHA_SEARCHES = ("noise", "loss")
# INT8 attention scores (exporter/passes/int8_attention.py), ONNX Runtime target only
ATTENTION_INT8 = ("none", "dynamic-qk")
# FP8 attention cores (exporter/passes/fp8_attention.py): TensorRT target, beside fp8 GEMMs only
ATTENTION_QUANT = ("none", "fp8")
# ONNX Runtime's blocked DequantizeLinear / MatMulNBits take any power of two >= 16
ORT_INT4_BLOCKS = (16, 32, 64, 128, 256, 512, 1024)
# TensorRT's INT4 weight-only GEMM: block sizes 64 and 128 only (ARCHITECTURE.md section 3; NVIDIA's ONNX INT4
# path, modelopt/onnx/quantization/int4.py, defaults to 128 along K). onnx-tensorrt's parser itself only infers
# the block from the scale's shape ("Only a single blocking dimension is allowed", odd last dims refused), so
# the size limit is the kernels', enforced here before any work and by exporter/tensorrt/checker.py.
TRT_INT4_BLOCKS = (64, 128)
OVERRIDABLE = ("scheme", "alpha", "lowrank", "block_size", "activations")
# Accuracy a deployed DiT must keep against FP32 (per-step output SQNR in dB, cosine) on sampler
# trajectories, unless the recipe sets its own: what `scripts/check.py` enforces. Set from the sao-mini
# synthetic model's measured figures with a few dB of margin (docs/figures.md).
DEFAULT_CHECK = {"w8a8": (15.0, 0.98), "w4a16": (6.0, 0.85), "w4a8": (6.0, 0.85), "fp8": (15.0, 0.98),
                 "nvfp4": (12.0, 0.97)}  # nvfp4 + rank 32 measured 17.0-18.8 dB mean, 0.990-0.993 (sao-mini/tiny)

# quadit before issue 14's passes: weights rounded to nearest with abs-max scales, the noise-model smoothing
# search (needs neither second moments nor input rows; the baselines, structure-only graphs, comparisons)
ROUND_TO_NEAREST = {"weight_rounding": "nearest", "weight_clip": "absmax", "alpha_search": "noise"}


@dataclass(frozen=True)
class LayerRule:
    """`pattern` is a glob over layer names (e.g. `transformer.layers.0.*`); `action` is `skip` (keep the
    layer in float) or `override` (apply `overrides` to the recipe's fields for matching layers)."""

    pattern: str
    action: str = "skip"
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ("skip", "override"):
            raise InputError(f"rule {self.pattern!r}: action must be 'skip' or 'override', got {self.action!r}")
        bad = [k for k, _ in self.overrides if k not in OVERRIDABLE]
        if bad:
            raise InputError(f"rule {self.pattern!r}: cannot override {bad} (overridable: {', '.join(OVERRIDABLE)})")
        if self.action == "override" and not self.overrides:
            raise InputError(f"rule {self.pattern!r}: 'override' needs at least one override")


@dataclass(frozen=True)
class Recipe:
    scheme: str = "w8a8"
    method: str = "timestep-smoothquant"
    alpha: float = 0.5
    lowrank: int = 0
    activations: str = "static"
    bucket_policy: str = "per-bucket-scale"
    block_size: int = 128
    rules: tuple[LayerRule, ...] = field(default_factory=tuple)
    # issue 14's passes (exporter/passes/gptq.py, act_scales.py, alpha_search.py): weight rounding nearest|gptq,
    # weight scale clip absmax|mse, static activation clip absmax|mse, smoothing strength search noise|loss.
    # Defaults by measurement on sao-mini (docs/figures.md): GPTQ + MSE clip lift w4a16 from 14.5 to 27.6 dB;
    # the loss search lifts w8a8 static's final latent by 2.9 dB; the activation clip search costs 12 dB
    # (the reservoir misses the rare rows with the largest values, which the model depends on)
    weight_rounding: str = "gptq"
    weight_clip: str = "mse"
    act_clip: str = "absmax"
    alpha_search: str = "loss"
    # issue 10: INT8 Q·Kᵀ at run time; off by default (slower than FP32 attention on AVX2 without VNNI and
    # costs accuracy; docs/figures.md, issue 10 section)
    attention_int8: str = "none"
    # issue 22: Q, K, V and the softmax output in FP8 E4M3 for TensorRT's fused FP8 MHA (`--attention fp8`)
    attention_quant: str = "none"
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    # nvfp4's INT4 fallback (exporter/passes/nvfp4_fallback.py): the layers reading an activation whose NVFP4
    # output SQNR on the calibration rows is below this many dB, and below INT4 weight-only's, are exported
    # as INT4 weight-only (w4a16) instead; 0 turns the rule off
    nvfp4_fallback_db: float = 12.0
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        _check_fields(self.scheme, self.alpha, self.lowrank, self.activations, self.block_size)
        if self.method not in METHODS:
            raise InputError(f"unknown method '{self.method}' (choose from: {', '.join(METHODS)})")
        if self.bucket_policy not in BUCKET_POLICIES:
            raise InputError(f"unknown bucket policy '{self.bucket_policy}' (choose from: {', '.join(BUCKET_POLICIES)})")
        for name, value, allowed in (("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS),
                                     ("weight_clip", self.weight_clip, CLIPS), ("act_clip", self.act_clip, CLIPS),
                                     ("alpha_search", self.alpha_search, ALPHA_SEARCHES),
                                     ("attention_int8", self.attention_int8, ATTENTION_INT8),
                                     ("attention_quant", self.attention_quant, ATTENTION_QUANT)):
            if value not in allowed:
                raise InputError(f"unknown {name} '{value}' (choose from: {', '.join(allowed)})")
        if not float(self.nvfp4_fallback_db) >= 0.0:
            raise InputError(f"nvfp4_fallback_db must be >= 0 (0 turns the INT4 fallback off), got {self.nvfp4_fallback_db}")
        if self.version != RECIPE_VERSION:
            raise InputError(f"recipe version {self.version} is not supported (this quadit writes {RECIPE_VERSION})")
        if self.method == "minmax" and self.bucket_policy == "per-bucket-graph":
            raise InputError("bucket policy 'per-bucket-graph' needs smoothing (per-bucket weight sets); "
                             "minmax has one weight set")

    def check_thresholds(self) -> dict[str, float]:
        """{"min_sqnr_db", "min_cosine"}: the recipe's own, else the scheme's defaults."""
        sqnr, cos = DEFAULT_CHECK[self.scheme]
        return {"min_sqnr_db": sqnr if self.min_sqnr_db is None else float(self.min_sqnr_db),
                "min_cosine": cos if self.min_cosine is None else float(self.min_cosine)}

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.scheme]

    @property
    def quantizes_activations(self) -> bool:
        return self.scheme != "w4a16"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rules"] = [{"pattern": r.pattern, "action": r.action, "overrides": dict(r.overrides)} for r in self.rules]
        if data["attention_quant"] == "none":  # written only when set: older recipes keep their JSON and digest
            del data["attention_quant"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"recipe has unknown fields: {sorted(unknown)}")
        rules = tuple(LayerRule(r["pattern"], r.get("action", "skip"), tuple(sorted(r.get("overrides", {}).items())))
                      for r in data.get("rules", []))
        return cls(**{**data, "rules": rules})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def check_target(self, target: str) -> None:
        """Refuse, with the reason, what the target backend cannot execute."""
        if target not in TARGETS:
            raise InputError(f"unknown target '{target}' (choose from: {', '.join(TARGETS)})")
        schemes = {self.scheme} | {dict(r.overrides)["scheme"] for r in self.rules
                                   if r.action == "override" and "scheme" in dict(r.overrides)}
        if self.attention_quant != "none":
            from exporter.passes.fp8_attention import check_attention_target

            check_attention_target(self, target)
        if target != "tensorrt":
            if "fp8" in schemes:
                raise InputError("fp8 needs --target tensorrt: FP8 GEMMs are TensorRT's (Ada, Hopper, Blackwell); "
                                 "ONNX Runtime's CPU kernels have none (its FP8 Q/DQ would run as float math)")
            if "nvfp4" in schemes:
                raise InputError("nvfp4 needs --target tensorrt: NVFP4 GEMMs are TensorRT's on Blackwell; ONNX Runtime "
                                 "has no FP4 kernels (quadit measures its accuracy through an emulation)")
            return
        if self.attention_int8 != "none":
            raise InputError(f"attention_int8 '{self.attention_int8}' runs as ONNX Runtime's DynamicQuantizeLinear + "
                             "MatMulInteger, which TensorRT cannot build; use --target onnxruntime or "
                             "--attention-int8 none")
        layers = [("recipe", self.scheme, self.activations, self.block_size)] + [
            (r.pattern, dict(r.overrides).get("scheme", self.scheme), dict(r.overrides).get("activations", self.activations),
             dict(r.overrides).get("block_size", self.block_size))
            for r in self.rules if r.action == "override"]
        for where, scheme, activations, block in layers:
            if WEIGHT_BITS[scheme] == 4 and scheme not in FLOAT_SCHEMES and block not in TRT_INT4_BLOCKS:
                raise InputError(f"{where}: TensorRT's INT4 weight-only GEMM takes block sizes "
                                 f"{' or '.join(map(str, TRT_INT4_BLOCKS))}, got {block}; use --block-size 64 or 128")
            if scheme == "w4a8":
                raise InputError(f"{where}: w4a8 is not supported by TensorRT (W4A8 exists only in TensorRT-LLM); "
                                 "use --target onnxruntime or --scheme w4a16/w8a8")
            if activations == "dynamic" and scheme == "fp8":
                raise InputError(f"{where}: fp8 takes static per-tensor activation scales (calibrated per timestep "
                                 "bucket); use --activations static")
            if activations == "dynamic" and scheme == "nvfp4":
                raise InputError(f"{where}: nvfp4 quantizes activations per block of 16 at run time under a calibrated "
                                 "(static) global scale; use --activations static")
            if activations == "dynamic" and scheme != "w4a16":
                raise InputError(f"{where}: dynamic INT8 activation quantization is not supported by TensorRT "
                                 "(its dynamic quantization is FP8/FP4 only); use --activations static or "
                                 "--target onnxruntime")

    def resolve(self, layers: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """Per layer: its effective settings, or None when a rule keeps it in float. Rules apply in order;
        a later matching rule overrides an earlier one. A rule that matches no layer is an error."""
        layers = list(layers)
        out: dict[str, dict[str, Any] | None] = {
            name: {k: getattr(self, k) for k in OVERRIDABLE} for name in layers}
        for rule in self.rules:
            matched = [n for n in layers if fnmatch.fnmatchcase(n, rule.pattern)]
            if not matched:
                raise InputError(f"recipe rule {rule.pattern!r} matches no quantizable layer "
                                 f"(e.g. {layers[0] if layers else 'none'})")
            for name in matched:
                if rule.action == "skip":
                    out[name] = None
                else:
                    settings = dict(out[name] or {k: getattr(self, k) for k in OVERRIDABLE})
                    settings.update(dict(rule.overrides))
                    _check_fields(settings["scheme"], settings["alpha"], settings["lowrank"],
                                  settings["activations"], settings["block_size"], where=f"rule {rule.pattern!r}")
                    out[name] = settings
        return out


def _check_fields(scheme: str, alpha: float, lowrank: int, activations: str, block_size: int,
                  where: str = "recipe") -> None:
    if scheme not in SCHEMES:
        raise InputError(f"{where}: unknown scheme '{scheme}' (choose from: {', '.join(SCHEMES)})")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"{where}: alpha must be in [0, 1], got {alpha}")
    if int(lowrank) != lowrank or lowrank < 0:
        raise InputError(f"{where}: lowrank rank must be a non-negative integer, got {lowrank}")
    if activations not in ACTIVATIONS:
        raise InputError(f"{where}: activations must be one of {', '.join(ACTIVATIONS)}, got '{activations}'")
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"{where}: INT4 block size must be a power of two >= 16, got {block_size}")


def int4_block(k: int, n: int, requested: int, allowed: tuple[int, ...]) -> int | None:
    """The INT4 block for a [K, N] weight: `requested` when it splits K into whole blocks (and N is even, as
    INT4 storage and TensorRT need), else the largest smaller allowed block that does; None when none does
    (the layer then stays in float). A model whose widths the default block does not divide (e.g. 192-wide
    condition tokens with block 128) still quantizes every layer it can."""
    if n % 2:
        return None
    for block in sorted((b for b in allowed if b <= requested), reverse=True):
        if k % block == 0:
            return block
    return None


def read_recipe(path: str | Path) -> "Recipe":
    """The Recipe in a JSON file; an unreadable or malformed file is an InputError (one line, exit 2)."""
    try:
        return Recipe.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"cannot read recipe {path}: {exc}") from None
