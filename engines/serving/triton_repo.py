"""A Triton model repository of an export: one Triton model per graph and a Python-backend sampler (BLS).

    REPO/quadit_text_encoder/   onnxruntime (ONNX graph) or tensorrt_plan (engine)
    REPO/quadit_conditioners/   onnxruntime: the number conditioners (never built as an engine)
    REPO/quadit_dit/            or quadit_dit_bucket{k}/ per timestep bucket of a per-bucket-graph export
    REPO/quadit_vae_decoder/
    REPO/quadit_generate/       python: tokenizer + sampler; calls the models above with BLS requests

A UNet-family export (AudioLDM, TANGO) gets quadit_text_encoder, quadit_unet, quadit_vae_decoder and
quadit_vocoder, and a `quadit_generate` running `engines.serving.triton_bls_unet` (mono audio).

`quadit_generate` answers the same API as scripts/serve.py, so clients do not care which one serves them.
Every graph model gets dynamic batching and an instance group (count and kind chosen at write time);
its inputs, outputs and dtypes come from the ONNX graph itself, the batch limits of a TensorRT plan from its
engine profiles. `graph_backend='python'` serves the ONNX graphs with a small Python-backend model running
ONNX Runtime instead, for Triton builds without the onnxruntime backend (the PyTriton wheel's server has
only the Python backend), so the whole repository can be run on this machine.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_dir, read_manifest

log = logging.getLogger(__name__)

PREFIX = "quadit_"
SAMPLER = "quadit_generate"
GRAPHS = ("text_encoder", "conditioners", "dit", "vae_decoder")
UNET_GRAPHS = ("text_encoder", "unet", "vae_decoder", "vocoder")  # a UNet-family export (AudioLDM, TANGO)
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL", 11: "TYPE_FP64",
                  16: "TYPE_BF16"}
TRITON_TO_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT64": "int64", "TYPE_INT32": "int32",
                   "TYPE_BOOL": "bool", "TYPE_FP64": "float64"}


@dataclass(frozen=True)
class RepoOptions:
    kind: str = "gpu"  # instance group kind of the graph models: gpu (deployments) or cpu
    instances: int = 1  # instances of each graph model (per GPU with kind gpu)
    max_batch: int = 8  # requests the sampler model batches, and rows a graph model batches (x2 for CFG)
    max_queue_delay_us: int = 50_000
    graph_backend: str = "onnxruntime"  # onnxruntime | python (ONNX Runtime inside Triton's Python backend)
    request_timeout_s: float = 300.0  # quadit_generate: the longest wait in Triton's queue, and the longest run

    def __post_init__(self) -> None:
        if self.kind not in ("gpu", "cpu"):
            raise InputError(f"--kind must be gpu or cpu, got {self.kind}")
        if self.graph_backend not in ("onnxruntime", "python"):
            raise InputError(f"--graph-backend must be onnxruntime or python, got {self.graph_backend}")
        if not isinstance(self.instances, int) or self.instances < 1:
            raise InputError(f"--instances must be a positive integer, got {self.instances}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"--max-batch must be a positive integer, got {self.max_batch}")
        if self.max_queue_delay_us < 0:
            raise InputError("--max-queue-delay-us must be >= 0")
        if not self.request_timeout_s > 0:
            raise InputError(f"--request-timeout-s must be positive, got {self.request_timeout_s}")


def graph_io(onnx_path: Path) -> dict[str, list[tuple[str, str, list[int]]]]:
    """Inputs and outputs of an ONNX graph: (name, Triton dtype, dims with -1 for dynamic axes)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def rows(values) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TO_TRITON:
                raise InputError(f"{onnx_path.name}: tensor {v.name} has ONNX type {t.elem_type}, not mapped to Triton")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, ONNX_TO_TRITON[t.elem_type], dims))
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": rows([i for i in model.graph.input if i.name not in inits]), "outputs": rows(model.graph.output)}


def _tensor_block(kind: str, name: str, dtype: str, dims: list[int]) -> str:
    # Triton drops the batch axis when max_batch_size > 0; a tensor that is only [batch] becomes dims [1]
    # reshaped to [] for the model
    body = dims[1:]
    reshape = "" if body else "\n    reshape: { shape: [ ] }"
    shown = body or [1]
    return (f"  {{\n    name: \"{name}\"\n    data_type: {dtype}\n    dims: [ {', '.join(map(str, shown))} ]"
            f"{reshape}\n  }}")


