"""Export a loaded model to an export directory: graphs, tokenizer, parity figures, manifest."""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from calibration.artifact import sha256_file
from exporter.errors import InputError
from exporter.models import LoadedModel
from exporter.onnx import graphs, torch_export
from exporter.onnx.artifacts import atomic_dir, write_manifest
from exporter.passes.recipe import TARGETS

log = logging.getLogger(__name__)

SCHEMES = ("fp32", "fp16")
# An FP16 text encoder or VAE graph must stay this close to FP32 (max-relative, see torch_export.relative_error):
# a looser match means an overflow or a lost-digits island the precision module does not cover.
FP16_AUX_TOLERANCE = 2e-2
# Model-card sampler defaults of Stable Audio Open 1.0 (kept for importers); each export's manifest carries
# its own model's defaults (`LoadedModel.family.sampler_defaults`), which the runtime reads.
SAMPLER_DEFAULTS = {"sampler_type": "dpmpp-3m-sde", "steps": 100, "cfg_scale": 7.0, "sigma_min": 0.3,
                    "sigma_max": 500.0, "rho": 1.0}


@dataclass(frozen=True)
class ExportOptions:
    scheme: str = "fp32"
    parity_lengths: tuple[int, int] = (32, 77)
    parity_batch: int = 2
    fp32_tolerance: float = 1e-4
    seed: int = 0
    # tensorrt: the text encoder and VAE decoder graphs are FP16 (precision.fp16_t5/fp16_vae), because a
    # strongly typed engine runs in the graph's own types; onnxruntime keeps them FP32 (ORT's CPU FP16
    # kernels are slower than its FP32 ones)
    target: str = "onnxruntime"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown scheme '{self.scheme}' for this export (choose from: {', '.join(SCHEMES)})")
        if self.target not in TARGETS:
            raise InputError(f"unknown target '{self.target}' (choose from: {', '.join(TARGETS)})")
        if len(self.parity_lengths) != 2 or min(self.parity_lengths) < 1:
            raise InputError("parity_lengths must be two positive latent lengths")


def _conditioning_layout(loaded: LoadedModel) -> dict[str, Any]:
    return loaded.family.conditioning_layout(loaded.config)


def _dims(loaded: LoadedModel, layout: dict[str, Any]) -> dict[str, int]:
    dit = loaded.dit
    cond_dim = int(loaded.config["model"]["conditioning"]["cond_dim"])
    tokens = layout["text_max_length"] + sum(1 for i in layout["cross_attention_cond_ids"] if i != layout["text_id"])
    return {"io_channels": int(loaded.config["model"]["io_channels"]), "cond_dim": cond_dim, "cond_tokens": tokens,
            "global_dim": cond_dim * len(layout["global_cond_ids"]), "embed_dim": int(dit.transformer.dim),
            "depth": len(dit.transformer.layers), "sample_rate": loaded.sample_rate,
            "downsampling_ratio": int(loaded.wrapper.pretransform.downsampling_ratio),
            "audio_channels": int(loaded.config.get("audio_channels", 2))}


def aux_precision(options: ExportOptions) -> str:
    """Precision of the text encoder and VAE decoder graphs of an export with these options."""
    return "fp16" if options.target == "tensorrt" else "fp32"


DIT_DYNAMIC = {"x": {0: "batch", 2: "length"}, "t": {0: "batch"}, "cross_attn_cond": {0: "batch"},
               "global_embed": {0: "batch"}}


def dit_spec(loaded: LoadedModel, dims: dict[str, int], fp16: bool) -> torch_export.GraphSpec:
    """The DiT graph to export: FP32, or FP16 with the FP32 islands of exporter/onnx/fp16.py."""
    from exporter.onnx.fp16 import fp16_dit

    g = torch.Generator().manual_seed(1234)
    b, length = 2, 16
    dit = graphs.DiTGraph(fp16_dit(loaded.dit) if fp16 else loaded.dit).eval()
    example = (torch.randn(b, dims["io_channels"], length, generator=g), torch.rand(b, generator=g),
               torch.randn(b, dims["cond_tokens"], dims["cond_dim"], generator=g),
               torch.randn(b, dims["global_dim"], generator=g))
    return torch_export.GraphSpec("dit", dit, example, graphs.DIT_INPUTS, graphs.DIT_OUTPUTS, DIT_DYNAMIC)


