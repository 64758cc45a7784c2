"""TensorRT engines for an export directory: build them with Polygraphy, check them, run them.

Why (TensorRT 10.x limits): always strongly typed, since TRT 10.12 deprecated (TRT 11 removed) the INT8/FP16
builder flags: the graph's own types decide precision. An export made with `--target tensorrt` carries FP16
text encoder and VAE graphs (with transformers' FP32 island in T5's feed-forward), so their engines are FP16;
an `onnxruntime`-target export's are FP32 and build as FP32 engines.
One optimisation profile per CFG batch size (2: cond+uncond, 1: cfg_scale 1), the latent
length the only dynamic dimension: a batch range would tune kernels for one batch only (a UNet export takes one
profile over batch 1..2 tuned for 2: engines/runtime/unet_tensorrt.py). An engine runs only on
the TensorRT version and GPU (compute capability) it was built on and is right only for its source ONNX:
`engines.json` records all three and loading refuses a mismatch. The number conditioners stay on ONNX Runtime:
a few hundred FLOPs once per generation, where an engine adds a build and a device round trip for nothing.
`tensorrt` and Polygraphy's TensorRT backend are imported inside functions, so planning a build (profiles,
the equivalent `polygraphy convert` command, metadata checks) works without TensorRT.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from engines.runtime.backends import OrtDiT
from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_dir, read_manifest

log = logging.getLogger(__name__)

ENGINES_JSON = "engines.json"
ENGINES_SCHEMA = 1
SETTINGS_VERSION = 1
ENGINE_GRAPHS = ("text_encoder", "vae_decoder")  # built besides the DiT; conditioners stay on ONNX Runtime
# ONNX ops the onnx-tensorrt parser cannot read (besides QLinear* and com.microsoft contrib ops).
TRT_UNPARSABLE = {"DynamicQuantizeLinear", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "ConvInteger"}
Shape = tuple[int, ...]
ProfileSpec = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


@dataclass(frozen=True)
class BuildSettings:
    """How to build: a latent-length range from seconds, CFG batch profiles, builder effort, timing cache.

    `opt_seconds` None means `max_seconds`; `max_seconds` None means the model's window (`sample_size`). A UNet
    export (engines/runtime/unet_tensorrt.py): `opt_seconds` None means the model's `default_seconds`, `max_seconds`
    None its `max_seconds`, and `batch_sizes` make one profile over min..max batch, tuned for the largest.
    TensorRT tunes kernels for the opt shape and refuses shapes outside [min, max] at run time.
    `tf32`: the layers a strongly typed graph keeps in FP32 (the timestep MLP, LayerNorm islands) may use
    TF32 tensor cores. TensorRT's own default is on, but Polygraphy's `CreateConfig` defaults `tf32=False`
    and clears the flag (polygraphy/backend/trt/config.py), so it is passed explicitly (`--tf32` on the CLI).
    """

    min_seconds: float = 1.0
    opt_seconds: float | None = None
    max_seconds: float | None = None
    batch_sizes: tuple[int, ...] = (2, 1)
    opt_level: int = 3
    timing_cache: str | None = None
    tf32: bool = True

    def __post_init__(self) -> None:
        given = [s for s in (self.min_seconds, self.opt_seconds, self.max_seconds) if s is not None]
        if any(not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0 for s in given):
            raise InputError(f"--min/--opt/--max-seconds must be positive numbers, got {given}")
        if given != sorted(given):
            raise InputError(f"seconds must satisfy min <= opt <= max, got {given}")
        if not self.batch_sizes or len(set(self.batch_sizes)) < len(self.batch_sizes) or min(self.batch_sizes) < 1:
            raise InputError(f"batch sizes must be distinct positive integers, got {self.batch_sizes}")
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise InputError(f"--opt-level must be an integer from 0 to 5 (TensorRT's levels), got {self.opt_level}")

    def to_json(self) -> dict[str, Any]:  # strongly typed is not a choice (see the module docstring)
        return {"version": SETTINGS_VERSION, **asdict(self), "batch_sizes": list(self.batch_sizes),
                "strongly_typed": True}


def latent_lengths(manifest: Mapping[str, Any], settings: BuildSettings) -> tuple[int, int, int]:
    """(min, opt, max) latent length: ceil(seconds * sample_rate / downsampling_ratio), as the runtime's."""
    dims = manifest["dims"]
    window = float(manifest["model_config"]["sample_size"]) / float(dims["sample_rate"])
    top = settings.max_seconds if settings.max_seconds is not None else window
    opt = settings.opt_seconds if settings.opt_seconds is not None else top
    for flag, seconds in (("max", top), ("opt", opt), ("min", settings.min_seconds)):
        if seconds > window + 1e-6 or seconds > top:
            raise InputError(f"--{flag}-seconds {seconds} is longer than the maximum ({top:.2f} s) or this model's "
                             f"window ({window:.2f} s)")

    def length(seconds: float) -> int:
        return max(1, math.ceil(seconds * dims["sample_rate"] / dims["downsampling_ratio"]))

    return length(settings.min_seconds), length(opt), length(top)


