"""Shared fixtures: the sao-mini model with synthetic weights and its FP32 export, built once per run.

Markers: `gpu` (needs CUDA), `trt` (needs TensorRT) and `slow` (needs --run-slow) skip themselves
where their requirement is absent.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from exporter.passes.recipe import ROUND_TO_NEAREST

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skips = {
        "slow": (not config.getoption("--run-slow"), "needs --run-slow"),
        "gpu": (not has_gpu, "needs a CUDA GPU"),
        "trt": (not has_trt, "needs TensorRT"),
    }
    for item in items:
        for marker, (skip, why) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session", autouse=True)
def isolated_hf_home(tmp_path_factory):
    """No test sees the developer's real Hugging Face cache (a cached SAO checkpoint would turn "no
    weights" cases into real exports); a test that needs a cache builds one under $HF_HOME."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        yield home


# Tests of a graph's structure (types, fusions, checkers, what a profile sees) round weights to nearest:
# GPTQ and the loss-driven smoothing search take about a minute per sao-mini graph on CI's 2 cores and do
# not change the graph's structure. tests/test_gptq.py tests the passes; test_quantize's default-recipe
# cases and the export tests run them end to end.
RTN = ROUND_TO_NEAREST


@pytest.fixture(scope="session")
def mini():
    from exporter.models import ModelSpec, load_model

    return load_model(ModelSpec(model="sao-mini", synthetic_weights=True, seed=0))


@pytest.fixture(scope="session")
def mini_export(mini, tmp_path_factory):
    from exporter.stages.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("export") / "sao-mini-fp32"
    manifest = export_model(mini, out, ExportOptions(scheme="fp32"))
    return out, manifest


@pytest.fixture(scope="session")
def mini_run(mini_export):
    """`mini_run(prompt, steps, seconds)`: one real sampler run of the FP32 sao-mini export (CFG batch of 2),
    as engines.evaluation.accuracy.capture records it (its DiT feeds and the graph's outputs on them)."""
    from engines.evaluation.accuracy import AccuracySettings, capture
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline

    out, manifest = mini_export
    pipeline = Pipeline(OrtBackend(out, manifest), manifest)

    def run(prompt: str, steps: int, seconds: float):
        settings = AccuracySettings(prompts=1, steps=steps, seconds=seconds)
        return capture(pipeline, pipeline.backend.sessions["dit"], [prompt], settings)[0]
    return run


def run_script(name: str, *args: str, cwd: Path | None = None, timeout: int = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of scripts/*.py in a subprocess with this interpreter (`env` adds variables)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env)


@pytest.fixture(scope="session")
def mini_calibration(mini, tmp_path_factory):
    """A small calibration artifact of sao-mini (4 seed prompts x 8 steps, 3 buckets)."""
    from calibration.prompts import select_prompts
    from engines.calibrate.driver import CalibrationSettings, calibrate
    from exporter.stages.quantized import read_calibration

    out = tmp_path_factory.mktemp("calibration") / "sao-mini"
    calibrate(mini, select_prompts("seed", 4), CalibrationSettings(steps=8, buckets=3, seconds=2.0), out,
              prompt_source="seed")
    return read_calibration(out, mini)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI contract for bad input: exit code 2 and exactly one `error:` line on stderr (returned)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


class Server:
    """scripts/serve.py on free loopback ports, in a process group of its own (so that a test can signal
    the whole group); `args` are its scheduling options."""

    def __init__(self, export_dir: Path, log_path: Path,
                 args: tuple[str, ...] = ("--max-batch", "4", "--max-queue-delay-ms", "1000")) -> None:
        from engines.serving.server import free_ports

        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = log_path
        self.log = open(log_path, "w")
        # its own process group, so that the SIGTERM test can signal the whole group (see that test)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), "--export", str(export_dir),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as r:
                return r.status
        except Exception:  # noqa: BLE001 - not up yet
            return 0

    def wait_ready(self, timeout: float = 240) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            if self.status("/v2/models/quadit_generate/ready") == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# A machine TensorRT engines are checked against in the build tests (no TensorRT here)
FAKE_MACHINE = ("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


class FakeBuilder:
    """Stands in for Polygraphy's EngineBytesFromNetwork: records what it was given, returns plan bytes
    (`fail_on`: a graph file name whose build raises the parser error TensorRT would)."""

    calls: list = []
    fail_on: str | None = None

    def __init__(self, network, config=None, save_timing_cache=None) -> None:
        self.network, self.config, self.save_timing_cache = network, config, save_timing_cache

    def __call__(self) -> bytes:
        from polygraphy.exception import PolygraphyException

        FakeBuilder.calls.append(self)
        if self.fail_on and self.network.path.endswith(self.fail_on):
            raise PolygraphyException("In node 3 (parseGraph): INVALID_NODE: unsupported op\nmore detail")
        return b"plan:" + Path(self.network.path).name.encode()


@pytest.fixture
def fake_trt(monkeypatch):
    """build_engines' own code path with Polygraphy's builder and the machine facts replaced (no TensorRT)."""
    import polygraphy.backend.trt as pg_trt

    import engines.runtime.tensorrt as module

    monkeypatch.setattr(pg_trt, "EngineBytesFromNetwork", FakeBuilder)
    monkeypatch.setattr(module, "tensorrt_unavailable", lambda: None)
    monkeypatch.setattr(module, "current_machine", lambda: module.MachineFacts(*FAKE_MACHINE))
    FakeBuilder.calls, FakeBuilder.fail_on = [], None
    return FakeBuilder



def sqnr_vs_reference(sessions: dict, names, reference: str = "fp16", seed: int = 3) -> dict[str, list[float]]:
    """Per name, the DiT output SQNR (dB) of its session against `reference`'s on sao-mini-shaped random feeds at
    t = 0.9, 0.5, 0.1 (the same draws for every caller with the same seed)."""
    import numpy as np

    from engines.evaluation.accuracy import sqnr_db

    rng = np.random.default_rng(seed)
    snr: dict[str, list[float]] = {name: [] for name in names}
    for t in (0.9, 0.5, 0.1):
        feeds = {"x": rng.standard_normal((2, 64, 24)).astype(np.float32), "t": np.array([t, t], np.float32),
                 "cross_attn_cond": rng.standard_normal((2, 66, 256)).astype(np.float32),
                 "global_embed": rng.standard_normal((2, 512)).astype(np.float32)}
        ref = sessions[reference].run(None, feeds)[0]
        for name in snr:
            snr[name].append(sqnr_db(ref, sessions[name].run(None, feeds)[0]))
    return snr