def graph_config(name: str, platform: str | None, backend: str | None, filename: str | None,
                 io: Mapping[str, list], max_batch: int, options: RepoOptions,
                 parameters: Mapping[str, str] | None = None, preferred: list[int] | None = None,
                 queue_timeout_us: int | None = None) -> str:
    lines = [f'name: "{name}"']
    if platform:
        lines.append(f'platform: "{platform}"')
    if backend:
        lines.append(f'backend: "{backend}"')
    lines.append(f"max_batch_size: {max_batch}")
    if filename:
        lines.append(f'default_model_filename: "{filename}"')
    lines.append("input [\n" + ",\n".join(_tensor_block("input", *t) for t in io["inputs"]) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_block("output", *t) for t in io["outputs"]) + "\n]")
    if max_batch > 1 or queue_timeout_us:
        pref = f"\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
        # a request that waits longer than this in Triton's queue is rejected (ModelQueuePolicy, REJECT)
        policy = (f"\n  default_queue_policy {{\n    timeout_action: REJECT\n    default_timeout_microseconds: "
                  f"{queue_timeout_us}\n  }}") if queue_timeout_us else ""
        lines.append(f"dynamic_batching {{{pref}\n  max_queue_delay_microseconds: {options.max_queue_delay_us}"
                     f"{policy}\n}}")
    kind = "KIND_GPU" if options.kind == "gpu" and backend != "python" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


def sampler_config(options: RepoOptions, parameters: Mapping[str, str], channels: int = 2) -> str:
    """`quadit_generate`: the API of scripts/serve.py (engines.serving.server), served by the BLS sampler.

    Its time limit (`request_timeout_s`) has two parts, since a Python-backend model never learns when Triton
    received a request: Triton's dynamic batcher rejects a request that waited longer than the limit in its
    queue (`default_queue_policy`, timeout counted from the moment the request is queued: `PolicyQueue` in
    Triton core's src/scheduler_utils.cc), and the sampler abandons a batch that runs longer than the limit
    (`engines.serving.triton_bls`). A request is so answered, with audio or an error, within about twice the
    limit of its arrival."""
    io = {"inputs": [("prompt", "TYPE_STRING", [-1, 1]), ("seconds", "TYPE_FP32", [-1, 1]),
                     ("steps", "TYPE_INT32", [-1, 1]), ("cfg_scale", "TYPE_FP32", [-1, 1]),
                     ("seed", "TYPE_INT64", [-1, 1])],
          "outputs": [("audio", "TYPE_FP32", [-1, channels, -1]), ("sample_rate", "TYPE_INT32", [-1, 1]),
                      ("batch_size", "TYPE_INT32", [-1, 1])]}
    # the sampler runs on the CPU; one instance per graph-model instance keeps that many batches in flight
    cpu = RepoOptions(kind="cpu", instances=options.instances, max_batch=options.max_batch,
                      max_queue_delay_us=options.max_queue_delay_us)
    return graph_config(SAMPLER, None, "python", None, io, options.max_batch, cpu, parameters,
                        queue_timeout_us=int(round(options.request_timeout_s * 1e6)))


def _engine_batch_limit(entry: Mapping[str, Any]) -> tuple[int, list[int]]:
    """(largest batch, every batch size) a TensorRT engine's profiles accept on axis 0."""
    sizes: set[int] = set()
    for profile in entry.get("profiles", []):
        lo, hi = min(s["min"][0] for s in profile.values()), min(s["max"][0] for s in profile.values())
        sizes.update(range(lo, hi + 1))
    return (max(sizes) if sizes else 1), sorted(sizes)


SHIM = '''"""Triton Python-backend entry point of quadit's {what} (written by scripts/triton_repo.py)."""
import os
import sys

sys.path.insert(0, os.environ.get("QUADIT_ROOT", {root!r}))
from engines.serving.{module} import TritonPythonModel  # noqa: E402,F401
'''