def graph_profiles(manifest: Mapping[str, Any], graph: str, settings: BuildSettings) -> list[ProfileSpec]:
    """Optimisation profiles of one graph ('dit', 'text_encoder' or 'vae_decoder'; a UNet export's graphs:
    `engines.runtime.unet_tensorrt.unet_graph_profiles`)."""
    from engines.runtime.unet_tensorrt import is_unet, unet_graph_profiles

    if is_unet(manifest):
        return unet_graph_profiles(manifest, graph, settings)
    dims, lo_hi = manifest["dims"], latent_lengths(manifest, settings)
    c = dims["io_channels"]
    if graph == "dit":
        return [{"x": tuple((b, c, n) for n in lo_hi), "t": ((b,),) * 3,
                 "cross_attn_cond": ((b, dims["cond_tokens"], dims["cond_dim"]),) * 3,
                 "global_embed": ((b, dims["global_dim"]),) * 3} for b in settings.batch_sizes]
    if graph == "text_encoder":
        seq = manifest["conditioning"]["text_max_length"]
        span = ((1, seq), (1, seq), (max(settings.batch_sizes), seq))
        return [{"input_ids": span, "attention_mask": span}]
    if graph == "vae_decoder":  # the runtime decodes one latent at a time: VAE activations are the largest
        return [{"latents": tuple((1, c, n) for n in lo_hi)}]
    raise InputError(f"no TensorRT profile for graph '{graph}'")


@dataclass(frozen=True)
class BuildItem:
    name: str  # engine key in engines.json: 'dit', 'dit.bucket0', 'text_encoder', 'vae_decoder'
    graph: str
    onnx: str
    bucket: dict[str, Any] | None = None

    @property
    def engine(self) -> str:
        return Path(self.onnx).stem + ".engine"


def build_plan(export_dir: Path, manifest: Mapping[str, Any]) -> list[BuildItem]:
    """One engine per DiT graph (per timestep bucket when the export has bucket graphs), text encoder, VAE; a
    UNet export: one per graph (`engines.runtime.unet_tensorrt.unet_build_plan`)."""
    from engines.runtime.unet_tensorrt import is_unet, unet_build_plan

    if is_unet(manifest):
        return unet_build_plan(export_dir, manifest)
    graphs = manifest["graphs"]
    missing = [g for g in ("dit", *ENGINE_GRAPHS) if g not in graphs]
    if missing:
        raise InputError(f"export {export_dir} has no {', '.join(missing)} graph")
    dit, names = graphs["dit"], ["x", "t", "cross_attn_cond", "global_embed"]
    if list(dit.get("inputs", names)) != names:
        raise InputError(f"DiT graph inputs {dit.get('inputs')} are not x, t, cross_attn_cond, global_embed")
    if dit.get("buckets"):
        k, edges = len(dit["buckets"]), dit.get("bucket_edges") or []
        if len(edges) != k + 1 or sorted(b["index"] for b in dit["buckets"]) != list(range(k)):
            raise InputError(f"export {export_dir}: {k} DiT bucket graphs need indices 0..{k - 1} and {k + 1} "
                             f"bucket_edges, got {len(edges)}")
        items = [BuildItem(f"dit.bucket{b['index']}", "dit", b["file"], dict(b)) for b in dit["buckets"]]
    else:
        items = [BuildItem("dit", "dit", dit["file"])]
    items += [BuildItem(g, g, graphs[g]["file"]) for g in ENGINE_GRAPHS]
    for item in items:
        if not (Path(export_dir) / item.onnx).is_file():
            raise InputError(f"export {export_dir} is incomplete: {item.onnx} is missing")
    return items


