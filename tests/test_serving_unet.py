"""Serving a UNet-family export (audioldm-mini, synthetic weights) with `quadit serve`: the batched UNet loop
equals single runs; bad requests are named; a real server (scripts/serve.py on free loopback ports) answers at
its first ready, equals `quadit generate`'s WAV, batches concurrent HTTP and gRPC requests that each equal their
single run, answers a malformed request with an error and the next good one with audio, and drains on SIGTERM.
`quadit triton-repo` writes a model repository for it whose configs Triton's protobuf parses (its Python-graph
form served by the bundled tritonserver: marked slow); that form's sampler has a request time limit.

Short audio (1 s: 28 latent frames) and few steps keep it lean; the export runs in this process."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import Server

from engines.runtime.unet_pipeline import UNetGenerateOptions, open_unet_pipeline
from engines.serving.api import RequestError, parse_unet_request
from engines.serving.client import infer_inputs
from engines.serving.server import MODEL_NAME
from engines.serving.unet_batching import generate_unet_batch, unet_batch_key

pytestmark = pytest.mark.filterwarnings("ignore")
STEPS = 4
RATE = 16000
# a batched answer against the same request run alone (ONNX Runtime CPU, FP32): measured 0 here, relative to the
# single run's peak; the bound leaves room for batch-size-dependent kernels elsewhere
BATCH_BOUND = 1e-5
PCM_BOUND = 2 / 32768  # the server's float audio against `quadit generate`'s 16-bit WAV: rounding to 1 LSB


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory) -> Path:
    """`quadit export --model audioldm-mini --synthetic-weights` (in this process: no second interpreter start)."""
    from engines.cli.export import main as export

    out = tmp_path_factory.mktemp("unet-serve") / "audioldm-mini"
    assert export(["--model", "audioldm-mini", "--synthetic-weights", "--scheme", "fp32", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pipeline(unet_export):
    return open_unet_pipeline(unet_export, json.loads((unet_export / "manifest.json").read_text()))


def _single(pipeline, prompt: str, seconds: float, cfg: float, seed: int, steps: int = STEPS) -> torch.Tensor:
    return pipeline.generate(UNetGenerateOptions(prompt, seconds, steps, cfg, seed)).audio[0]  # [1, samples]


# -- in process ------------------------------------------------------------------------------------------
def test_unet_batch_equals_single_runs_with_own_seeds_prompts_and_cfg(pipeline):
    reqs = [UNetGenerateOptions("rain on a tin roof", 1.0, STEPS, 2.5, 1),
            UNetGenerateOptions("a dog barking", 1.05, STEPS, 1.0, 2),  # 1.05 s: the same 28 latent frames
            UNetGenerateOptions("birdsong", 1.0, STEPS, 4.0, 3)]
    assert len({unet_batch_key(pipeline, o) for o in reqs}) == 1
    batch = generate_unet_batch(pipeline, reqs)
    assert batch.dit_calls == STEPS and batch.dit_rows == STEPS * 5  # cfg 1 needs no unconditioned row
    for opts, audio in zip(reqs, batch.audio):
        single = _single(pipeline, opts.prompt, opts.seconds, opts.cfg_scale, opts.seed)
        assert audio.shape == single.shape == (1, int(opts.seconds * RATE))
        assert _rel(audio, single) <= BATCH_BOUND
    chunked = generate_unet_batch(pipeline, reqs, max_rows=2)  # a TensorRT engine's profile: at most 2 rows
    assert chunked.dit_calls == STEPS * 3 and all(torch.equal(a, b) for a, b in zip(chunked.audio, batch.audio))


def _request(**over):
    row = {"prompt": np.array([[b"rain"]], dtype=object), "seconds": np.array([[1.0]], np.float32),
           "steps": np.array([[4]], np.int32), "cfg_scale": np.array([[2.5]], np.float32),
           "seed": np.array([[1]], np.int64)}
    row.update(over)
    return row


@pytest.mark.parametrize("over,message", [
    ({"prompt": np.array([[b" "]], dtype=object)}, "'prompt' is empty"),
    ({"seconds": np.array([[0.01]], np.float32)}, "shorter than this model's shortest output"),
    ({"seconds": np.array([[30.0]], np.float32)}, "longer than this model's window of 20.48 s"),
    ({"steps": np.array([[0]], np.int32)}, "'steps' must be from 1"),
    ({"cfg_scale": np.array([[-1.0]], np.float32)}, "'cfg_scale'"),
    ({"seconds": np.array([[1]], np.int32)}, "'seconds' must be a float"),
    ({"seed": np.array([[1, 2]], np.int64)}, "shape \\[batch, 1\\]"),
])
def test_bad_unet_requests_name_the_problem(pipeline, over, message):
    with pytest.raises(RequestError, match=message):
        parse_unet_request(_request(**over), pipeline.dims)
    assert parse_unet_request(_request(), pipeline.dims)[0] == UNetGenerateOptions("rain", 1.0, 4, 2.5, 1)


# -- a real server -----------------------------------------------------------------------------------------
def _infer_http(port: int, prompt: str, seconds: float, cfg: float, seed: int, steps: int = STEPS):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
    try:
        return client.infer(MODEL_NAME, infer_inputs(httpclient, prompt, seconds, steps, cfg, seed))
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(unet_export, tmp_path_factory):
    """The server, and the answer to a request sent the moment `/v2/health/ready` first said 200."""
    srv = Server(unet_export, tmp_path_factory.mktemp("unet-serve-log") / "serve.log",  # 5 + 2 spare instances
                 ("--max-batch", "4", "--max-inflight", "5", "--max-queue-delay-ms", "500"))
    try:
        t0 = time.monotonic()
        while srv.status("/v2/health/ready") != 200:
            assert srv.proc.poll() is None, srv.log_path.read_text()[-3000:]
            assert time.monotonic() - t0 < 240, srv.log_path.read_text()[-3000:]
            time.sleep(0.1)
        first = _infer_http(srv.http, "first", 0.5, 2.5, 1, steps=2)
        yield srv, first
    finally:
        srv.stop()


def test_ready_means_answering_and_audio_equals_generate_wav(server, unet_export, tmp_path):
    from engines.cli.generate import main as generate

    srv, first = server
    assert first.as_numpy("audio").shape == (1, 1, 8000) and int(first.as_numpy("sample_rate")[0, 0]) == RATE
    answer = _infer_http(srv.http, "rain on a tin roof", 1.0, 2.5, 7)
    audio = answer.as_numpy("audio")[0, 0]
    wav = tmp_path / "rain.wav"
    assert generate(["--export", str(unet_export), "--prompt", "rain on a tin roof", "--seconds", "1", "--steps",
                     str(STEPS), "--cfg-scale", "2.5", "--seed", "7", "--out", str(wav)]) == 0  # `quadit generate`
    pcm, rate = sf.read(str(wav), dtype="float32")
    assert rate == RATE and pcm.shape == audio.shape == (RATE,)
    peak = max(1.0, float(np.abs(audio).max()))  # write_wav normalises peaks above full scale
    assert float(np.abs(audio / peak - pcm).max()) <= PCM_BOUND


def test_concurrent_http_and_grpc_requests_batch_and_equal_single_runs(server, pipeline):
    import tritonclient.grpc as grpcclient

    srv, _ = server
    cases = [("rain on a tin roof", 1.0, 2.5, 11, "http"), ("a dog barking in a hall", 1.0, 4.0, 12, "grpc"),
             ("distant thunder", 1.05, 1.0, 13, "http"), ("a creaking door", 1.0, 2.5, 14, "grpc"),
             ("wind", 0.5, 2.5, 15, "http")]  # 0.5 s: another latent shape, its own batch
    answers: dict[int, tuple] = {}

    def call(i: int) -> None:
        prompt, seconds, cfg, seed, proto = cases[i]
        if proto == "http":
            result = _infer_http(srv.http, prompt, seconds, cfg, seed)
        else:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
            result = client.infer(MODEL_NAME, infer_inputs(grpcclient, prompt, seconds, STEPS, cfg, seed))
            client.close()
        answers[i] = (result.as_numpy("audio"), result.as_numpy("sample_rate"), result.as_numpy("batch_size"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(answers) == list(range(len(cases)))
    sizes = [int(answers[i][2][0, 0]) for i in range(len(cases))]
    assert sizes[4] == 1 and max(sizes[:4]) >= 2, sizes  # the 28-frame requests were stepped together
    for i, (prompt, seconds, cfg, seed, _) in enumerate(cases):
        audio, rate, _ = answers[i]
        single = _single(pipeline, prompt, seconds, cfg, seed)
        assert audio.shape == (1, 1, int(seconds * RATE)) and int(rate[0, 0]) == RATE
        assert _rel(audio[0], single) <= BATCH_BOUND, (i, _rel(audio[0], single))


def test_malformed_request_gets_an_error_and_the_next_good_one_audio(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    srv, _ = server
    client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http}", network_timeout=300)
    for args, message in ((("x", 0.01, STEPS, 2.5, 1), "shorter than this model's shortest output"),
                          (("", 1.0, STEPS, 2.5, 1), "'prompt' is empty"),
                          (("x", 99.0, STEPS, 2.5, 1), "longer than this model's window")):
        with pytest.raises(InferenceServerException, match=message):
            client.infer(MODEL_NAME, infer_inputs(httpclient, *args))
    with pytest.raises(InferenceServerException, match="seconds"):  # a missing input
        client.infer(MODEL_NAME, infer_inputs(httpclient, "x", 1.0, STEPS, 2.5, 1, drop=("seconds",)))
    ok = client.infer(MODEL_NAME, infer_inputs(httpclient, "still here", 0.5, 2, 2.5, 1))
    assert ok.as_numpy("audio").shape == (1, 1, 8000) and np.isfinite(ok.as_numpy("audio")).all()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics}/metrics", timeout=10).read().decode()
    assert f'nv_inference_request_failure{{model="{MODEL_NAME}",reason="BACKEND",version="1"}}' in metrics


def test_sigterm_drains_the_running_request_and_exits_0(server):
    """Last of the server tests: it stops the module's server."""
    srv, _ = server
    answers: dict[str, object] = {}

    def call() -> None:
        try:
            answers["audio"] = _infer_http(srv.http, "in flight", 1.0, 2.5, 21, steps=80).as_numpy("audio")
        except Exception as exc:  # noqa: BLE001 - asserted below
            answers["audio"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.5)  # past the 500 ms queue delay: 80 steps (4 s on an idle 2-core machine) are running
    os.killpg(srv.proc.pid, signal.SIGTERM)  # the whole group, as Ctrl-C; serve.py forwards it to its server
    thread.join(300)
    assert isinstance(answers["audio"], np.ndarray) and answers["audio"].shape == (1, 1, RATE), answers
    assert srv.proc.wait(120) == 0
    log = srv.log_path.read_text()
    drained = re.search(r"draining: (\d+) generation", log)
    assert drained and int(drained.group(1)) == 1 and "stopped (" in log, log[-2000:]


