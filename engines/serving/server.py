"""`quadit_generate` on Triton Inference Server (through PyTriton): request parsing and validation, the
model binding, the Python-backend environment fix, and a serve loop that drains on SIGTERM.

The API (KServe v2, HTTP and gRPC; Triton adds the batch dimension to every input and output):

    inputs   prompt BYTES [1], seconds FP32 [1], steps INT32 [1], cfg_scale FP32 [1], seed INT64 [1]
    outputs  audio FP32 [2, samples], sample_rate INT32 [1], batch_size INT32 [1]

`batch_size` tells how many generations were stepped together with this one (1 when it ran alone).
A request may carry several rows (a client-side batch); they become separate generations, and must
share `seconds` so that their audio stacks into one output tensor.

The model has `max_inflight + SPARE_INSTANCES` Triton instances, each a thin callable that queues its
request's rows in `engines.serving.scheduler.GenerateScheduler` and waits; the scheduler steps queued
generations together. At most `max_inflight` requests (default 2 * max_batch: one batch running, the next one
gathering) are admitted at once; a request that arrives beyond them gets a "server busy" error at once from
a spare instance instead of waiting.

Why the spare instances: Triton hands a request to an instance only when one is free and otherwise holds it
in its own queue, where no backend can see how long it waited (the Python backend gets no arrival time). With
every instance busy, the request time limit would start only when an instance took the request, so under a
burst of more than 2 * max_batch requests a client could wait far past `--request-timeout-s` and still get no
error. With spares that only refuse (in about a millisecond), Triton's queue stays empty, the moment an
instance takes a request is its arrival, and the time limit counts from there.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.runtime.pipeline import GenerateOptions, Pipeline
from engines.serving.scheduler import GenerateScheduler, SchedulerConfig, results
from exporter.errors import InputError

log = logging.getLogger(__name__)

MODEL_NAME = "quadit_generate"
MAX_STEPS = 1000  # a bound on one request's compute; the model card uses 100
SPARE_INSTANCES = 2  # Triton instances beyond max_inflight, which only refuse (see the module doc)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    drain_timeout_s: float = 600.0  # how long SIGTERM waits for queued and running generations

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not isinstance(p, int) or not 0 < p < 65536 for p in ports):
            raise InputError(f"ports must be integers in 1..65535, got {ports}")
        if len(set(ports)) != 3:
            raise InputError(f"HTTP, gRPC and metrics ports must differ, got {ports}")
        if not self.drain_timeout_s > 0:
            raise InputError(f"drain timeout must be positive, got {self.drain_timeout_s}")


class RequestError(Exception):
    """A bad request. Its message reaches the client as Triton's error text without a Python traceback:
    PyTriton formats `exc.__traceback__` into the error response, so this class reports none."""

    @property
    def __traceback__(self):  # type: ignore[override]
        return None

    @__traceback__.setter
    def __traceback__(self, _value) -> None:
        pass


class RequestErrorsAtDebug(logging.Filter):
    """PyTriton logs every exception an infer callable raises, with its traceback, at WARNING. A RequestError
    is a bad or refused request (the client gets its one-line message), not a server fault, so its record
    is lowered to DEBUG: under load "server busy" refusals would otherwise fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and f"{__name__}.RequestError" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


# -- the Python-backend environment --------------------------------------------------------------------
def libpython_dir() -> str | None:
    """The directory of the running interpreter's own shared libpython, or None for a static build."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    names = [n for n in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")) if n]
    if libdir and any((Path(libdir) / n).exists() for n in names):
        return str(libdir)
    return None


def prepare_python_backend_env(environ: Any = os.environ) -> str | None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH, for the tritonserver PyTriton starts.

    Triton's Python-backend stub links `libpython3.X.so.1.0` by name; without this the loader takes the
    system's copy (Debian's 3.11.2 here), which then runs this interpreter's standard library (3.11.7) and
    fails (`'_thread.RLock' object has no attribute '_recursion_count'`). PyTriton copies `os.environ`
    when it starts the server, and the stubs inherit it. Returns the directory, or None where the
    interpreter has no shared libpython (the stub then uses the system's)."""
    libdir = libpython_dir()
    if libdir is None:
        log.warning("this Python (%s) has no shared libpython; Triton's Python-backend stub will load the "
                    "system's, which must be the same Python version", sysconfig.get_config_var("VERSION"))
        return None
    parts = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if not parts or parts[0] != libdir:
        environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in parts if p != libdir]])
    return libdir


