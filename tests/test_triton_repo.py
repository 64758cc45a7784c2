"""The Triton model repository: configs parsed by Triton's own model-config protobuf, I/O from the graphs,
TensorRT batch limits from engine profiles, and (python graph backend) the whole repository, BLS sampler
included, served by the PyTriton wheel's tritonserver and equal to a single in-process run."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from engines.serving.server import free_ports
from engines.serving.triton_repo import RepoOptions, bundled_server, validate_repository, write_repository
from exporter.errors import InputError


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_onnxruntime_repository_configs(mini_export, tmp_path):
    summary = write_repository(mini_export[0], tmp_path / "repo", RepoOptions(kind="gpu", instances=2, max_batch=4))
    assert summary["validation"] == {m: "ok" for m in ("quadit_conditioners", "quadit_dit", "quadit_generate",
                                                       "quadit_text_encoder", "quadit_vae_decoder")}
    dit = _parse(tmp_path / "repo" / "quadit_dit" / "config.pbtxt")
    assert dit.backend == "onnxruntime" and dit.max_batch_size == 8 and dit.default_model_filename == "dit.onnx"
    inputs = {i.name: i for i in dit.input}
    assert list(inputs["x"].dims) == [64, -1] and list(inputs["t"].dims) == [1] and inputs["t"].HasField("reshape")
    assert dit.instance_group[0].count == 2 and dit.instance_group[0].kind == dit.instance_group[0].KIND_GPU
    assert dit.dynamic_batching.max_queue_delay_microseconds == 50_000
    sampler = _parse(tmp_path / "repo" / "quadit_generate" / "config.pbtxt")
    assert sampler.backend == "python" and sampler.max_batch_size == 4
    assert [i.name for i in sampler.input] == ["prompt", "seconds", "steps", "cfg_scale", "seed"]
    assert [list(o.dims) for o in sampler.output] == [[2, -1], [1], [1]]
    settings = json.loads((tmp_path / "repo" / "quadit_generate" / "1" / "quadit.json").read_text())
    assert settings["io"]["quadit_conditioners"]["column_inputs"] == ["seconds_start", "seconds_total"]
    # a broken config is refused by name
    (tmp_path / "repo" / "quadit_dit" / "config.pbtxt").write_text("name: \"quadit_dit\"\nmax_batch_size: many\n")
    with pytest.raises(InputError, match="quadit_dit.*not a valid Triton model config"):
        validate_repository(tmp_path / "repo")


def test_tensorrt_plan_models_take_batch_limits_from_engine_profiles(mini_export, tmp_path):
    export, manifest = mini_export
    engines = tmp_path / "engines"
    engines.mkdir()
    c, d = manifest["dims"]["io_channels"], manifest["dims"]
    seq = manifest["conditioning"]["text_max_length"]

    def spec(shape_min, shape_max):
        return {"min": shape_min, "opt": shape_max, "max": shape_max}

    entries = {
        "dit": {"graph": "dit", "engine": "dit.engine", "bucket": None, "profiles": [
            {"x": spec([b, c, 22], [b, c, 257]), "t": spec([b], [b])} for b in (2, 1)]},
        "text_encoder": {"graph": "text_encoder", "engine": "text_encoder.engine", "bucket": None,
                         "profiles": [{"input_ids": spec([1, seq], [2, seq])}]},
        "vae_decoder": {"graph": "vae_decoder", "engine": "vae_decoder.engine", "bucket": None,
                        "profiles": [{"latents": spec([1, c, 22], [1, c, 257])}]}}
    for e in entries.values():
        (engines / e["engine"]).write_bytes(b"plan")  # stands in for a serialized engine: configs only here
    (engines / "engines.json").write_text(json.dumps({"engines": entries}))
    summary = write_repository(export, tmp_path / "repo", RepoOptions(max_batch=4), engines)
    models = summary["models"]
    assert models["quadit_dit"] == {"backend": "tensorrt_plan", "max_batch_size": 2}
    assert models["quadit_vae_decoder"]["max_batch_size"] == 1 and models["quadit_conditioners"]["backend"] == "onnxruntime"
    dit = _parse(tmp_path / "repo" / "quadit_dit" / "config.pbtxt")
    assert dit.platform == "tensorrt_plan" and list(dit.dynamic_batching.preferred_batch_size) == [2]
    vae = _parse(tmp_path / "repo" / "quadit_vae_decoder" / "config.pbtxt")
    assert not vae.HasField("dynamic_batching")
    settings = json.loads((tmp_path / "repo" / "quadit_generate" / "1" / "quadit.json").read_text())
    assert settings["dit_batch_sizes"] == [1, 2] and d["global_dim"] == 512


@pytest.mark.slow  # about 70 s: five Python-backend stubs start, each importing torch
def test_python_form_of_the_repository_serves_in_the_bundled_tritonserver(mini_export, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from engines.runtime.pipeline import GenerateOptions, open_pipeline

    export, manifest = mini_export
    repo = tmp_path / "repo"
    write_repository(export, repo, RepoOptions(kind="cpu", max_batch=2, graph_backend="python"))
    http, grpc, metrics = free_ports(3)
    argv, env = bundled_server(repo, tmp_path / "work", http, grpc, metrics)
    log = open(tmp_path / "tritonserver.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=300)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                if client.is_model_ready("quadit_generate"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1)
        else:
            raise TimeoutError((tmp_path / "tritonserver.log").read_text()[-3000:])

        def inputs(prompt: str, seconds: float):
            out = []
            for name, dtype, value in [("prompt", "BYTES", np.array([[prompt.encode()]], dtype=object)),
                                       ("seconds", "FP32", np.array([[seconds]], np.float32)),
                                       ("steps", "INT32", np.array([[4]], np.int32)),
                                       ("cfg_scale", "FP32", np.array([[7.0]], np.float32)),
                                       ("seed", "INT64", np.array([[21]], np.int64))]:
                t = httpclient.InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
                out.append(t)
            return out

        audio = client.infer("quadit_generate", inputs("rain on a tin roof", 1.0)).as_numpy("audio")
        with pytest.raises(InferenceServerException, match="'prompt' is empty"):
            client.infer("quadit_generate", inputs("", 1.0))
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    d = manifest["sampler_defaults"]
    single = open_pipeline(export).generate(GenerateOptions(
        prompt="rain on a tin roof", seconds=1.0, steps=4, cfg_scale=7.0, seed=21, sampler_type=d["sampler_type"],
        sigma_min=d["sigma_min"], sigma_max=d["sigma_max"], rho=d["rho"])).audio[0].numpy()
    assert audio.shape == (1, 2, 44100)
    assert float(np.abs(audio[0] - single).max() / np.abs(single).max()) <= 1e-4
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