def check_parsable(export_dir: Path, items: Sequence[BuildItem]) -> None:
    """Refuse graphs with ops the TensorRT ONNX parser cannot read (dynamic-quant and ORT contrib ops)."""
    for item in items:
        _refuse_unparsable(_load_for_checks(Path(export_dir) / item.onnx), item)


def check_graphs(export_dir: Path, items: Sequence[BuildItem], manifest: Mapping[str, Any],
                 settings: BuildSettings) -> None:
    """Everything about the graphs that can fail a build, refused (one line) before any engine is built: ops the
    parser cannot read, TensorRT's Q/DQ rules (`exporter.tensorrt.checker`, ARCHITECTURE.md section 3), and each
    optimisation profile against its graph's inputs (every dynamic input named, ranks and static dims as the graph
    has them: TensorRT refuses a profile that contradicts the network)."""
    from exporter.tensorrt.checker import check_graph

    for item in items:
        model = _load_for_checks(Path(export_dir) / item.onnx)
        _refuse_unparsable(model, item)
        if problems := check_graph(model):
            raise InputError(f"{item.onnx} breaks {len(problems)} TensorRT rule(s), first: {problems[0]}")
        _check_profiles_fit(model, item, graph_profiles(manifest, item.graph, settings))


def _load_for_checks(path: Path) -> Any:
    """The graph without its weights, except the Q/DQ scales and zero points (the checker reads their values)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    qdq_inputs = {i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    for tensor in model.graph.initializer:
        if tensor.name in qdq_inputs and uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(path.parent))
    return model


def _refuse_unparsable(model: Any, item: BuildItem) -> None:
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    bad = sorted({n.op_type for n in nodes if n.op_type in TRT_UNPARSABLE or n.op_type.startswith("QLinear")
                  or n.domain == "com.microsoft"})
    if bad:
        raise InputError(f"{item.onnx} uses {', '.join(bad)}, which TensorRT cannot run: "
                         "export with --target tensorrt (fp16/fp32, static w8a8 or w4a16)")


def _check_profiles_fit(model: Any, item: BuildItem, profiles: Sequence[ProfileSpec]) -> None:
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in model.graph.input if v.name not in initializers}
    for profile in profiles:
        if missing := sorted(n for n, dims in inputs.items() if n not in profile and None in dims):
            raise InputError(f"{item.onnx}: no profile shape for dynamic input(s) {', '.join(missing)}")
        for name, shapes in profile.items():
            if name not in inputs:
                raise InputError(f"{item.onnx} has no input '{name}' (inputs: {', '.join(inputs)})")
            dims = inputs[name]
            for shape in shapes:
                if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                    raise InputError(f"{item.onnx}: profile shape {list(shape)} for '{name}' does not fit the "
                                     f"graph's {['?' if d is None else d for d in dims]}")


def polygraphy_convert_command(export_dir: Path, graph_file: str, engine_path: Path, settings: BuildSettings,
                               manifest: Mapping[str, Any] | None = None) -> str:
    """The `polygraphy convert` command line that builds the same engine as `build_engines` (profiles
    repeated once per profile, strongly typed, builder level, timing cache), for a machine with TensorRT."""
    manifest = manifest if manifest is not None else read_manifest(Path(export_dir))
    items = {i.onnx: i for i in build_plan(Path(export_dir), manifest)}
    if graph_file not in items:
        raise InputError(f"{graph_file} is not a graph built into an engine (choose from: {', '.join(items)})")
    args = ["polygraphy", "convert", str(Path(export_dir) / graph_file), "--convert-to", "trt"]
    for profile in graph_profiles(manifest, items[graph_file].graph, settings):
        for flag, k in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args += [flag] + [f"{name}:[{','.join(map(str, shapes[k]))}]" for name, shapes in profile.items()]
    args += ["--strongly-typed", "--builder-optimization-level", str(settings.opt_level)]
    if settings.tf32:
        args += ["--tf32"]
    if settings.timing_cache:
        args += ["--load-timing-cache", settings.timing_cache, "--save-timing-cache", settings.timing_cache]
    args += ["-o", str(engine_path)]
    return shlex.join(args)


@dataclass(frozen=True)
class MachineFacts:
    """What an engine is tied to: TensorRT version and GPU (name, compute capability 'major.minor')."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def check_timing_cache(path: str | None) -> None:
    """Refuse, before any engine is built, a timing cache TensorRT could not write after the first build: the
    path is a directory, or its directory neither exists nor can be created (nearest existing ancestor is
    not a writable directory). The directory itself is created by `build_engines`."""
    if not path:
        return
    target = Path(path).absolute()
    if target.is_dir():
        raise InputError(f"--timing-cache {path} is a directory; give a file path")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"--timing-cache {path}: cannot create or write {target.parent} ({ancestor} is not a "
                         "writable directory)")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"--timing-cache {path} is not writable")


