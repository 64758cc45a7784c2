"""Plots and summary written next to a calibration artifact.

- `activation_map.png`: |x| across tokens and input channels of one layer input at mid-trajectory
  (seed 000, Fig. 1): outlier channels show as bright vertical lines.
- `activation_range.png`: min / median / max of a block's input across sampler steps (Fig. 2), with the
  bucket boundaries, so the reader sees the range grow as t -> 0.
- `summary.json` / `summary.md`: per layer, outlier channels (>= 20x the median channel's abs-max) and the
  range growth from the first to the last quarter of the trajectory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from calibration.observers import outlier_channels, range_growth

OUTLIER_RATIO = 20.0


def summarize(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    layers = {}
    for layer in meta["layers"]:
        name = layer["name"]
        ch = tensors[f"{name}.ch_absmax"]
        layers[name] = {"channels": layer["channels"], "outlier_channels": outlier_channels(ch, OUTLIER_RATIO),
                        "range_growth": range_growth(tensors[f"{name}.step_absmax"]),
                        "absmax_per_bucket": [round(float(v), 4) for v in tensors[f"{name}.absmax"]]}
    blocks = {b: range_growth(tensors[f"block.{b}.step_absmax"]) for b in meta.get("blocks", [])}
    out = {
        "layers": layers,
        "min_outlier_channels": min(v["outlier_channels"] for v in layers.values()),
        "layers_with_outliers": sum(v["outlier_channels"] > 0 for v in layers.values()),
        "num_layers": len(layers),
        "block_input_range_growth": blocks,
        "min_block_input_range_growth": min(blocks.values()) if blocks else None,
        "median_layer_range_growth": float(torch.tensor([v["range_growth"] for v in layers.values()]).median()),
        "selection": meta.get("selection", {}),
    }
    if "prompt_coverage" in meta:
        out["prompt_coverage"] = meta["prompt_coverage"]
    return out


def _markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    growth = summary["min_block_input_range_growth"]
    lines = [
        "# Calibration summary", "",
        f"- model: `{meta['model']['model']}` weights `{meta['model']['weights'][:23]}`",
        f"- prompts: {meta['prompts']['count']} ({meta['prompts']['source']}), steps {meta['sampler']['steps']}, "
        f"buckets {meta['buckets']['count']} by {meta['buckets']['by']}, CFG {meta['sampler']['cfg_scale']}",
        f"- layers with >= 1 outlier channel (>= {OUTLIER_RATIO:.0f}x median): "
        f"{summary['layers_with_outliers']} / {summary['num_layers']}",
        f"- transformer-block input range growth, first -> last quarter of steps (smallest over blocks): "
        f"{growth:.2f}x; per block: "
        + ", ".join(f"{b.rsplit('.', 1)[-1]}: {g:.1f}x" for b, g in summary["block_input_range_growth"].items()),
        f"- median range growth of the quantizable Linear inputs: {summary['median_layer_range_growth']:.2f}x", "",
    ]
    sel = summary.get("selection", {})
    if sel.get("coverage"):
        lines += ["## Calibration-set selection", "",
                  f"Budget {sel['budget']} (prompt, step) samples; fraction of the full run's per-bucket, "
                  "per-channel maxima reached:", "", "| method | coverage |", "|---|---|"]
        lines += [f"| {m} | {v:.4f} |" for m, v in sel["coverage"].items()] + [""]
    if "prompt_coverage" in summary:
        cov = summary["prompt_coverage"]
        lines += ["## Prompt coverage of the taxonomy (PTQ4ADM augmentation)", "",
                  f"Before: {cov.get('before_source', 'seed prompts')}; after: the augmented calibration set.", "",
                  cov["table"], ""]
    lines += ["## Per layer", "", "| layer | C_in | outlier channels | range growth | abs-max per bucket |",
              "|---|---|---|---|---|"]
    for name, row in summary["layers"].items():
        lines.append(f"| `{name}` | {row['channels']} | {row['outlier_channels']} | {row['range_growth']:.2f}x | "
                     f"{', '.join(f'{v:.3g}' for v in row['absmax_per_bucket'])} |")
    return "\n".join(lines) + "\n"


def plot(directory: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "probe.map.snapshot" in tensors:
        snap = tensors["probe.map.snapshot"].numpy()
        fig, ax = plt.subplots(figsize=(9, 4.5))
        image = ax.imshow(snap, aspect="auto", cmap="magma", interpolation="nearest")
        step = meta["sampler"]["steps"] // 2
        ax.set_title(f"|x| into {meta['probes']['map']} at step {step}/{meta['sampler']['steps']} "
                     f"(t = {meta['buckets']['step_t'][step]:.3f})", fontsize=9)
        ax.set_xlabel("input channel")
        ax.set_ylabel("token (0 = prepended global token)")
        fig.colorbar(image, ax=ax, label="|activation|")
        fig.tight_layout()
        fig.savefig(directory / "activation_map.png", dpi=110)
        plt.close(fig)
        written.append("activation_map.png")
    lo, hi, med = (tensors[f"probe.range.{k}"].numpy() for k in ("min", "max", "median"))
    steps = range(len(lo))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.fill_between(steps, lo, hi, alpha=0.3, label="min .. max")
    ax.plot(steps, med, color="black", lw=1.5, label="median")
    bucket_of = meta["buckets"]["step_bucket"]
    for s in range(1, len(bucket_of)):
        if bucket_of[s] != bucket_of[s - 1]:
            ax.axvline(s - 0.5, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("sampler step (t from ~1 to ~0.19)")
    ax.set_ylabel("activation")
    ax.set_title(f"input range of {meta['probes']['range']} across denoising steps (dashed: buckets)", fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(directory / "activation_range.png", dpi=110)
    plt.close(fig)
    written.append("activation_range.png")
    return written


def write_report(directory: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    directory = Path(directory)
    summary = summarize(meta, tensors)
    summary["plots"] = plot(directory, meta, tensors)
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (directory / "summary.md").write_text(_markdown(meta, summary))
    return summary