# -- the model-repository form -----------------------------------------------------------------------------
def test_unet_repository_configs(unet_export, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from engines.serving.triton_repo import RepoOptions, write_repository

    summary = write_repository(unet_export, tmp_path / "repo", RepoOptions(kind="gpu", max_batch=3))
    models = ("quadit_generate", "quadit_text_encoder", "quadit_unet", "quadit_vae_decoder", "quadit_vocoder")
    assert summary["validation"] == {m: "ok" for m in models}

    def parse(name: str):
        return text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    unet = parse("quadit_unet")
    assert unet.backend == "onnxruntime" and unet.max_batch_size == 6  # 3 requests x [uncond, cond]
    assert [i.name for i in unet.input][:2] == ["sample", "timestep"] and unet.input[1].HasField("reshape")
    sampler = parse("quadit_generate")
    assert [list(o.dims) for o in sampler.output] == [[1, -1], [1], [1]]  # mono
    settings = json.loads((tmp_path / "repo" / "quadit_generate" / "1" / "quadit.json").read_text())
    assert settings["family"] == "unet" and settings["models"]["vocoder"] == "quadit_vocoder"
    assert "triton_bls_unet" in (tmp_path / "repo" / "quadit_generate" / "1" / "model.py").read_text()


@pytest.mark.slow  # the bundled tritonserver starts five Python-backend stubs, each importing torch
def test_unet_repository_python_form_serves_in_the_bundled_tritonserver(unet_export, pipeline, tmp_path):
    import subprocess

    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from engines.serving.server import free_ports
    from engines.serving.triton_repo import RepoOptions, bundled_server, write_repository

    repo = tmp_path / "repo"
    write_repository(unet_export, repo, RepoOptions(kind="cpu", max_batch=2, graph_backend="python"))
    http, grpc, metrics = free_ports(3)
    argv, env = bundled_server(repo, tmp_path / "work", http, grpc, metrics)
    with open(tmp_path / "tritonserver.log", "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=300)
    try:
        t0 = time.monotonic()
        while not _ready(client):
            assert proc.poll() is None and time.monotonic() - t0 < 300, \
                (tmp_path / "tritonserver.log").read_text()[-3000:]
            time.sleep(1)
        audio = client.infer(MODEL_NAME, infer_inputs(httpclient, "rain on a tin roof", 1.0, STEPS, 2.5, 21))
        with pytest.raises(InferenceServerException, match="shorter than this model's shortest output"):
            client.infer(MODEL_NAME, infer_inputs(httpclient, "x", 0.01, STEPS, 2.5, 1))
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    single = _single(pipeline, "rain on a tin roof", 1.0, 2.5, 21)
    assert audio.as_numpy("audio").shape == (1, 1, RATE) and int(audio.as_numpy("sample_rate")[0, 0]) == RATE
    assert _rel(audio.as_numpy("audio")[0], single) <= BATCH_BOUND


def _ready(client) -> bool:
    try:
        return client.is_model_ready(MODEL_NAME)
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_repository_sampler_has_a_request_time_limit():
    """issue 23's leftover: the stock-tritonserver form's quadit_generate rejects a request that waited past
    --request-timeout-s in Triton's queue (queue policy), and its sampler abandons a batch running past it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from engines.serving.triton_bls import TimeLimitExceeded, time_limit
    from engines.serving.triton_repo import RepoOptions, sampler_config

    for max_batch in (1, 4):  # the queue policy needs the dynamic batcher, also at max batch 1
        config = text_format.Parse(sampler_config(RepoOptions(max_batch=max_batch, request_timeout_s=2.5), {}),
                                   model_config_pb2.ModelConfig())
        policy = config.dynamic_batching.default_queue_policy
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert policy.default_timeout_microseconds == 2_500_000 and config.max_batch_size == max_batch
    with pytest.raises(Exception, match="--request-timeout-s must be positive"):
        RepoOptions(request_timeout_s=0)
    now = [100.0]
    on_step = time_limit(2.5, clock=lambda: now[0])
    on_step(0)
    now[0] = 102.4
    on_step(5)
    now[0] = 102.5
    with pytest.raises(TimeLimitExceeded, match="time limit of 2.5 s"):
        on_step(6)