# -- requests ------------------------------------------------------------------------------------------
INPUTS = {"prompt": np.bytes_, "seconds": np.float32, "steps": np.int32, "cfg_scale": np.float32, "seed": np.int64}


def _column(request: Any, name: str, kind: str) -> np.ndarray:
    try:
        value = np.asarray(request[name])
    except KeyError:
        raise RequestError(f"input '{name}' is missing") from None
    if value.ndim != 2 or value.shape[1] != 1:
        raise RequestError(f"input '{name}' must have shape [batch, 1], got {list(value.shape)}")
    if kind == "bytes":
        if value.dtype.kind not in "SOU":
            raise RequestError(f"input '{name}' must be BYTES, got {value.dtype}")
    elif np.dtype(value.dtype).kind != kind:
        raise RequestError(f"input '{name}' must be {'a float' if kind == 'f' else 'an integer'}, got {value.dtype}")
    return value[:, 0]


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("input 'prompt' is not valid UTF-8") from None
    return str(value)


def parse_request(request: Any, defaults: dict[str, Any], max_seconds: float) -> list[GenerateOptions]:
    """One GenerateOptions per row of a Triton request, validated; a RequestError names what is wrong."""
    cols = {"prompt": _column(request, "prompt", "bytes"), "seconds": _column(request, "seconds", "f"),
            "steps": _column(request, "steps", "i"), "cfg_scale": _column(request, "cfg_scale", "f"),
            "seed": _column(request, "seed", "i")}
    rows = {len(c) for c in cols.values()}
    if len(rows) != 1 or rows == {0}:
        raise RequestError(f"inputs must have the same, non-zero batch size, got { {k: len(v) for k, v in cols.items()} }")
    out = []
    for i in range(rows.pop()):
        prompt, seconds = _text(cols["prompt"][i]), float(cols["seconds"][i])
        steps, cfg, seed = int(cols["steps"][i]), float(cols["cfg_scale"][i]), int(cols["seed"][i])
        if not prompt.strip():
            raise RequestError("input 'prompt' is empty")
        if not math.isfinite(seconds) or seconds <= 0:
            raise RequestError(f"input 'seconds' must be positive, got {seconds:g}")
        if seconds > max_seconds + 1e-6:
            raise RequestError(f"input 'seconds' {seconds:g} is longer than this model's window of {max_seconds:.2f} s")
        if not 2 <= steps <= MAX_STEPS:
            raise RequestError(f"input 'steps' must be from 2 to {MAX_STEPS}, got {steps}")
        if not math.isfinite(cfg) or cfg < 0:
            raise RequestError(f"input 'cfg_scale' must be a finite number >= 0, got {cfg:g}")
        opts = GenerateOptions(prompt=prompt, seconds=seconds, steps=steps, cfg_scale=cfg, seed=seed,
                               sampler_type=defaults["sampler_type"], sigma_min=defaults["sigma_min"],
                               sigma_max=defaults["sigma_max"], rho=defaults["rho"])
        try:
            opts.validate(max_seconds)
        except InputError as exc:
            raise RequestError(str(exc).replace("--", "")) from None
        out.append(opts)
    if len({round(o.seconds * 1e6) for o in out}) > 1:
        raise RequestError("rows of one request must share 'seconds' (their audio is one tensor); send them "
                           "as separate requests")
    return out


class InFlight:
    """Counts instance calls still running, so that shutdown waits until each has handed back its answer,
    and admits at most `limit` requests at once (`admit`)."""

    def __init__(self, limit: int | None = None) -> None:
        self._cv = threading.Condition()
        self.count = 0
        self.admitted = 0
        self.limit = limit

    def admit(self) -> bool:
        """Take an admission slot; False when `limit` requests already hold one (`release` returns it)."""
        with self._cv:
            if self.limit is not None and self.admitted >= self.limit:
                return False
            self.admitted += 1
            return True

    def release(self) -> None:
        with self._cv:
            self.admitted -= 1

    def __enter__(self) -> "InFlight":
        with self._cv:
            self.count += 1
        return self

    def __exit__(self, *_: Any) -> None:
        with self._cv:
            self.count -= 1
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.count == 0, timeout)


