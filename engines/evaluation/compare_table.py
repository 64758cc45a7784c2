"""The method comparison's outputs: one bed's chart, and the table of several beds (JSON + Markdown + PNG).

A bed is one `scripts/compare_methods.py` output directory (comparison.json); the combined table puts the
same candidate of every bed side by side on the three figures the issue asks for: mean step SQNR,
final-latent SNR and decoded-audio SNR against FP32.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from exporter.errors import InputError

METRICS = (("mean_step_sqnr_db", "mean step SQNR"), ("final_latent_snr_db", "final-latent SNR"),
           ("audio_snr_db", "decoded-audio SNR"))


def _colour(name: str) -> str:
    if name.startswith("ModelOpt"):
        return "#76b900"
    if name.startswith("ORT"):
        return "#999999"
    if " minmax " in f" {name} ":
        return "#cccccc"
    return "#3b6fb6"


def chart(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """One horizontal bar panel per metric (dB against FP32), one bar per candidate."""
    _chart_beds({title or "": list(rows)}, path)


def _chart_beds(beds: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for rows in beds.values():
        names += [r["name"] for r in rows if r["name"] not in names]
    fig, axes = plt.subplots(len(beds), len(METRICS), squeeze=False, sharey=True,
                             figsize=(15, (0.28 * len(names) + 1.2) * len(beds) + 0.5))
    for b, (bed, rows) in enumerate(beds.items()):
        by_name = {r["name"]: r for r in rows}
        for m, (key, label) in enumerate(METRICS):
            ax = axes[b][m]
            values = [by_name.get(n, {}).get(key) for n in names][::-1]
            ax.barh(names[::-1], [v if v is not None else 0.0 for v in values],
                    color=[_colour(n) for n in names[::-1]])
            for y, v in enumerate(values):
                if v is not None:
                    ax.text(max(v, 0.0) + 0.3, y, f"{v:.1f}", va="center", fontsize=6)
            ax.set_title(f"{bed}: {label}" if bed else label, fontsize=9)
            ax.set_xlabel("dB vs FP32 (held-out prompts)", fontsize=8)
            ax.tick_params(axis="y", labelsize=6)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bed_label(context: dict[str, Any]) -> str:
    model = context["model"]
    return f"{model['model']} ({model['weights']})"


def combined_markdown(beds: dict[str, dict[str, Any]]) -> str:
    """Candidates as rows; for each bed its three figures (and the fused-kernel step SQNR where measured)."""
    names: list[str] = []
    for context in beds.values():
        names += [r["name"] for r in context["rows"] if r["name"] not in names]
    head = ["candidate", "arithmetic"]
    for bed in beds:
        head += [f"{bed}: step SQNR", "latent SNR", "audio SNR", "fused kernel step / latent / audio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in names:
        arithmetic = next((r.get("arithmetic", "") for c in beds.values() for r in c["rows"] if r["name"] == name), "")
        cells = [name, arithmetic]
        for context in beds.values():
            row = next((r for r in context["rows"] if r["name"] == name), None)
            if row is None:
                cells += ["-"] * 4
                continue
            cells += [fmt(row.get(k)) for k, _ in METRICS]
            fused = row.get("fused")
            cells.append(" / ".join(fmt(fused.get(k)) for k, _ in METRICS) if fused else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine(directories: Sequence[Path], out: Path) -> str:
    """Read each bed's comparison.json and write comparison.{json,md,png} of all of them into `out`
    (atomically); returns the Markdown table."""
    from exporter.onnx.artifacts import atomic_dir

    beds: dict[str, dict[str, Any]] = {}
    for directory in directories:
        path = Path(directory) / "comparison.json"
        if not path.is_file():
            raise InputError(f"{path} not found: run scripts/compare_methods.py for that bed first")
        context = json.loads(path.read_text())
        label = bed_label(context)
        if label in beds:
            raise InputError(f"two comparisons of the same bed ({label}): {directory}")
        beds[label] = context
    table = combined_markdown(beds)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "comparison.json").write_text(json.dumps({"beds": beds}, indent=1, default=str) + "\n")
        settings = next(iter(beds.values()))["settings"]
        intro = (f"Held-out prompts ({settings['prompts']} per bed), {settings['steps']} steps, {settings['seconds']} s; "
                 "dB against the FP32 DiT graph (ONNX Runtime). Static Q/DQ graphs are evaluated with exact "
                 "Q/DQ arithmetic (what TensorRT computes); the fused column is ONNX Runtime's own integer kernels.")
        (tmp / "comparison.md").write_text(f"### Method comparison, {len(beds)} test beds\n\n{intro}\n\n{table}")
        _chart_beds({bed: c["rows"] for bed, c in beds.items()}, tmp / "comparison.png")
    return table
