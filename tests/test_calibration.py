"""Calibration: buckets, streaming statistics, the artifact and its model check, selection, resume, torchrun."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from calibration import artifact
from calibration.collector import ActivationCollector, BucketSpec, ObserverSettings

TS = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


def test_buckets_by_step_split_steps_evenly_and_map_t_back():
    spec = BucketSpec.by_step(TS, 4)
    assert spec.count == 4
    buckets = [spec.bucket_of(t) for t in TS]
    assert buckets == sorted(buckets) and buckets[0] == 0 and buckets[-1] == 3
    assert [buckets.count(k) for k in range(4)] in ([2, 3, 2, 3], [3, 2, 3, 2], [2, 3, 3, 2], [3, 2, 2, 3])
    by_t = BucketSpec.by_t(TS, 2)
    assert [by_t.bucket_of(t) for t in (0.99, 0.6, 0.59, 0.2)] == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        BucketSpec((0.1, 0.5))


def test_collector_statistics_are_exact_and_streaming():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 8)
    spec = BucketSpec.by_step(TS, 2)
    collector = ActivationCollector({"fc": layer}, spec, num_steps=len(TS), settings=ObserverSettings())
    inputs = []
    with collector:
        for step, t in enumerate(TS):
            x = torch.randn(3, 17, 64) * (1 + step)
            x[..., 5] *= 40  # an outlier channel
            collector.begin_step(step, t)
            layer(x)
            inputs.append((spec.bucket_of(t), x))
            if step == 0:
                sizes = {k: v.numel() for k, v in collector.state.items()}
    assert {k: v.numel() for k, v in collector.state.items()} == sizes  # memory does not grow with steps
    out = collector.tensors(["fc"])
    for k in range(2):
        xs = torch.cat([x.reshape(-1, 64) for b, x in inputs if b == k])
        assert torch.equal(out["fc.ch_absmax"][k], xs.abs().amax(0))
        assert out["fc.hist"][k].sum() == xs.numel()
        ordered = xs.abs().flatten().sort().values
        exact = ordered[math.ceil(0.999 * ordered.numel()) - 1].item()  # the 99.9th percentile sample
        got = out["fc.pctl"][k, 1].item()
        assert exact <= got <= exact * 2 ** (1 / 16) * 1.0001  # the upper edge of its histogram bin
    assert out["fc.absmax"].shape == (2,) and out["fc.pctl"].shape == (2, 3)
    assert out["fc.step_absmax"][-1] > 5 * out["fc.step_absmax"][0]


def _mini_calibration(mini, tmp_path, **kw):
    from engines.calibrate.driver import CalibrationSettings, calibrate

    settings = CalibrationSettings(steps=8, buckets=2, seconds=2.0, **kw)
    prompts = ["rain on a tin roof", "a jazz trio playing softly", "a dog barking far away"]
    meta = calibrate(mini, prompts, settings, tmp_path / "cal", prompt_source="test")
    return meta, *artifact.read(tmp_path / "cal")


def test_artifact_holds_every_quantizable_linear_and_the_summary_shows_the_model(mini, tmp_path):
    from exporter.models.layers import quantizable_linears

    meta, on_disk, tensors = _mini_calibration(mini, tmp_path)
    layers = quantizable_linears(mini.dit)
    assert [layer["name"] for layer in on_disk["layers"]] == list(layers)
    for name, linear in layers.items():
        assert tensors[f"{name}.ch_absmax"].shape == (2, linear.in_features)
        assert tensors[f"{name}.absmax"].shape == (2,)
        assert tensors[f"{name}.pctl"].shape == (2, 3)
        assert torch.all(tensors[f"{name}.pctl"][:, -1] <= tensors[f"{name}.absmax"])
    assert on_disk["buckets"]["edges"][0] > 1.0 > on_disk["buckets"]["edges"][-2] > on_disk["buckets"]["edges"][-1]
    assert on_disk["prompts"]["sha256"] == artifact.prompts_hash(on_disk["prompts"]["list"])
    summary = json.loads((tmp_path / "cal" / "summary.json").read_text())
    assert summary["min_outlier_channels"] >= 1
    assert summary["min_block_input_range_growth"] >= 3.0
    for png in ("activation_map.png", "activation_range.png"):
        assert (tmp_path / "cal" / png).stat().st_size > 10_000
    artifact.check_matches(on_disk, mini.identity, {n: m.in_features for n, m in layers.items()})


def test_artifact_of_another_model_is_refused_with_what_differs(mini, tmp_path):
    _, on_disk, _ = _mini_calibration(mini, tmp_path)
    other = {**mini.identity, "weights": "synthetic:9"}
    with pytest.raises(artifact.ArtifactError, match="weights: artifact 'synthetic:0' != model 'synthetic:9'"):
        artifact.check_matches(on_disk, other, {})
    with pytest.raises(artifact.ArtifactError, match="other input widths"):
        artifact.check_matches(on_disk, mini.identity, {on_disk["layers"][0]["name"]: 7})
    (tmp_path / "cal" / "calibration.safetensors").write_bytes(b"corrupt")
    with pytest.raises(artifact.ArtifactError, match="sha256"):
        artifact.read(tmp_path / "cal")


@pytest.mark.slow
def test_activation_aware_selection_covers_more_than_uniform_and_random(mini, tmp_path):
    meta, on_disk, tensors = _mini_calibration(mini, tmp_path, selection="activation-aware", budget=4)
    coverage = on_disk["selection"]["coverage"]
    assert set(coverage) == {"uniform", "random", "activation-aware"}
    assert coverage["activation-aware"] >= coverage["uniform"] and coverage["activation-aware"] >= coverage["random"]
    assert 0 < coverage["uniform"] < 1
    assert len(on_disk["selection"]["samples"]) == 4


def _cli(out: Path, prompts: Path, *extra: str, torchrun: int = 0) -> list[str]:
    args = [str(ROOT / "scripts" / "calibrate.py"), "--synthetic-weights", "--prompts", str(prompts),
            "--num-prompts", "4", "--steps", "6", "--buckets", "2", "--seconds", "1", "--out", str(out), *extra]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    return [sys.executable, *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("calref")
    prompts = work / "prompts.txt"
    prompts.write_text("rain on a tin roof\na dog barking\nslow piano chords\nwind through pine trees\n")
    proc = subprocess.run(_cli(work / "single", prompts), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, prompts, load_file(str(work / "single" / "calibration.safetensors"))


@pytest.mark.slow
def test_torchrun_gloo_two_processes_give_bit_identical_statistics(reference_run):
    work, prompts, single = reference_run
    proc = subprocess.run(_cli(work / "ddp", prompts, torchrun=2), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(str(work / "ddp" / "calibration.safetensors"))
    assert json.loads((work / "ddp" / "calibration.json").read_text())["world_size"] == 2
    keys = [k for k in single if k.endswith((".ch_absmax", ".absmax", ".hist", ".step_absmax", ".pctl"))]
    assert keys and all(torch.equal(single[k], ddp[k]) for k in keys)


def test_interrupted_run_resumes_from_last_completed_prompt(reference_run):
    work, prompts, single = reference_run
    out = work / "resumed"
    progress = work / ".resumed.partial" / "stats.rank0.json"
    proc = subprocess.Popen(_cli(out, prompts), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or '{"done": []}')["done"]) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "an interrupted run must not leave an artifact"
    done_before = len(json.loads(progress.read_text())["done"])
    assert 1 <= done_before < 4
    rerun = subprocess.run(_cli(out, prompts), capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming stats: {done_before} of 4 prompts already done" in rerun.stderr
    resumed = load_file(str(out / "calibration.safetensors"))
    keys = [k for k in single if k.endswith((".ch_absmax", ".hist", ".step_absmax"))]
    assert all(torch.equal(single[k], resumed[k]) for k in keys)
    assert not (work / ".resumed.partial").exists()
