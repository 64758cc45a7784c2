"""Serving: the batched sampler equals single runs; the scheduler's limits; a real Triton server (scripts/serve.py
on free loopback ports) answering concurrent tritonclient requests, refusing bad ones, surviving a client that
hangs up, and draining on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Server

from engines.runtime.pipeline import GenerateOptions, open_pipeline
from engines.serving.batching import GuidedBatchDiT, generate_batch, split_rows
from engines.serving.client import infer_inputs
from engines.serving.scheduler import GenerateScheduler, RequestTimeout, SchedulerConfig, ServiceClosed
from engines.serving.server import MODEL_NAME, RequestError, parse_request, prepare_python_backend_env

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pipeline(mini_export):
    return open_pipeline(mini_export[0])


def _opts(pipeline, prompt: str, seconds: float = 1.0, seed: int = 0, cfg: float = 7.0, steps: int = STEPS):
    d = pipeline.manifest["sampler_defaults"]
    return GenerateOptions(prompt=prompt, seconds=seconds, steps=steps, cfg_scale=cfg, seed=seed,
                           sampler_type=d["sampler_type"], sigma_min=d["sigma_min"], sigma_max=d["sigma_max"],
                           rho=d["rho"])


# -- the batched sampler, in process ---------------------------------------------------------------------
def test_batch_equals_single_runs_with_own_seeds_prompts_and_cfg(pipeline):
    reqs = [_opts(pipeline, "rain on a tin roof", seed=1), _opts(pipeline, "a dog barking", seed=2, cfg=1.0),
            _opts(pipeline, "birdsong", seconds=0.99, seed=3, cfg=4.5)]  # 0.99 s: the same latent length
    batch = generate_batch(pipeline, reqs)
    # one DiT call per step: 3 conditioned rows + 2 unconditioned (cfg 1 needs none)
    assert batch.dit_calls == STEPS and batch.dit_rows == STEPS * 5
    for opts, audio in zip(reqs, batch.audio):
        single = pipeline.generate(opts).audio[0]
        assert audio.shape == single.shape == (2, int(round(opts.seconds * 44100)))
        assert _rel(audio, single) <= 1e-4


def test_fixed_profile_batches_split_and_pad():
    assert split_rows(5, (2, 1)) == [2, 2, 1]
    assert split_rows(3, (8, 2)) == [2, 2]  # the last chunk is padded
    seen = []

    def run(x, t, c, g):
        seen.append(x.shape[0])
        return x * 2

    dit = GuidedBatchDiT(run, [1.0, 1.0, 1.0], batch_sizes=(2,))
    x = torch.arange(3.0).view(3, 1, 1)
    out = dit(x, torch.zeros(3), torch.zeros(3, 1, 1), torch.zeros(3, 1))
    assert seen == [2, 2] and torch.equal(out, x * 2)


def test_requests_with_different_lengths_do_not_batch(pipeline):
    with pytest.raises(ValueError, match="latent length"):
        generate_batch(pipeline, [_opts(pipeline, "a", seconds=1.0), _opts(pipeline, "b", seconds=0.5)])


# -- the scheduler ---------------------------------------------------------------------------------------
def test_scheduler_groups_by_key_and_enforces_limits(pipeline):
    sched = GenerateScheduler(pipeline, SchedulerConfig(max_batch=4, max_queue_delay_ms=300, max_queue=4))
    futures = sched.submit([_opts(pipeline, "a", seed=1), _opts(pipeline, "b", seconds=0.5, seed=2),
                            _opts(pipeline, "c", seed=3)])
    with pytest.raises(ServiceClosed, match="queue is full"):
        sched.submit([_opts(pipeline, "d")] * 2)
    outs = [f.result(timeout=120) for f in futures]
    assert [o.batch_size for o in outs] == [2, 1, 2]  # 1 s requests together, the 0.5 s one alone
    assert outs[1].audio.shape == (2, 22050)
    sched.close()
    with pytest.raises(ServiceClosed, match="shutting down"):
        sched.submit([_opts(pipeline, "e")])
    assert sched.join(30)

    slow = GenerateScheduler(pipeline, SchedulerConfig(max_batch=1, max_queue_delay_ms=0, request_timeout_s=0.5))
    (late,) = slow.submit([_opts(pipeline, "f", steps=200)])
    with pytest.raises(RequestTimeout, match="time limit of 0.5 s"):
        late.result(timeout=120)
    slow.close()
    assert slow.join(30)


def _request(**over):
    row = {"prompt": np.array([[b"rain"]], dtype=object), "seconds": np.array([[1.0]], np.float32),
           "steps": np.array([[4]], np.int32), "cfg_scale": np.array([[7.0]], np.float32),
           "seed": np.array([[1]], np.int64)}
    row.update(over)
    return row


@pytest.mark.parametrize("over,message", [
    ({"prompt": np.array([[b"  "]], dtype=object)}, "'prompt' is empty"),
    ({"prompt": np.array([[b"\xff\xfe"]], dtype=object)}, "UTF-8"),
    ({"seconds": np.array([[0.0]], np.float32)}, "'seconds' must be positive"),
    ({"seconds": np.array([[np.nan]], np.float32)}, "'seconds' must be positive"),
    ({"seconds": np.array([[30.0]], np.float32)}, "longer than this model's window"),
    ({"steps": np.array([[1]], np.int32)}, "'steps' must be from 2"),
    ({"cfg_scale": np.array([[np.inf]], np.float32)}, "'cfg_scale'"),
    ({"seconds": np.array([[1]], np.int32)}, "'seconds' must be a float"),
    ({"seed": np.array([1], np.int64)}, "shape \\[batch, 1\\]"),
    ({"seconds": np.array([[1.0], [2.0]], np.float32)}, "same, non-zero batch size"),
])
def test_bad_requests_name_the_problem(over, message):
    with pytest.raises(RequestError, match=message):
        parse_request(_request(**over), {"sampler_type": "dpmpp-3m-sde", "sigma_min": 0.3, "sigma_max": 500.0,
                                         "rho": 1.0}, max_seconds=11.9)


def test_libpython_of_this_interpreter_goes_first():
    import sysconfig

    env = {"LD_LIBRARY_PATH": "/opt/x:" + str(sysconfig.get_config_var("LIBDIR"))}
    libdir = prepare_python_backend_env(env)
    if libdir is None:
        pytest.skip("this Python has no shared libpython")
    parts = env["LD_LIBRARY_PATH"].split(":")
    assert parts[0] == libdir and parts.count(libdir) == 1 and "/opt/x" in parts
    assert prepare_python_backend_env(env) == libdir and env["LD_LIBRARY_PATH"].split(":") == parts


# -- a real server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(mini_export, tmp_path_factory):
    srv = Server(mini_export[0], tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _inputs(module, prompt: str, seconds: float, steps: int, cfg: float, seed: int, seconds_dtype="FP32"):
    replace = {} if seconds_dtype == "FP32" else {"seconds": (seconds_dtype, np.array([[seconds]], np.int32))}
    return infer_inputs(module, prompt, seconds, steps, cfg, seed, replace)


def test_concurrent_requests_are_batched_and_equal_sequential_runs(server, pipeline):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    cases = [("rain on a tin roof", 1.0, 7.0, 11, "http"), ("a dog barking in a hall", 1.0, 3.0, 12, "grpc"),
             ("distant thunder", 1.0, 1.0, 13, "http"), ("a creaking door", 1.0, 7.0, 14, "grpc"),
             ("wind", 0.5, 7.0, 15, "http")]  # another latent length: its own batch
    answers: dict[int, tuple] = {}

    def call(i: int) -> None:
        prompt, seconds, cfg, seed, proto = cases[i]
        if proto == "http":
            client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300)
        else:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        result = client.infer(MODEL_NAME, _inputs(httpclient if proto == "http" else grpcclient,
                                                  prompt, seconds, STEPS, cfg, seed))
        answers[i] = (result.as_numpy("audio"), result.as_numpy("sample_rate"), result.as_numpy("batch_size"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(answers) == list(range(len(cases)))
    sizes = [int(answers[i][2][0, 0]) for i in range(len(cases))]
    assert sizes[4] == 1 and max(sizes[:4]) >= 2, sizes  # the 1 s requests were stepped together
    for i, (prompt, seconds, cfg, seed, _) in enumerate(cases):
        audio, rate, _ = answers[i]
        single = pipeline.generate(_opts(pipeline, prompt, seconds=seconds, seed=seed, cfg=cfg)).audio[0]
        assert audio.shape == (1, 2, int(round(seconds * 44100))) and int(rate[0, 0]) == 44100
        assert _rel(audio[0], single) <= 1e-4, (i, _rel(audio[0], single))


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300)
    bad = [(("", 1.0, 4, 7.0, 1), {}, "'prompt' is empty"), (("x", -1.0, 4, 7.0, 1), {}, "must be positive"),
           (("x", 99.0, 4, 7.0, 1), {}, "longer than this model's window"), (("x", 1.0, 1, 7.0, 1), {}, "'steps'"),
           (("x", 1.0, 4, 7.0, 1), {"seconds_dtype": "INT32"}, "expects 'FP32'")]
    for args, kw, message in bad:
        with pytest.raises(InferenceServerException, match=message):
            client.infer(MODEL_NAME, _inputs(httpclient, *args, **kw))
    wrong_shape = httpclient.InferInput("seed", [1, 2], "INT64")
    wrong_shape.set_data_from_numpy(np.array([[1, 2]], np.int64))
    with pytest.raises(InferenceServerException, match="seed"):
        client.infer(MODEL_NAME, _inputs(httpclient, "x", 1.0, 2, 7.0, 1)[:4] + [wrong_shape])
    assert client.is_server_live() and client.is_model_ready(MODEL_NAME)
    ok = client.infer(MODEL_NAME, _inputs(httpclient, "still here", 0.5, 2, 7.0, 1))
    assert ok.as_numpy("audio").shape == (1, 2, 22050)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10).read().decode()
    assert f'nv_inference_request_failure{{model="{MODEL_NAME}",reason="BACKEND",version="1"}}' in metrics


def test_a_client_that_hangs_up_harms_nothing(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    body = json.dumps({"inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["gone"]},
        {"name": "seconds", "datatype": "FP32", "shape": [1, 1], "data": [1.0]},
        {"name": "steps", "datatype": "INT32", "shape": [1, 1], "data": [8]},
        {"name": "cfg_scale", "datatype": "FP32", "shape": [1, 1], "data": [7.0]},
        {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [5]}]}).encode()
    with socket.create_connection(("127.0.0.1", server.http)) as s:  # send, then hang up unanswered
        s.sendall(f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    with pytest.raises(InferenceServerException, match="(?i)deadline"):
        g.infer(MODEL_NAME, _inputs(grpcclient, "impatient", 1.0, 8, 7.0, 6), client_timeout=0.2)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300)
    after = client.infer(MODEL_NAME, _inputs(httpclient, "after", 1.0, 2, 7.0, 7))
    assert after.as_numpy("audio").shape == (1, 2, 44100)
    assert server.proc.poll() is None and client.is_server_live()


def test_sigterm_stops_accepting_finishes_in_flight_and_exits_0(server):
    """Last of the server tests: it stops the module's server."""
    import tritonclient.http as httpclient

    answers: dict[int, object] = {}

    def call(i: int) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300)
        try:
            answers[i] = client.infer(MODEL_NAME, _inputs(httpclient, f"in flight {i}", 1.0, 40, 7.0, i)).as_numpy("audio")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            answers[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(2.5)  # both requests reach the scheduler (its queue delay is 1 s), and sampling (40 steps) starts
    # to the whole process group, as `timeout` or Ctrl-C do: serve.py runs the server in a session of its
    # own and forwards the signal, so tritonserver and PyTriton's helpers do not stop under the drain
    os.killpg(server.proc.pid, signal.SIGTERM)
    # the late request goes in once the server has taken the signal (its log says it is draining): sent before,
    # it is a request like the in-flight ones, queued behind their 40 steps, which a loaded CI host ran past 60 s
    deadline = time.time() + 30
    while "draining:" not in server.log_path.read_text() and time.time() < deadline:
        time.sleep(0.1)
    late = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=60)
    # refused by the scheduler, or by PyTriton while the model unloads, or, once down, gone
    with pytest.raises(Exception, match="shutting down|handler is stopped|refused|not found|unavailable"):
        late.infer(MODEL_NAME, _inputs(httpclient, "too late", 1.0, 2, 7.0, 9))
    for t in threads:
        t.join(300)
    assert all(isinstance(answers[i], np.ndarray) and answers[i].shape == (1, 2, 44100) for i in range(2)), answers
    assert server.proc.wait(120) == 0
    log = server.log_path.read_text()
    drained = re.search(r"draining: (\d+) generation", log)
    assert drained and int(drained.group(1)) >= 1 and "stopped (" in log, log[-2000:]
