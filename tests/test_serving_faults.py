"""The server under the conditions of a deployment (issue 23): readiness that a Kubernetes probe can trust, a
request time limit that counts from arrival under a burst, and a soak with faults (bad requests, clients
that hang up, a SIGTERM in the middle of a batch) in which no request is lost and memory does not grow.

Each runs a real scripts/serve.py (Triton through PyTriton) on free loopback ports."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Server

from engines.runtime.pipeline import GenerateOptions, open_pipeline
from engines.serving.client import infer_inputs
from engines.serving.server import MODEL_NAME

SLOW_STEPS = 40  # about 1-2 s of sampling for 1 s of sao-mini audio on 2 cores
LIMIT_S = 8.0  # above a cold first generation on a loaded 2-core machine (about 4 s), below 4 x a slow one


@pytest.fixture(scope="module")
def limited(mini_export, tmp_path_factory):
    """A server with one generation at a time (max batch 1), an 8 s time limit, and the first answer of a
    request sent the moment /v2/health/ready first said 200 (probed every 10 ms from the process start)."""
    import tritonclient.http as httpclient

    srv = Server(mini_export[0], tmp_path_factory.mktemp("limited") / "serve.log",
                 ("--max-batch", "1", "--max-queue-delay-ms", "0", "--request-timeout-s", str(LIMIT_S)))
    first: dict[str, object] = {}
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240 and srv.proc.poll() is None:
            if srv.status("/v2/health/ready") == 200:
                client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http}", network_timeout=120)
                try:
                    first["audio"] = client.infer(MODEL_NAME, infer_inputs(httpclient, "first", 0.5, 2, 7.0, 1)).as_numpy("audio")
                except Exception as exc:  # noqa: BLE001 - asserted in the test
                    first["error"] = str(exc)
                break
            time.sleep(0.01)
        srv.wait_ready(30)
        yield srv, first
    finally:
        srv.stop()


@pytest.mark.xfail(strict=True, reason="issue 23.1 is open: /v2/health/ready says 200 before quadit_generate is "
                   "loaded (engines/serving/server.py, _start_triton)")
def test_ready_means_the_model_answers(limited):
    """/v2/health/ready is the probe Kubernetes and Triton's clients use: its first 200 must come with the
    model loaded, so the request sent at that moment gets audio, not "unknown model"."""
    srv, first = limited
    assert "error" not in first, first.get("error")
    assert first["audio"].shape == (1, 2, 22050)


def test_time_limit_counts_from_arrival_under_a_burst(limited):
    """More than 2 x max batch requests at once, each needing about 1-2 s alone: each client gets its
    answer or an error within the time limit (plus one sampler step and transport) of sending it; before,
    requests waited uncounted in Triton's queue and came back long after the limit without an error."""
    import tritonclient.http as httpclient

    srv, _ = limited
    n = 6
    answers: dict[int, tuple[str, float, str]] = {}

    def call(i: int) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http}", network_timeout=120)
        t0 = time.monotonic()
        try:
            client.infer(MODEL_NAME, infer_inputs(httpclient, f"burst {i}", 1.0, SLOW_STEPS, 7.0, i))
            answers[i] = ("audio", time.monotonic() - t0, "")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            answers[i] = ("error", time.monotonic() - t0, str(exc))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers) == list(range(n))
    slack = 1.5  # a sampler step, the VAE decode and HTTP on a loaded 2-core machine
    late = {i: a for i, a in answers.items() if a[1] > LIMIT_S + slack}
    assert not late, answers
    kinds = [a[0] for a in answers.values()]
    assert "audio" in kinds and "error" in kinds, answers
    assert all(("busy" in a[2] or "time limit" in a[2]) for a in answers.values() if a[0] == "error"), answers


@pytest.fixture(scope="module")
def reference(mini_export):
    pipeline = open_pipeline(mini_export[0])
    d = pipeline.manifest["sampler_defaults"]

    def run(v) -> np.ndarray:
        opts = GenerateOptions(prompt=v.prompt, seconds=v.seconds, steps=v.steps, cfg_scale=v.cfg_scale, seed=v.seed,
                               sampler_type=d["sampler_type"], sigma_min=d["sigma_min"], sigma_max=d["sigma_max"],
                               rho=d["rho"])
        return pipeline.generate(opts).audio[0].numpy()
    return run


def test_soak_with_faults_loses_nothing_and_memory_stays_flat(mini_export, reference, tmp_path):
    from engines.serving.soak import SoakPlan, markdown, run_soak

    srv = Server(mini_export[0], tmp_path / "serve.log", ("--max-batch", "4", "--max-queue-delay-ms", "20"))
    try:
        srv.wait_ready()
        report = run_soak("127.0.0.1", srv.http, srv.grpc, srv.proc.pid, SoakPlan(), reference)
        report.server_exit = srv.proc.wait(120)
    finally:
        srv.stop()
    summary = report.summary()
    report.write(tmp_path / "soak.json")
    out = os.environ.get("QUADIT_SOAK_REPORT")
    if out:  # the figures of the closing note / docs/serving.md
        report.write(out)
        Path(out).with_suffix(".md").write_text(markdown(summary))
    print(json.dumps(summary))
    assert summary["requests"] == 200 and summary["lost"] == 0, summary
    assert summary["mismatched"] == 0, [o for o in report.outcomes if o.result == "mismatch"]
    assert summary["outcomes"].get("audio", 0) >= 100, summary
    bad = [o for o in report.outcomes if o.kind == "bad"]
    assert bad and all(o.result == "error" for o in bad), bad
    drained = report.in_flight_at_sigterm()
    assert drained and all(o.result == "audio" for o in drained), drained
    assert report.server_exit == 0, srv.log_path.read_text()[-3000:]
    assert summary["rss_end_mb"] <= summary["rss_warm_mb"] * 1.10 + 64, summary
    # refused and bad requests are answered with their message; PyTriton's traceback of each stays at DEBUG
    assert "WARNING pytriton.proxy.inference" not in srv.log_path.read_text()
