"""Export a UNet audio pipeline (AudioLDM, TANGO): four graphs with parity, tokenizer, scheduler, manifest.

The graphs are those of `exporter.onnx.unet_graphs`; each is compared with the FP32 PyTorch module it came
from (diffusers' and transformers' own forward passes) on inputs of other batch sizes and lengths than the
export example, so a specialised dimension shows up as a parity failure here, not at run time. The
manifest's `family: "unet"` is what the runtime, the checker and the CLI dispatch on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from calibration.artifact import sha256_file
from exporter.errors import InputError
from exporter.models.unet_audio import UNetAudioModel
from exporter.models.unet_sampling import latent_shape
from exporter.models.unet_text import text_outputs
from exporter.onnx import torch_export, unet_graphs
from exporter.onnx.artifacts import atomic_dir, write_manifest
from exporter.passes.recipe import TARGETS

log = logging.getLogger(__name__)

FAMILY = "unet"
# torch.export specialises a dimension seen as 1 in the example, so the examples use batch 2; the UNet's
# latent frames must divide by its down-sampling factor (2 per down block but the last), and its batch stays
# under 64 (diffusers' nearest upsampling takes another code path from there)
BATCH_RANGE = (2, 63, 1)
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class UNetExportOptions:
    target: str = "onnxruntime"
    seed: int = 0
    fp32_tolerance: float = FP32_TOLERANCE

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InputError(f"unknown target '{self.target}' (choose from: {', '.join(TARGETS)})")


def down_factor(model: UNetAudioModel) -> int:
    return model.unet_down_factor


def _token_range(model: UNetAudioModel) -> tuple[int, int]:
    """Ids within both the tokenizer and the encoder's embedding rows (see stages.export.token_id_range)."""
    rows = int(model.text_encoder.get_input_embeddings().num_embeddings)
    high = min(len(model.tokenizer), rows)
    if high < 4:
        raise InputError(f"the text encoder embeds {high} token id(s); it cannot encode a prompt")
    return 3, high


def _cond_example(model: UNetAudioModel, batch: int, g: torch.Generator, pad_from: int | None = None
                  ) -> tuple[torch.Tensor, ...]:
    dims = model.dims()
    if model.family == "audioldm":
        return (torch.nn.functional.normalize(torch.randn(batch, dims["text_embed_dim"], generator=g), dim=-1),)
    mask = torch.ones(batch, dims["text_length"])
    if pad_from is not None:
        mask[-1, pad_from:] = 0.0
    return torch.randn(batch, dims["text_length"], dims["text_hidden_dim"], generator=g), mask


def unet_spec(model: UNetAudioModel, module: torch.nn.Module | None = None) -> torch_export.GraphSpec:
    """The UNet graph (FP32, or `module`: the FP16 base of the TensorRT target)."""
    g = torch.Generator().manual_seed(1234)
    c, frames, width = latent_shape(model.dims(), 0.64)
    example = (torch.randn(2, c, frames, width, generator=g), torch.rand(2, generator=g) * 900,
               *_cond_example(model, 2, g))
    names = unet_graphs.unet_inputs(model.family)
    dynamic = {"sample": {0: "batch", 2: "frames"}, **{n: {0: "batch"} for n in names[1:]}}
    factor = down_factor(model)
    return torch_export.GraphSpec("unet", module or unet_graphs.UNetGraph(model.family, model.unet).eval(), example,
                                  names, unet_graphs.UNET_OUTPUTS, dynamic,
                                  {"batch": BATCH_RANGE, "frames": (factor, 4096, factor)})


def graph_specs(model: UNetAudioModel) -> list[torch_export.GraphSpec]:
    """The four FP32 graphs of `model` with their export examples (see `exporter.onnx.unet_graphs`)."""
    g = torch.Generator().manual_seed(1234)
    modules = unet_graphs.graph_modules(model)
    dims = model.dims()
    s = dims["text_length"]
    ids = torch.randint(*_token_range(model), (2, s), generator=g)
    c, frames, width = latent_shape(dims, 0.64)
    mel_frames = 24
    return [
        torch_export.GraphSpec("text_encoder", modules["text_encoder"], (ids, torch.ones(2, s, dtype=torch.int64)),
                               unet_graphs.TEXT_INPUTS, text_outputs(model.family),
                               {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}, {"batch": BATCH_RANGE}),
        unet_spec(model),
        torch_export.GraphSpec("vae_decoder", modules["vae_decoder"],
                               (torch.randn(2, c, frames, width, generator=g),), unet_graphs.VAE_INPUTS,
                               unet_graphs.VAE_OUTPUTS, {"latents": {0: "batch", 2: "frames"}},
                               {"batch": BATCH_RANGE, "frames": (2, 4096, 1)}),
        torch_export.GraphSpec("vocoder", modules["vocoder"], (torch.randn(2, mel_frames, dims["mel_bins"], generator=g),),
                               unet_graphs.VOCODER_INPUTS, unet_graphs.VOCODER_OUTPUTS,
                               {"mel": {0: "batch", 1: "frames"}}, {"batch": BATCH_RANGE, "frames": (2, 65536, 1)}),
    ]