class InferInstance:
    """One Triton model instance: parse, queue the rows, wait, answer (or raise this request's error)."""

    def __init__(self, scheduler: GenerateScheduler, defaults: dict[str, Any], max_seconds: float,
                 in_flight: InFlight) -> None:
        self.scheduler, self.defaults, self.max_seconds = scheduler, defaults, max_seconds
        self.in_flight = in_flight

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        arrived = self.scheduler.clock()
        if not self.in_flight.admit():
            raise RequestError(f"server busy: {self.in_flight.limit} requests in flight (--max-inflight); retry later")
        try:
            options = parse_request(request, self.defaults, self.max_seconds)
            try:
                futures = self.scheduler.submit(options, arrived_at=arrived)
            except RuntimeError as exc:
                raise RequestError(str(exc)) from None
            try:
                outs = results(futures, timeout=self.scheduler.config.request_timeout_s + 60)
            except TimeoutError as exc:
                raise RequestError(str(exc) or "request timed out") from None
        finally:
            self.in_flight.release()
        return {"audio": np.stack([o.audio.numpy().astype(np.float32) for o in outs]),
                "sample_rate": np.array([[o.sample_rate] for o in outs], dtype=np.int32),
                "batch_size": np.array([[o.batch_size] for o in outs], dtype=np.int32)}

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        with self.in_flight:
            return [self._one(r) for r in requests]


# -- the server ----------------------------------------------------------------------------------------
def bind(triton: Any, scheduler: GenerateScheduler, pipeline: Pipeline, in_flight: InFlight) -> None:
    """Bind `quadit_generate` to a PyTriton `Triton` with max_inflight + SPARE_INSTANCES instances (see the
    module doc)."""
    from pytriton.model_config import ModelConfig, Tensor

    defaults, window = pipeline.manifest["sampler_defaults"], pipeline.max_seconds
    count = scheduler.config.inflight + SPARE_INSTANCES
    triton.bind(
        model_name=MODEL_NAME,
        infer_func=[InferInstance(scheduler, defaults, window, in_flight) for _ in range(count)],
        inputs=[Tensor(name=n, dtype=t, shape=(1,)) for n, t in INPUTS.items()],
        outputs=[Tensor(name="audio", dtype=np.float32, shape=(2, -1)),
                 Tensor(name="sample_rate", dtype=np.int32, shape=(1,)),
                 Tensor(name="batch_size", dtype=np.int32, shape=(1,))],
        # Triton's own batcher stays off: it would hand several requests to one call and fail them together
        config=ModelConfig(max_batch_size=scheduler.config.max_batch, batcher=None),
        strict=True,
    )


def check_ports_free(server: ServerConfig) -> None:
    """A clear error before Triton starts: tritonserver exits on a taken port, and PyTriton then waits for
    its readiness until a time-out."""
    import socket

    for what, port in (("HTTP", server.http_port), ("gRPC", server.grpc_port), ("metrics", server.metrics_port)):
        with socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET) as s:
            try:
                s.bind((server.host, port))
            except OSError as exc:
                raise InputError(f"{what} port {port} on {server.host} is not available: {exc.strerror}") from None


def triton_config(server: ServerConfig) -> Any:
    from pytriton.triton import TritonConfig

    return TritonConfig(http_address=server.host, http_port=server.http_port, grpc_address=server.host,
                        grpc_port=server.grpc_port, metrics_address=server.host, metrics_port=server.metrics_port,
                        allow_metrics=True, allow_cpu_metrics=True, allow_gpu_metrics=False, strict_readiness=True,
                        exit_timeout_secs=5, log_verbose=0)


def _unload_then_stop(triton: Any) -> None:
    """Unload the model while the server is up, then stop it. PyTriton's own `stop()` stops tritonserver
    first; its Python-backend stubs then wait for their proxies until Triton's exit timeout expires, and
    one may outlive the server. Unloading first lets every stub finalize while its peer still answers."""
    manager = getattr(triton, "_model_manager", None)
    if manager is not None and triton.is_connected():
        try:
            manager.clean()
        except Exception:  # noqa: BLE001 - stop() below still runs; it logs its own failures
            log.warning("unloading %s before stopping Triton failed", MODEL_NAME, exc_info=True)
    triton.stop()


