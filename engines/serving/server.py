"""`quadit_generate` on Triton Inference Server (through PyTriton): the model binding, the Python-backend
environment fix, and a serve loop that drains on SIGTERM (request parsing: `engines.serving.api`).

The API (KServe v2, HTTP and gRPC; Triton adds the batch dimension to every input and output):

    inputs   prompt BYTES [1], seconds FP32 [1], steps INT32 [1], cfg_scale FP32 [1], seed INT64 [1]
    outputs  audio FP32 [channels, samples], sample_rate INT32 [1], batch_size INT32 [1]

`channels` is 2 for a Stable Audio Open export (44.1 kHz) and 1 for a UNet-family export (AudioLDM, TANGO:
mono at the vocoder's 16 kHz); `engines.serving.families` holds what differs between the two.

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
import os
import signal
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.serving.api import (  # noqa: F401 - the request API, re-exported where callers found it
    INPUTS,
    MAX_STEPS,
    RequestError,
    RequestErrorsAtDebug,
    parse_request,
)
from engines.serving.families import ServedFamily, served_family
from engines.serving.scheduler import GenerateScheduler, SchedulerConfig, results
from exporter.errors import InputError

log = logging.getLogger(__name__)

MODEL_NAME = "quadit_generate"
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

    def __init__(self, scheduler: GenerateScheduler, family: ServedFamily, in_flight: InFlight) -> None:
        self.scheduler, self.family, self.in_flight = scheduler, family, in_flight

    def _one(self, request: Any) -> dict[str, np.ndarray]:
        arrived = self.scheduler.clock()
        if not self.in_flight.admit():
            raise RequestError(f"server busy: {self.in_flight.limit} requests in flight (--max-inflight); retry later")
        try:
            options = self.family.parse(request)
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
def bind(triton: Any, scheduler: GenerateScheduler, in_flight: InFlight) -> None:
    """Bind `quadit_generate` to a PyTriton `Triton` with max_inflight + SPARE_INSTANCES instances (see the
    module doc); `audio` has the scheduler's family's channel count (2 for SAO, 1 for the UNet family)."""
    from pytriton.model_config import ModelConfig, Tensor

    count = scheduler.config.inflight + SPARE_INSTANCES
    triton.bind(
        model_name=MODEL_NAME,
        infer_func=[InferInstance(scheduler, scheduler.family, in_flight) for _ in range(count)],
        inputs=[Tensor(name=n, dtype=t, shape=(1,)) for n, t in INPUTS.items()],
        outputs=[Tensor(name="audio", dtype=np.float32, shape=(scheduler.family.channels, -1)),
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


# -- start-up --------------------------------------------------------------------------------------------
LOAD_ATTEMPTS = 3
STARTUP_TIMEOUT_S = 120.0  # PyTriton's own start-up time-out
HANDSHAKE_MODULE = "quadit_handshake"
_HANDSHAKE_PATCH = f"""

# Added by quadit (engines/serving/server.py, harden_handshake): instances 1..n wait for instance 0's
# handshake socket instead of failing the model load when they come too early (see {HANDSHAKE_MODULE}.py).
from .{HANDSHAKE_MODULE} import patient as _quadit_patient  # noqa: E402