def tensorrt_unavailable() -> str | None:
    """Why engines cannot be built or run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # stub wheels raise at import time, not only ImportError
        return f"TensorRT is not installed ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (TensorRT engines are built and run on the GPU)"
    return None


def current_machine() -> MachineFacts:
    """Facts of the current CUDA device (`torch.cuda.current_device()`, the one every engine here is built and
    run on: set it with CUDA_VISIBLE_DEVICES or torch.cuda.set_device)."""
    import tensorrt as trt

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return MachineFacts(trt.__version__, torch.cuda.get_device_name(index), f"{major}.{minor}")


def build_engines(export_dir: Path, out_dir: Path, settings: BuildSettings) -> dict[str, Any]:
    """Build every engine of an export into `out_dir` (atomically) and write `engines.json`."""
    from polygraphy import util as pg_util
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    from calibration.artifact import sha256_file

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    items = build_plan(export_dir, manifest)
    check_graphs(export_dir, items, manifest, settings)
    check_timing_cache(settings.timing_cache)
    if reason := tensorrt_unavailable():
        raise InputError(reason)
    unet = manifest.get("family") == "unet"
    if unet:  # the UNet family's TensorRT target converts only the UNet to FP16
        fp32 = [i.graph for i in items if manifest["graphs"][i.graph].get("precision") == "fp32"]
        if fp32:
            log.info("%s: FP32 graphs build FP32 (TF32) engines", ", ".join(fp32))
    elif fp32 := [g for g in ENGINE_GRAPHS if manifest["graphs"][g].get("precision") == "fp32"]:
        log.warning("%s: FP32 graphs (an onnxruntime-target export) build FP32 engines; export with --target "
                    "tensorrt for FP16 ones", ", ".join(fp32))
    machine = current_machine()
    cache = str(Path(settings.timing_cache).absolute()) if settings.timing_cache else None
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    facts = {"tensorrt_version": machine.tensorrt_version,
             "gpu": {"name": machine.gpu_name, "compute_capability": machine.compute_capability}}
    engines: dict[str, Any] = {}
    with atomic_dir(Path(out_dir)) as tmp:
        for item in items:
            profiles = graph_profiles(manifest, item.graph, settings)
            trt_profiles = [Profile() for _ in profiles]
            for profile, spec in zip(trt_profiles, profiles):
                for name, (lo, opt, hi) in spec.items():
                    profile.add(name, min=lo, opt=opt, max=hi)
            config = CreateConfig(profiles=trt_profiles, builder_optimization_level=settings.opt_level,
                                  load_timing_cache=cache, tf32=settings.tf32)
            network = NetworkFromOnnxPath(str(export_dir / item.onnx), strongly_typed=True)
            log.info("building %s from %s (%d profile(s), level %d)", item.engine, item.onnx, len(profiles),
                     settings.opt_level)
            t0 = time.perf_counter()
            try:
                data = EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
            except PolygraphyException as exc:
                first = (str(exc).strip().splitlines() or ["see the log above"])[0]
                raise InputError(f"TensorRT could not build {item.onnx}: {first}") from None
            pg_util.save_file(data, str(tmp / item.engine), description=f"{item.name} engine")
            engines[item.name] = {
                "graph": item.graph, "onnx": item.onnx, "engine": item.engine, "bucket": item.bucket, **facts,
                "source_sha256": {f: sha256_file(export_dir / f) for f in (item.onnx, f"{item.onnx}.data")
                                  if (export_dir / f).is_file()},  # + external data
                "precision": manifest["graphs"][item.graph].get("precision"),
                "profiles": [{n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in p.items()}
                             for p in profiles],
                "settings": settings.to_json(), "build_seconds": round(time.perf_counter() - t0, 1),
                "engine_bytes": (tmp / item.engine).stat().st_size,
                "polygraphy_command": polygraphy_convert_command(export_dir, item.onnx, Path(out_dir) / item.engine,
                                                                 settings, manifest)}
        doc = {"schema_version": ENGINES_SCHEMA, "kind": "quadit-engines", "family": "unet" if unet else "dit",
               "model": manifest.get("model"), "scheme": manifest.get("scheme"), **facts,
               "settings": settings.to_json(), "engines": engines}
        if not unet:  # the DiT's bucket engines and its number conditioners (ONNX Runtime)
            doc["bucket_edges"] = manifest["graphs"]["dit"].get("bucket_edges")
            doc["conditioners"] = {"backend": "onnxruntime", "onnx": manifest["graphs"]["conditioners"]["file"]}
        (tmp / ENGINES_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def check_engine_metadata(engines_json: Path, export_dir: Path, machine: MachineFacts | None = None
                          ) -> dict[str, Any]:
    """engines.json, refused (one line) when an engine was built for another TensorRT, another GPU, or
    another version of a source graph than this export's. `machine` defaults to this machine's facts."""
    from calibration.artifact import ArtifactError, read_versioned_json, sha256_file

    engines_json, export_dir = Path(engines_json), Path(export_dir)
    try:
        doc = read_versioned_json(engines_json, ENGINES_SCHEMA, "a quadit engines directory")
    except ArtifactError as exc:
        raise InputError(str(exc)) from None
    machine = machine if machine is not None else current_machine()
    rebuild = "rebuild with scripts/build_engines.py"
    for entry in doc.get("engines", {}).values():
        engine = entry["engine"]
        if not (engines_json.parent / engine).is_file():
            raise InputError(f"engine {engine} listed in {engines_json} is missing")
        if entry["tensorrt_version"] != machine.tensorrt_version:
            raise InputError(f"engine {engine} was built with TensorRT {entry['tensorrt_version']}, this machine "
                             f"has {machine.tensorrt_version}: {rebuild}")
        gpu = entry["gpu"]
        # An engine runs on GPUs of the compute capability it was built for (TensorRT developer guide,
        # "Hardware Compatibility": without a hardware-compatibility level an engine is tied to its SM); another
        # board of the same SM (H100 PCIe vs SXM) runs it, with kernels tuned for the other one.
        if gpu["compute_capability"] != machine.compute_capability:
            raise InputError(f"engine {engine} was built on {gpu['name']} (sm {gpu['compute_capability']}), this "
                             f"machine has {machine.gpu_name} (sm {machine.compute_capability}): {rebuild}")
        if gpu["name"] != machine.gpu_name:
            log.warning("engine %s was built on %s and runs on %s (same sm %s): it works, but its kernels were "
                        "timed on the other GPU; rebuild for best speed", engine, gpu["name"], machine.gpu_name,
                        machine.compute_capability)
        for source, digest in entry["source_sha256"].items():
            path = export_dir / source
            if not path.is_file() or sha256_file(path) != digest:
                raise InputError(f"engine {engine} was built from another {source} than the one in {export_dir} "
                                 f"(sha256 differs): {rebuild}")
    return doc


_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class EngineRunner:
    """One engine on a torch CUDA stream: `runner({input: tensor}) -> {output: tensor}`.

    TensorRT binds shapes and addresses to an execution context: one context per optimisation profile (made
    on first use, its profile set on the stream it runs on), one set of device buffers per input shape,
    re-bound only when the shape changes. Outputs are copies (buffers are reused) on the first input's device.
    `cuda_graph`: each shape's enqueue is captured once, after an eager run that applies TensorRT's deferred
    shape-dependent updates outside capture, then replayed.
    """

    def __init__(self, engine: Any, name: str = "engine", cuda_graph: bool = False) -> None:
        import tensorrt as trt

        self.engine, self.name, self.cuda_graph = engine, name, cuda_graph
        # a context's activation memory sized for its own profile, not the largest (the default, STATIC)
        self._strategy = trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _DTYPES[str(engine.get_tensor_dtype(n)).rsplit(".", 1)[-1]] for n in names}
        self.profiles = [{n: [tuple(d) for d in engine.get_tensor_profile_shape(n, p)] for n in self.inputs}
                         for p in range(engine.num_optimization_profiles)]
        # per profile: context, bound key; per key (profile, input shapes): buffers, captured graph
        self._contexts: dict[int, Any] = {}
        self._bound: dict[int, tuple] = {}
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def profile_for(self, shapes: Mapping[str, Shape]) -> int:
        for index, profile in enumerate(self.profiles):
            if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
                   for n, (lo, _, hi) in profile.items()):
                return index
        raise InputError(f"{self.name}: input shapes {dict(shapes)} are outside the engine's profiles "
                         f"{self.profiles}: rebuild the engines with a wider --min/--max-seconds")

    def _bind(self, key: tuple, shapes: Mapping[str, Shape]) -> dict[str, torch.Tensor]:
        if key[0] not in self._contexts:
            self._contexts[key[0]] = self.engine.create_execution_context(self._strategy)
            if not self._contexts[key[0]].set_optimization_profile_async(key[0], self.stream.cuda_stream):
                raise RuntimeError(f"{self.name}: cannot select optimisation profile {key[0]}")
        context = self._contexts[key[0]]
        for n in self.inputs:
            if not context.set_input_shape(n, shapes[n]):
                raise RuntimeError(f"{self.name}: TensorRT refused shape {shapes[n]} for {n}")
        if key not in self._buffers:
            out_shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.outputs}
            self._buffers[key] = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device)
                                  for n, s in {**shapes, **out_shapes}.items()}
        for n, buffer in self._buffers[key].items():
            context.set_tensor_address(n, buffer.data_ptr())
        # graphs captured on this context hold its old binding (and TensorRT redoes shape setup on next enqueue)
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] != key[0]}
        self._bound[key[0]] = key
        return self._buffers[key]

    def _execute(self, key: tuple) -> None:
        context, handle = self._contexts[key[0]], self.stream.cuda_stream
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if not context.execute_async_v3(handle):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see the TensorRT log)")
        if self.cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                context.execute_async_v3(handle)
            self._graphs[key] = graph

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if missing := set(self.inputs) - set(feeds):
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        profile = self.profile_for(shapes)
        key = (profile, tuple(shapes[n] for n in self.inputs))
        buffers = self._buffers[key] if self._bound.get(profile) == key else self._bind(key, shapes)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for n in self.inputs:
                if feeds[n].is_cuda:
                    feeds[n].record_stream(self.stream)
                buffers[n].copy_(feeds[n], non_blocking=True)
            self._execute(key)
        caller.wait_stream(self.stream)
        out_device = feeds[self.inputs[0]].device
        return {n: buffers[n].clone() if out_device == self.device else buffers[n].to(out_device)
                for n in self.outputs}


def load_engine(path: Path) -> Any:
    from polygraphy.backend.common import bytes_from_path
    from polygraphy.backend.trt import engine_from_bytes

    return engine_from_bytes(bytes_from_path(str(path)))


class TrtDiT(OrtDiT):
    """DiT engines, callable like `DiTWrapper.forward`; the CFG batching is `OrtDiT`'s own (inherited).

    `runners` are callables {x, t, cross_attn_cond, global_embed} -> {v}: one engine, or one per timestep
    bucket (bucket k holds edges[k] >= t > edges[k+1]) chosen from t: TensorRT needs constant Q/DQ scales,
    so per-bucket scales live in per-bucket engines.
    """

    def __init__(self, runners: Sequence[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]],
                 buckets: Any = None) -> None:
        super().__init__(session=None)
        if len(runners) > 1 and (buckets is None or buckets.count != len(runners)):
            raise ValueError(f"{len(runners)} DiT engines need bucket edges for as many buckets")
        self.runners, self.buckets = list(runners), buckets

    def runner_for(self, t: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if len(self.runners) == 1:
            return self.runners[0]
        chosen = {self.buckets.bucket_of(float(v)) for v in t.flatten().tolist()}
        if len(chosen) != 1:
            raise ValueError(f"timesteps {t.tolist()} fall in different buckets {sorted(chosen)}")
        return self.runners[chosen.pop()]

    def run(self, x: torch.Tensor, t: torch.Tensor, cross: torch.Tensor, global_embed: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        feeds = {"x": x.float(), "t": t.float(), "cross_attn_cond": cross.float(), "global_embed": global_embed.float()}
        return self.runner_for(t)(feeds)["v"].float()


class TrtBackend:
    """Text encoder, DiT and VAE decoder from engines; number conditioners on ONNX Runtime. `device` is where
    the sampler runs: 'cpu' (default) draws the same noise per seed as the ONNX Runtime and PyTorch-CPU
    backends (about 1 MB crosses PCIe per step); 'cuda' keeps it on the GPU."""

    name = "tensorrt"

    def __init__(self, engines_dir: Path, export_dir: Path, manifest: dict[str, Any], device: str = "cpu",
                 cuda_graph: bool = False) -> None:
        from transformers import AutoTokenizer

        from calibration.collector import BucketSpec
        from exporter.onnx.torch_export import ort_session

        if reason := tensorrt_unavailable():
            raise InputError(reason)
        engines_dir, export_dir = Path(engines_dir), Path(export_dir)
        self.meta = check_engine_metadata(engines_dir / ENGINES_JSON, export_dir)
        self.manifest, self.layout, self.device = manifest, manifest["conditioning"], device
        entries = self.meta["engines"]

        def runner(name: str) -> EngineRunner:
            return EngineRunner(load_engine(engines_dir / entries[name]["engine"]), name, cuda_graph)

        dit_names = sorted((n for n, e in entries.items() if e["graph"] == "dit"),
                           key=lambda n: (entries[n]["bucket"] or {}).get("index", 0))
        edges = self.meta.get("bucket_edges")
        self.dit = TrtDiT([runner(n) for n in dit_names], BucketSpec(tuple(edges)) if len(dit_names) > 1 else None)
        self.text_encoder, self.vae = runner("text_encoder"), runner("vae_decoder")
        self.conditioners = ort_session(export_dir / manifest["graphs"]["conditioners"]["file"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(export_dir / "tokenizer"), local_files_only=True)
        log.info("TensorRT backend: %d DiT engine(s), %s", len(dit_names), self.meta["gpu"]["name"])

    def conditioning(self, metadata: list[dict[str, Any]]) -> dict[str, Any]:
        text_id = self.layout["text_id"]
        encoded = self.tokenizer([m[text_id] for m in metadata], truncation=True,
                                 max_length=self.layout["text_max_length"], padding="max_length", return_tensors="np")
        ids, mask = (torch.from_numpy(encoded[k].astype(np.int64)) for k in ("input_ids", "attention_mask"))
        hidden = self.text_encoder({"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)})
        out: dict[str, Any] = {text_id: [hidden["last_hidden_state"].float(), mask.bool().to(self.device)]}
        number_ids = self.layout["number_ids"]
        feeds = {i: np.asarray([float(m[i]) for m in metadata], dtype=np.float32) for i in number_ids}
        embeds = self.conditioners.run([f"{i}_embed" for i in number_ids], feeds)
        for i, embed in zip(number_ids, embeds):
            out[i] = [torch.from_numpy(embed).to(self.device), torch.ones(len(metadata), 1, device=self.device)]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vae({"latents": item[None].float()})["audio"].float() for item in latents])