def _specs(loaded: LoadedModel, options: ExportOptions, dims: dict[str, int], layout: dict[str, Any]
           ) -> tuple[list[torch_export.GraphSpec], dict[str, torch.nn.Module]]:
    """The graphs to export and, per graph, the FP32 module its parity is measured against."""
    from exporter.onnx.fp16 import fp16_t5, fp16_vae

    half_aux = aux_precision(options) == "fp16"
    dit = dit_spec(loaded, dims, options.scheme == "fp16")
    dit_ref = dit.module if options.scheme != "fp16" else graphs.DiTGraph(loaded.dit).eval()
    g = torch.Generator().manual_seed(1234)
    b = 2
    text_ref = graphs.TextEncoderGraph(loaded.t5_conditioner).eval()
    text = graphs.TextEncoderGraph(loaded.t5_conditioner, fp16_t5(loaded.t5_conditioner.model)).eval() \
        if half_aux else text_ref
    seq = layout["text_max_length"]
    low, high = token_id_range(loaded.t5_conditioner)
    text_example = (torch.randint(low, high, (b, seq), generator=g), torch.ones(b, seq, dtype=torch.int64))
    numbers = graphs.NumberConditionersGraph(
        {i: loaded.wrapper.conditioner.conditioners[i] for i in layout["number_ids"]}).eval()
    vae_ref = graphs.VAEDecoderGraph(loaded.wrapper.pretransform).eval()
    vae = graphs.VAEDecoderGraph(fp16_vae(loaded.wrapper.pretransform, loaded.config["model"]["pretransform"],
                                          loaded.sample_rate)).eval() if half_aux else vae_ref
    specs = [
        dit,
        torch_export.GraphSpec("text_encoder", text, text_example, graphs.TEXT_INPUTS, graphs.TEXT_OUTPUTS,
                              {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}),
        torch_export.GraphSpec("conditioners", numbers, tuple(torch.rand(b) * 30 for _ in layout["number_ids"]),
                              tuple(layout["number_ids"]), tuple(f"{i}_embed" for i in layout["number_ids"]),
                              {i: {0: "batch"} for i in layout["number_ids"]}),
        torch_export.GraphSpec("vae_decoder", vae, (torch.randn(1, dims["io_channels"], 4, generator=g),),
                              graphs.VAE_INPUTS, graphs.VAE_OUTPUTS, {"latents": {0: "batch", 2: "length"}}),
    ]
    return specs, {"dit": dit_ref, "text_encoder": text_ref, "conditioners": numbers, "vae_decoder": vae_ref}


# token ids of the text encoder's example and parity inputs: above T5's specials (pad 0, eos 1, unk 2), below
# 300 so that every encoder draws the same ids, and always below the vocabulary the encoder can embed
TOKEN_IDS = (3, 300)


def token_id_range(t5_conditioner: Any) -> tuple[int, int]:
    """[low, high) of the ids to draw: within both the tokenizer's ids and the encoder's embedding rows.

    Why both: a saved encoder may embed fewer ids than its tokenizer knows (or the reverse), and an id at
    or past the embedding's rows is an IndexError in PyTorch and garbage in ONNX Runtime's Gather."""
    sizes = [len(t5_conditioner.tokenizer)] if getattr(t5_conditioner, "tokenizer", None) is not None else []
    embed = getattr(t5_conditioner.model, "get_input_embeddings", lambda: None)()
    if embed is not None:
        sizes.append(int(embed.num_embeddings))
    vocab = min(sizes) if sizes else TOKEN_IDS[1]
    if vocab < 2:
        raise InputError(f"the text encoder embeds {vocab} token id(s); it cannot encode a prompt")
    high = min(TOKEN_IDS[1], vocab)
    return min(TOKEN_IDS[0], high - 1), high