get_config_from_handshake_server = _quadit_patient(get_config_from_handshake_server)
"""


def harden_handshake(version_dir: Path) -> bool:
    """Make the Python-backend instances of the model in `version_dir` (PyTriton's copy of its proxy files in
    the local model store) wait for instance 0's handshake socket: `engines/serving/handshake.py` is copied
    next to them and `communication.py` rebinds `get_config_from_handshake_server` to its patient form
    before `model.py` imports it. Returns False (with a warning) where PyTriton's files do not have that
    function, so the race stays open; True once patched (a second call changes nothing)."""
    from engines.serving import handshake

    communication = version_dir / "communication.py"
    text = communication.read_text() if communication.is_file() else ""
    if "def get_config_from_handshake_server(" not in text:
        log.warning("%s has no get_config_from_handshake_server (another PyTriton version?); the instance "
                    "handshake is not hardened and a model load may fail at start-up", communication)
        return False
    (version_dir / f"{HANDSHAKE_MODULE}.py").write_text(Path(handshake.__file__).read_text())
    if _HANDSHAKE_PATCH not in text:
        communication.write_text(text + _HANDSHAKE_PATCH)
    return True


def _probe_host(host: str) -> str:
    """The address a local client reaches `host` at (a wildcard listen address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def server_ready(server: ServerConfig, timeout_s: float = 2.0) -> bool:
    """Whether `GET /v2/health/ready` on this server's HTTP port says 200 (asked directly, never through an
    HTTP proxy that the environment may name)."""
    import urllib.error
    import urllib.request

    url = f"http://{_probe_host(server.host)}:{server.http_port}/v2/health/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _launch(triton: Any, workspace: Any, server: ServerConfig, timeout_s: float) -> str | None:
    """Start tritonserver, wait until it is ready, connect PyTriton's proxies; None, or why it did not come up.

    PyTriton's `run()` is `_run_server()` then `connect()`, and `connect()` polls readiness for 120 s even
    after tritonserver has exited (a failed start-up load stops it). Here the wait watches for that exit:
    PyTriton stops the `Triton` and deletes its workspace when tritonserver exits, so a workspace that is
    gone is a server that is gone, and the failure is known within a second."""
    triton._run_server()
    give_up_at = time.monotonic() + timeout_s
    while not server_ready(server):
        if not workspace.exists():
            return "tritonserver exited while loading the model (its log above says why)"
        if time.monotonic() >= give_up_at:
            return f"tritonserver was not ready after {timeout_s:g} s"
        time.sleep(0.05)
    triton.connect()
    return None


def _start_triton(triton_cls: Any, server: ServerConfig, scheduler: GenerateScheduler, in_flight: InFlight,
                  attempts: int = LOAD_ATTEMPTS, timeout_s: float = STARTUP_TIMEOUT_S) -> Any:
    """Start tritonserver with `quadit_generate` loaded before its endpoints open; start afresh if that fails.

    Readiness (issue 23.1): with PyTriton's default lifecycle tritonserver starts with an empty repository,
    opens its endpoints and says ready (strict readiness holds vacuously with no model), and only then is
    the model loaded through the repository API, so `/v2/health/ready` said 200 while requests still got
    "unknown model". Here the model is written into PyTriton's local model store at `bind`, and tritonserver
    (`--load-model=*`, strict readiness) loads it before it opens HTTP and gRPC: a probe finds no listener
    until the model is READY, and `/v2/health/ready` (HTTP) and ServerReady (gRPC) say ready only then.

    Start-up loading made PyTriton's instance handshake race fail loads often (instances 1..n connect to
    instance 0's Unix socket too early, see `engines/serving/handshake.py`), each failure costing PyTriton's
    120 s start-up time-out; `harden_handshake` makes the instances wait for instance 0 instead, and
    `_launch` notices a tritonserver that exited at once. A start that still fails is tried again with a
    fresh server, workspace and sockets, up to `attempts` times."""
    from pytriton.triton import TritonLifecyclePolicy
    from pytriton.utils.workspace import Workspace

    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    failure = ""
    for attempt in range(1, attempts + 1):
        workspace = Workspace()
        triton = triton_cls(config=triton_config(server), workspace=workspace, triton_lifecycle_policy=policy)
        bind(triton, scheduler, in_flight)
        harden_handshake(workspace.model_store_path / MODEL_NAME / "1")
        t0 = time.monotonic()
        try:
            failure = _launch(triton, workspace, server, timeout_s) or ""
        except Exception as exc:  # noqa: BLE001 - PyTriton raises its own, tritonclient's and TimeoutError
            triton.stop()
            if attempt == attempts:
                raise
            failure = (str(exc).splitlines() or [type(exc).__name__])[0]
        else:
            if not failure:
                log.info("%s loaded and tritonserver ready in %.1f s", MODEL_NAME, time.monotonic() - t0)
                return triton
            triton.stop()
        if attempt < attempts:
            log.warning("starting Triton with %s failed (attempt %d of %d: %s); starting Triton again",
                        MODEL_NAME, attempt, attempts, failure[:200])
    raise InputError(f"Triton could not load {MODEL_NAME} ({attempts} attempts): {failure}")


def serve(pipeline: Any, server: ServerConfig, scheduling: SchedulerConfig,
          ready: threading.Event | None = None) -> int:
    """Run the server over `pipeline` (a Stable Audio Open `Pipeline` or a `UNetPipeline`: `served_family`
    picks the request parsing and batcher) until SIGTERM/SIGINT (or Triton dies); drain, stop, and return
    the exit code.

    On a signal: no new generation is accepted (those requests get an error), every queued or running one
    finishes and is answered, then Triton stops. Exit code 0 after a clean drain, 1 if Triton died."""
    from pytriton.triton import Triton

    check_ports_free(server)
    prepare_python_backend_env()
    logging.getLogger("pytriton.proxy.inference").addFilter(RequestErrorsAtDebug())
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    family = served_family(pipeline)
    scheduler = GenerateScheduler(pipeline, scheduling, family=family)
    in_flight, code = InFlight(scheduling.inflight), 0
    triton = None
    try:
        triton = _start_triton(Triton, server, scheduler, in_flight)
        log.info("serving %s (%s family, %d Hz, %d channel(s)) on http://%s:%d, grpc %s:%d, metrics "
                 "http://%s:%d/metrics (max batch %d, queue delay %g ms, time limit %g s from arrival, %d requests "
                 "in flight)", MODEL_NAME, family.name, family.sample_rate, family.channels, server.host,
                 server.http_port, server.host,
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