def write_repository(export_dir: Path, out: Path, options: RepoOptions, engines_dir: Path | None = None,
                     quadit_root: Path | None = None) -> dict[str, Any]:
    """Write the repository atomically; returns a summary (models, backends, batch limits)."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    unet = manifest.get("family") == "unet"
    root = Path(quadit_root or Path(__file__).resolve().parents[2])
    graphs = manifest["graphs"]
    engines = None
    if engines_dir is not None:
        from engines.runtime.tensorrt import ENGINES_JSON

        engines = json.loads((Path(engines_dir) / ENGINES_JSON).read_text())["engines"]
        if options.graph_backend != "onnxruntime":
            raise InputError("--engines goes with the onnxruntime/tensorrt repository, not --graph-backend python")
    summary: dict[str, Any] = {"models": {}, "export": str(export_dir.resolve())}
    dit_models: list[str] = []
    bucket_edges = graphs["dit"].get("bucket_edges") if not unet and graphs["dit"].get("buckets") else None
    batch_sizes: dict[str, list[int]] = {}  # graph -> the batch sizes of its TensorRT engine
    with atomic_dir(Path(out)) as tmp:
        units: list[tuple[str, str, dict[str, Any]]] = []  # (triton name, graph, {file(s) or engine entry})
        for graph in UNET_GRAPHS if unet else GRAPHS:
            entry = graphs[graph]
            if graph == "dit" and entry.get("buckets"):
                for k, b in enumerate(entry["buckets"]):
                    units.append((f"{PREFIX}dit_bucket{k}", graph, {"file": b["file"], "files": b.get("files", [b["file"]]),
                                                                   "engine_key": f"dit.bucket{k}"}))
            else:
                units.append((f"{PREFIX}{graph}", graph, {"file": entry["file"], "files": entry.get("files", [entry["file"]]),
                                                         "engine_key": graph}))
        io_types: dict[str, dict[str, str]] = {}
        io_shapes: dict[str, dict[str, list[str]]] = {}
        for name, graph, src in units:
            io = graph_io(export_dir / src["file"])
            version = tmp / name / "1"
            version.mkdir(parents=True)
            engine = engines.get(src["engine_key"]) if engines and graph != "conditioners" else None
            if engine is not None:
                shutil.copy2(Path(engines_dir) / engine["engine"], version / engine["engine"])
                limit, sizes = _engine_batch_limit(engine)
                text = graph_config(name, "tensorrt_plan", None, engine["engine"], io, limit, options,
                                    preferred=[max(sizes)] if limit > 1 else None)
                backend = "tensorrt_plan"
                batch_sizes[graph] = sizes
            else:
                for f in src["files"]:
                    shutil.copy2(export_dir / f, version / Path(f).name)
                limit = 2 * options.max_batch if graph in ("dit", "unet") else options.max_batch  # CFG rows
                if options.graph_backend == "python":
                    (version / "model.py").write_text(SHIM.format(what="ONNX Runtime graph model", root=str(root),
                                                                  module="triton_ort_model"))
                    text = graph_config(name, None, "python", None, io, limit, options,
                                        {"onnx_file": Path(src["file"]).name})
                    backend = "python (onnxruntime inside)"
                else:
                    text = graph_config(name, None, "onnxruntime", Path(src["file"]).name, io, limit, options)
                    backend = "onnxruntime"
            (tmp / name / "config.pbtxt").write_text(text)
            io_types[name] = {n: TRITON_TO_NUMPY[d] for n, d, _ in io["inputs"] + io["outputs"]}
            io_shapes[name] = {"column_inputs": [n for n, _, dims in io["inputs"] if len(dims) == 1],
                               "outputs": [n for n, _, _ in io["outputs"]]}
            summary["models"][name] = {"backend": backend, "max_batch_size": limit}
            if graph == "dit":
                dit_models.append(name)
        version = tmp / SAMPLER / "1"
        version.mkdir(parents=True)
        shutil.copytree(export_dir / "tokenizer", version / "tokenizer")
        if unet:
            _write_unet_sampler(tmp, manifest, options, root, io_types, io_shapes, batch_sizes.get("unet"))
            summary["models"][SAMPLER] = {"backend": "python (BLS sampler, UNet family)",
                                          "max_batch_size": options.max_batch}
            summary["validation"] = validate_repository(tmp)
            return summary
        cfg = manifest["model_config"]
        settings = {"manifest": {"dims": manifest["dims"], "conditioning": manifest["conditioning"],
                                 "sampler_defaults": manifest["sampler_defaults"],
                                 "model_config": {"sample_size": cfg["sample_size"], "sample_rate": cfg["sample_rate"]},
                                 "model": manifest.get("model")},
                    "models": {"text_encoder": f"{PREFIX}text_encoder", "conditioners": f"{PREFIX}conditioners",
                               "dit": dit_models, "vae_decoder": f"{PREFIX}vae_decoder"},
                    "bucket_edges": bucket_edges, "dit_batch_sizes": batch_sizes.get("dit"),
                    "vae_batch": summary["models"][f"{PREFIX}vae_decoder"]["max_batch_size"],
                    "io_types": io_types, "io": io_shapes, "max_batch": options.max_batch,
                    "request_timeout_s": options.request_timeout_s}
        (version / "quadit.json").write_text(json.dumps(settings, indent=2) + "\n")
        (version / "model.py").write_text(SHIM.format(what="BLS sampler", root=str(root), module="triton_bls"))
        (tmp / SAMPLER / "config.pbtxt").write_text(sampler_config(options, {}))
        summary["models"][SAMPLER] = {"backend": "python (BLS sampler)", "max_batch_size": options.max_batch}
        summary["validation"] = validate_repository(tmp)
    return summary


def _write_unet_sampler(repo: Path, manifest: Mapping[str, Any], options: RepoOptions, root: Path,
                        io_types: Mapping[str, Any], io_shapes: Mapping[str, Any], unet_sizes: list[int] | None) -> None:
    """`quadit_generate` of a UNet-family export: `engines.serving.triton_bls_unet` over the four graph models,
    mono audio. A TensorRT UNet engine's largest profile batch caps the rows of one UNet call."""
    settings = {"family": "unet",
                "manifest": {k: manifest[k] for k in ("dims", "conditioning", "sampler_defaults", "scheduler_config",
                                                      "unet_family", "model", "family")},
                "models": {g: f"{PREFIX}{g}" for g in UNET_GRAPHS}, "unet_max_rows": max(unet_sizes) if unet_sizes else None,
                "io_types": io_types, "io": io_shapes, "max_batch": options.max_batch,
                "request_timeout_s": options.request_timeout_s}
    version = repo / SAMPLER / "1"
    (version / "quadit.json").write_text(json.dumps(settings, indent=2) + "\n")
    (version / "model.py").write_text(SHIM.format(what="BLS sampler (UNet family)", root=str(root),
                                                  module="triton_bls_unet"))
    (repo / SAMPLER / "config.pbtxt").write_text(sampler_config(options, {}, channels=1))