LOAD_ATTEMPTS = 3


def _start_triton(triton_cls: Any, server: ServerConfig, scheduler: GenerateScheduler, pipeline: Pipeline,
                  in_flight: InFlight, attempts: int = LOAD_ATTEMPTS) -> Any:
    """Start tritonserver and load the model, starting afresh when the model load fails.

    Readiness (issue 23.1, open): PyTriton starts tritonserver with an empty repository and then loads the
    model through the repository API, so `/v2/health/ready` says 200 (vacuously, under strict readiness)
    before `quadit_generate` is loaded; probe `/v2/models/quadit_generate/ready` instead. Loading the model
    at tritonserver's start-up (PyTriton's local-model-store lifecycle) closes that window, but it made the
    handshake race below frequent and each failure cost PyTriton's 120 s start-up time-out, so it is not used.

    Why a retry: Triton initialises the Python-backend instances in parallel, and PyTriton's instances 1..n
    fetch their config from a Unix socket that instance 0 opens. asyncio binds that socket (the file
    appears) before it listens, and the other instances connect as soon as the file exists; one that
    lands in between gets ECONNREFUSED and the whole model load fails ("load failed ... Connection
    refused" from `get_config_from_handshake_server`). Seen once in CI on a loaded 2-core machine. A fresh
    server gets a fresh workspace and socket; a load that fails every time still fails after `attempts`."""
    from tritonclient.utils import InferenceServerException

    for attempt in range(1, attempts + 1):
        triton = triton_cls(config=triton_config(server))
        bind(triton, scheduler, pipeline, in_flight)
        try:
            triton.run()
            return triton
        except InferenceServerException as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            triton.stop()
            if "load failed" not in str(exc) or attempt == attempts:
                raise
            log.warning("loading %s failed (attempt %d of %d: %s); starting Triton again", MODEL_NAME,
                        attempt, attempts, first[:200])
    raise AssertionError("unreachable")


def serve(pipeline: Pipeline, server: ServerConfig, scheduling: SchedulerConfig,
          ready: threading.Event | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or Triton dies); drain, stop, and return the exit code.

    On a signal: no new generation is accepted (those requests get an error), every queued or running one
    finishes and is answered, then Triton stops. Exit code 0 after a clean drain, 1 if Triton died."""
    from pytriton.triton import Triton

    check_ports_free(server)
    prepare_python_backend_env()
    logging.getLogger("pytriton.proxy.inference").addFilter(RequestErrorsAtDebug())
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    scheduler = GenerateScheduler(pipeline, scheduling)
    in_flight, code = InFlight(scheduling.inflight), 0
    triton = None
    try:
        triton = _start_triton(Triton, server, scheduler, pipeline, in_flight)
        log.info("serving %s on http://%s:%d, grpc %s:%d, metrics http://%s:%d/metrics (max batch %d, queue "
                 "delay %g ms, time limit %g s from arrival, %d requests in flight)",
                 MODEL_NAME, server.host, server.http_port, server.host,
                 server.grpc_port, server.host, server.metrics_port, scheduling.max_batch,
                 scheduling.max_queue_delay_ms, scheduling.request_timeout_s, scheduling.inflight)
        if ready is not None:
            ready.set()
        while not stop.wait(1.0):
            if not triton.is_alive():
                log.error("Triton Inference Server stopped unexpectedly")
                code = 1
                break
        log.info("draining: %d generation(s) queued or running", scheduler.pending)
        scheduler.close()
        if not scheduler.join(server.drain_timeout_s):
            log.error("drain did not finish within %g s", server.drain_timeout_s)
            code = 1
        if not in_flight.wait_idle(30.0):
            log.error("%d request(s) still unanswered after the drain", in_flight.count)
            code = 1
    finally:
        scheduler.close()
        if triton is not None:
            _unload_then_stop(triton)
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("stopped (%d batches, %d generations, largest batch %d)", scheduler.stats.batches,
             scheduler.stats.generations, scheduler.stats.largest)
    return code


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound together, so they differ, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