def parity_cases(model: UNetAudioModel, spec: torch_export.GraphSpec, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Inputs unlike the export example: batch 1 and 3, other lengths, a padded TANGO mask."""
    g = torch.Generator().manual_seed(seed)
    dims = model.dims()
    if spec.name == "text_encoder":
        s = dims["text_length"]
        mask = torch.ones(3, s, dtype=torch.int64)
        mask[1, s // 2:] = 0
        return [(torch.randint(*_token_range(model), (3, s), generator=g) * mask, mask)]
    c, _, width = latent_shape(dims, 0.64)
    factor = down_factor(model)
    if spec.name == "unet":
        return [(torch.randn(b, c, n, width, generator=g), torch.rand(b, generator=g) * 999,
                 *_cond_example(model, b, g, pad_from=dims["text_length"] // 3))
                for b, n in ((1, 10 * factor), (3, 3 * factor))]
    if spec.name == "vae_decoder":
        return [(torch.randn(b, c, n, width, generator=g),) for b, n in ((1, 7), (3, 12))]
    return [(torch.randn(b, n, dims["mel_bins"], generator=g),) for b, n in ((1, 37), (3, 16))]


def runtime_spec(model: UNetAudioModel) -> dict[str, Any]:
    """What the runtime needs besides the graphs (a subset of the manifest)."""
    return {"family": FAMILY, "unet_family": model.family, "model": model.identity, "dims": model.dims(),
            "scheduler_config": model.scheduler_config, "sampler_defaults": dict(model.defaults),
            "conditioning": {"inputs": list(text_outputs(model.family))}}


def export_graphs(model: UNetAudioModel, tmp: Path, options: UNetExportOptions) -> dict[str, Any]:
    """Export and parity-check every graph into `tmp`; returns the manifest's `graphs`."""
    entries: dict[str, Any] = {}
    for spec in tqdm(graph_specs(model), desc="export", unit="graph"):
        log.info("exporting %s", spec.name)
        t0 = time.time()
        with unet_graphs.exportable_masks(model.unet):
            entry = torch_export.export_graph(spec, tmp / f"{spec.name}.onnx")
        entry["precision"] = "fp32"
        entry["export_seconds"] = round(time.time() - t0, 1)
        session = torch_export.ort_session(tmp / entry["file"])
        entry["parity"] = torch_export.parity(session, spec.module, parity_cases(model, spec, options.seed),
                                             spec.input_names)
        del session
        if not entry["parity"]["max_rel_error"] <= options.fp32_tolerance:  # also catches NaN
            raise RuntimeError(f"{spec.name} ONNX parity {entry['parity']['max_rel_error']:.2e} exceeds "
                               f"{options.fp32_tolerance:.0e}: the exported graph does not match PyTorch")
        entry["sha256"] = {f: sha256_file(tmp / f) for f in entry["files"]}
        entries[spec.name] = entry
    return entries


def export_unet_model(model: UNetAudioModel, out: Path, options: UNetExportOptions,
                      stages: Sequence[Callable[[Path, dict[str, Any]], None]] = ()) -> dict[str, Any]:
    """Export `model` into `out` atomically; `stages` (quantization) run on the temporary directory after
    the FP32 graphs passed parity and before the manifest is written. Returns the manifest."""
    import json

    from exporter.stages.export import package_versions

    started = time.time()
    with atomic_dir(Path(out)) as tmp:
        entries = export_graphs(model, tmp, options)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
        unet = entries["unet"]["parity"]
        manifest = {
            "kind": "quadit-export", **runtime_spec(model), "scheme": "fp32", "graphs": entries,
            "parity": {"max_rel_error": unet["max_rel_error"], "max_abs_error": unet["max_abs_error"], "graph": "unet",
                       "reference": "PyTorch FP32 (diffusers UNet2DConditionModel.forward)",
                       "tolerance": options.fp32_tolerance,
                       "metric": "max|onnx - torch| / max|torch| over random inputs"},
            "options": asdict(options), "versions": package_versions(),
        }
        for stage in stages:
            stage(tmp, manifest)
        manifest["export_seconds"] = round(time.time() - started, 1)
        write_manifest(tmp, manifest)
    return manifest