def validate_repository(repo: Path) -> dict[str, str]:
    """Parse every config.pbtxt with Triton's own model-config protobuf; name and directory must agree,
    the default model file must exist. Returns {model: 'ok'}; raises InputError on the first bad one."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    results = {}
    configs = sorted(Path(repo).glob("*/config.pbtxt"))
    if not configs:
        raise InputError(f"{repo}: no */config.pbtxt")
    for path in configs:
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as exc:
            raise InputError(f"{path}: not a valid Triton model config: {exc}") from None
        if config.name != path.parent.name:
            raise InputError(f"{path}: name '{config.name}' differs from its directory")
        if config.default_model_filename and not (path.parent / "1" / config.default_model_filename).is_file():
            raise InputError(f"{path}: model file 1/{config.default_model_filename} is missing")
        if config.backend == "python" and not (path.parent / "1" / "model.py").is_file():
            raise InputError(f"{path}: Python-backend model without 1/model.py")
        if not config.input or not config.output:
            raise InputError(f"{path}: no inputs or outputs")
        results[config.name] = "ok"
    return results


# -- the tritonserver of the PyTriton wheel, run on a repository --------------------------------------
def bundled_server(repo: Path, workdir: Path, http_port: int, grpc_port: int, metrics_port: int,
                   host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """argv and environment to run the PyTriton wheel's `tritonserver` on `repo` (loopback by default).

    The wheel keeps the Python-backend stubs apart from the backend; as PyTriton does, the stub of this
    Python version is copied next to the backend (under `workdir`), and this interpreter's libpython goes
    first on LD_LIBRARY_PATH (engines.serving.server.prepare_python_backend_env)."""
    import os
    import sys

    from pytriton.utils.distribution import get_libs_path, get_root_module_path

    from engines.serving.server import prepare_python_backend_env

    dist = get_root_module_path() / "tritonserver"
    backends = Path(workdir) / "backends"
    if not backends.exists():
        shutil.copytree(dist / "backends", backends)
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        shutil.copy2(dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                     backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    prepare_python_backend_env(env)
    env["LD_LIBRARY_PATH"] = f"{env.get('LD_LIBRARY_PATH', '')}:{get_libs_path()}".strip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    argv = [str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repo).resolve()}",
            f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}", f"--metrics-address={host}",
            f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false", "--exit-timeout-secs=10", "--exit-on-error=false",
            "--log-verbose=0"]
    return argv, env


def try_load(repo: Path, workdir: Path, ports: tuple[int, int, int], timeout_s: float = 300.0
             ) -> dict[str, Any]:
    """Start the bundled server on `repo`, wait until every model loaded or failed, then stop it.
    Returns {model: {state, reason}} from Triton's repository index and the server's log tail."""
    import subprocess
    import time

    import tritonclient.http as httpclient

    argv, env = bundled_server(repo, workdir, *ports)
    log_path = Path(workdir) / "tritonserver.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    index: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s and proc.poll() is None:
            try:
                if client.is_server_live():
                    index = client.get_model_repository_index()
                    if index and all(m.get("state") in ("READY", "UNAVAILABLE") for m in index):
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1.0)
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    return {"models": {m["name"]: {"state": m.get("state"), "reason": m.get("reason", "")} for m in index},
            "server_exit": proc.returncode, "log_tail": text[-4000:]}