def _parity_cases(spec: torch_export.GraphSpec, lengths: tuple[int, int], batch: int, seed: int,
                  token_ids: tuple[int, int] = TOKEN_IDS) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    if spec.name == "dit":
        _, c, _ = spec.example[0].shape
        s, d = spec.example[2].shape[1:]
        return [(torch.randn(batch, c, n, generator=g), torch.rand(batch, generator=g),
                 torch.randn(batch, s, d, generator=g), torch.randn(batch, spec.example[3].shape[1], generator=g))
                for n in lengths]
    if spec.name == "vae_decoder":
        c = spec.example[0].shape[1]
        return [(torch.randn(1, c, n, generator=g),) for n in (2, 5)]
    if spec.name == "text_encoder":
        ids, mask = spec.example
        mask = mask.clone()
        mask[1, ids.shape[1] // 2:] = 0
        return [(torch.randint(*token_ids, ids.shape, generator=g) * mask, mask)]
    return [tuple(torch.rand(batch, generator=g) * 600 - 50 for _ in spec.example)]


def runtime_spec(loaded: LoadedModel) -> dict[str, Any]:
    """What the runtime needs to step the sampler for this model (a subset of the export manifest)."""
    layout = _conditioning_layout(loaded)
    return {"model": loaded.identity, "model_config": loaded.config, "dims": _dims(loaded, layout),
            "conditioning": layout, "sampler_defaults": loaded.family.sampler_defaults(loaded.config)}


def export_model(loaded: LoadedModel, out: Path, options: ExportOptions,
                 stages: Sequence[Callable[[Path, dict[str, Any]], None]] = ()) -> dict[str, Any]:
    """Export every graph of `loaded` into `out` (atomically) and return the manifest.

    `stages` run in order inside the temporary directory after the FP32/FP16 graphs passed parity and
    before the manifest is written (quantization, the accuracy report); each may change files and the
    manifest. Any failure leaves no export behind."""
    runtime = runtime_spec(loaded)
    layout, dims = runtime["conditioning"], runtime["dims"]
    started = time.time()
    with atomic_dir(Path(out)) as tmp:
        specs, references = _specs(loaded, options, dims, layout)
        entries: dict[str, Any] = {}
        for spec in tqdm(specs, desc="export", unit="graph"):
            log.info("exporting %s", spec.name)
            t0 = time.time()
            entry = torch_export.export_graph(spec, tmp / f"{spec.name}.onnx")
            entry["precision"] = {"dit": options.scheme, "conditioners": "fp32"}.get(spec.name, aux_precision(options))
            entry["export_seconds"] = round(time.time() - t0, 1)
            session = torch_export.ort_session(tmp / entry["file"])
            cases = _parity_cases(spec, options.parity_lengths, options.parity_batch, options.seed,
                                  token_id_range(loaded.t5_conditioner))
            entry["parity"] = torch_export.parity(session, spec.module, cases, spec.input_names,
                                                 reference=references[spec.name])
            del session
            if entry["precision"] == "fp16" and spec.name != "dit" and not (
                    entry["parity"]["max_rel_error"] <= FP16_AUX_TOLERANCE):  # also catches NaN from overflow
                raise RuntimeError(f"FP16 {spec.name} graph parity {entry['parity']['max_rel_error']:.2e} exceeds "
                                   f"{FP16_AUX_TOLERANCE:.0e} against FP32 PyTorch")
            entry["sha256"] = {f: sha256_file(tmp / f) for f in entry["files"]}
            entries[spec.name] = entry
        dit_parity = entries["dit"]["parity"]
        tolerance = options.fp32_tolerance if options.scheme == "fp32" else None
        if tolerance is not None and dit_parity["max_rel_error"] > tolerance:
            raise RuntimeError(f"DiT ONNX parity {dit_parity['max_rel_error']:.2e} exceeds {tolerance:.0e}: "
                               "the exported graph does not match PyTorch")
        loaded.t5_conditioner.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        manifest = {
            "kind": "quadit-export",
            "model": loaded.identity,
            "model_config": loaded.config,
            "scheme": options.scheme,
            "dims": dims,
            "conditioning": layout,
            "sampler_defaults": runtime["sampler_defaults"],
            "graphs": entries,
            "parity": {"max_rel_error": dit_parity["max_rel_error"], "max_abs_error": dit_parity["max_abs_error"],
                       "graph": "dit", "latent_lengths": list(options.parity_lengths),
                       "reference": "PyTorch FP32", "tolerance": tolerance,
                       "metric": "max|onnx - torch| / max|torch| over random inputs"},
            "options": asdict(options),
            "versions": package_versions(),
        }
        for stage in stages:
            stage(tmp, manifest)
        manifest["export_seconds"] = round(time.time() - started, 1)
        write_manifest(tmp, manifest)
    return manifest


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("quadit", "torch", "onnx", "onnxruntime", "stable-audio-tools", "k-diffusion", "transformers", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out
