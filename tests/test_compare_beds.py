"""The method comparison's plumbing: the second test bed, the one-line grid rows, the three-metric accuracy row
(decoded-audio SNR through the export's VAE decoder), and the table of several beds."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
from conftest import ROOT, one_line_error, run_script


def test_sao_tiny_is_a_second_sao_family_bed_of_another_size():
    from exporter.errors import InputError
    from exporter.models import ModelSpec, load_model
    from exporter.models.layers import quantizable_linears
    from exporter.models.presets import preset_config

    dit = preset_config("sao-tiny")["model"]["diffusion"]["config"]
    assert (dit["embed_dim"], dit["depth"], dit["num_heads"], dit["cond_token_dim"]) == (384, 4, 6, 192)
    loaded = load_model(ModelSpec(model="sao-tiny", synthetic_weights=True, seed=1))
    assert loaded.identity["weights"] == "synthetic:1" and len(quantizable_linears(loaded.dit)) == 28
    with pytest.raises(InputError, match="sao-tiny has no published weights"):
        load_model(ModelSpec(model="sao-tiny"))


def test_grid_rows_are_valid_recipes_named_from_their_fields():
    from engines.evaluation.compare_methods import GRIDS, candidate_name, ort_peers, q
    from exporter.passes.recipe import Recipe

    for rows in GRIDS.values():
        names = [candidate_name(fields) for fields in rows]
        assert len(set(names)) == len(names)
        for fields in rows:
            Recipe(**fields)
    assert candidate_name(q("w8a8", "timestep-smoothquant", bucket_policy="per-bucket-scale", lowrank=32)) == \
        "w8a8 timestep-smoothquant static per-bucket-scale rank 32"  # the names of earlier --cache files
    assert candidate_name(q("w4a16", "smoothquant", block_size=64)) == "w4a16 smoothquant static shared block_size=64"
    peers = ort_peers()
    assert {p.calibrate_method for p in peers if p.mode == "static"} == {"MinMax", "Percentile", "Entropy"}
    assert {p.mode for p in peers} == {"static", "dynamic", "nbits"}


def _row(name: str, step: float, latent: float, audio: float, fused: dict | None = None) -> dict:
    row = {"name": name, "mean_step_sqnr_db": step, "min_step_sqnr_db": step - 1, "mean_cosine": 0.99,
           "final_latent_snr_db": latent, "audio_snr_db": audio, "arithmetic": "exact Q/DQ",
           "buckets": [{"bucket": 0, "sqnr_db": step}]}
    if fused:
        row["fused"] = fused
    return row


def test_combine_writes_one_table_of_both_beds(tmp_path):
    for bed, seed, shift in (("sao-mini", 0, 0.0), ("sao-tiny", 1, 1.0)):
        d = tmp_path / bed
        d.mkdir()
        rows = [_row("w8a8 timestep-smoothquant static per-bucket-scale", 21.0 + shift, 18.0 + shift, 25.0,
                     {"mean_step_sqnr_db": 18.5, "final_latent_snr_db": None, "audio_snr_db": None}),
                _row("ModelOpt w8a8 INT8_SMOOTHQUANT_CFG", 19.0, 20.0 + shift, 26.0)]
        if bed == "sao-mini":
            rows.append(_row("ORT quantize_dynamic", -1.0, -1.5, 9.0))
        context = {"model": {"model": bed, "weights": f"synthetic:{seed}"}, "rows": rows,
                   "settings": {"prompts": 4, "steps": 20, "seconds": 3.0}}
        (d / "comparison.json").write_text(json.dumps(context))
    proc = run_script("compare_methods.py", "--combine", str(tmp_path / "sao-mini"), str(tmp_path / "sao-tiny"),
                      "--out", str(tmp_path / "all"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "all" / "comparison.md").read_text()
    assert ("| w8a8 timestep-smoothquant static per-bucket-scale | exact Q/DQ | 21.00 | 18.00 | 25.00 | 18.50 / - / - "
            "| 22.00 | 19.00 | 25.00 | 18.50 / - / - |") in md
    assert "| ORT quantize_dynamic | exact Q/DQ | -1.00 | -1.50 | 9.00 | - | - | - | - | - |" in md
    data = json.loads((tmp_path / "all" / "comparison.json").read_text())
    assert list(data["beds"]) == ["sao-mini (synthetic:0)", "sao-tiny (synthetic:1)"]
    assert (tmp_path / "all" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # bad input: one line, exit 2, nothing written
    proc = run_script("compare_methods.py", "--combine", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad"))
    assert "nowhere/comparison.json not found" in one_line_error(proc) and not (tmp_path / "bad").exists()
    proc = run_script("compare_methods.py", "--calibration", str(tmp_path), "--grid", "bogus", "--out", str(tmp_path / "bad"))
    assert "unknown --grid 'bogus'" in one_line_error(proc) and not (tmp_path / "bad").exists()


def test_compare_all_needs_an_output_directory():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "compare_all.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage: scripts/compare_all.sh OUT")


class _Noisy:
    """A DiT session whose output carries white noise at a set SNR relative to the reference output."""

    def __init__(self, session, snr_db: float) -> None:
        self.session, self.scale, self.rng = session, 10 ** (-snr_db / 20), np.random.default_rng(0)

    def run(self, outputs, feeds):
        v = self.session.run(outputs, feeds)[0]
        noise = self.rng.standard_normal(v.shape).astype(np.float32)
        return [v + noise * self.scale * np.sqrt((v ** 2).mean() / (noise ** 2).mean())]


def test_rows_report_step_latent_and_decoded_audio_snr(mini_export):
    from engines.evaluation.accuracy import AccuracySettings, capture, decode_audio, evaluate, markdown
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline

    out, manifest = mini_export
    pipeline = Pipeline(OrtBackend(out, manifest), manifest)
    reference = pipeline.backend.sessions["dit"]
    settings = AccuracySettings(prompts=1, steps=4, seconds=1.0)
    (traj,) = capture(pipeline, reference, ["A cello playing a slow scale"], settings)
    # the recorded reference outputs are the session's own; the audio is the export's VAE decoder's, trimmed
    assert len(traj.outputs) == len(traj.feeds) == 4
    assert np.array_equal(traj.outputs[2], reference.run(["v"], traj.feeds[2])[0])
    assert traj.audio.shape == (1, 2, 44100)
    assert np.array_equal(traj.audio, decode_audio(pipeline, traj.latents, settings))
    same = evaluate("fp32", reference, reference, [traj], [1e9, 0.0], pipeline, settings)
    assert same["mean_step_sqnr_db"] == same["final_latent_snr_db"] == same["audio_snr_db"] == math.inf
    noisy = evaluate("noisy", _Noisy(reference, 20.0), reference, [traj], [1e9, 0.0], pipeline, settings)
    assert noisy["mean_step_sqnr_db"] == pytest.approx(20.0, abs=0.2)
    assert math.isfinite(noisy["final_latent_snr_db"]) and math.isfinite(noisy["audio_snr_db"])
    table = markdown([noisy])
    assert "| decoded-audio SNR dB |" in table and f"| {noisy['audio_snr_db']:.2f} |" in table
    assert "fused ORT kernel" not in table
