"""A bounded soak and fault run against a live `quadit_generate` server on loopback.

A seeded mix of requests from several client threads: good ones over HTTP and gRPC (a few distinct prompts,
lengths, step counts, guidance scales and seeds, repeated), malformed ones (empty prompt, a duration past
the model's window, a missing input, a wrong data type), clients that send a request and hang up, gRPC
clients whose deadline expires first, and one SIGTERM to the server while a batch is running. Every request
ends in exactly one outcome:

- `audio`: the server's answer, compared with the same request run alone (`reference`), within `tolerance`;
- `error`: an error response (a bad request, the server shutting down, or gone after the drain); a good
  request refused as "server busy" is retried after a short pause, as a client with a retry policy does;
- `abandoned`: the client gave up on purpose (hang-up, expired deadline);
- `lost`: no outcome within `request_timeout_s` (a hang): a soak passes only with none.

The server's memory is the resident set of its whole process tree (the Python process, tritonserver and
its Python-backend stubs), read from /proc at the start of the run and just before the SIGTERM.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.serving.client import MODEL, infer_inputs
from engines.serving.load_test import percentile

KINDS = ("http", "grpc", "bad", "hangup", "impatient")


@dataclass(frozen=True)
class Variant:
    prompt: str
    seconds: float
    steps: int
    cfg_scale: float
    seed: int


DEFAULT_VARIANTS = (
    Variant("rain on a tin roof", 1.0, 4, 7.0, 11), Variant("a dog barking in a large hall", 1.0, 4, 3.0, 12),
    Variant("distant thunder", 1.0, 4, 7.0, 13), Variant("a creaking wooden door", 1.0, 6, 7.0, 14),
    Variant("wind through pine trees", 0.5, 4, 7.0, 15), Variant("footsteps on gravel", 0.5, 4, 1.0, 16),
)


@dataclass(frozen=True)
class SoakPlan:
    requests: int = 200
    clients: int = 8
    # share of each kind in the mix (the rest are good requests, half HTTP, half gRPC)
    bad: float = 0.12
    hangup: float = 0.06
    impatient: float = 0.04
    warmup: float = 0.1  # fraction of requests started before the "warm" memory reading
    sigterm_after: float = 0.85  # fraction of requests started before the SIGTERM
    request_timeout_s: float = 120.0
    tolerance: float = 1e-4
    busy_retries: int = 400  # pauses of 25-75 ms: about 20 s of retrying before a busy refusal counts as an error
    seed: int = 0
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS

    def kinds(self) -> list[str]:
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.requests):
            r = rng.random()
            if r < self.bad:
                out.append("bad")
            elif r < self.bad + self.hangup:
                out.append("hangup")
            elif r < self.bad + self.hangup + self.impatient:
                out.append("impatient")
            else:
                out.append("http" if rng.random() < 0.5 else "grpc")
        return out


@dataclass
class Outcome:
    index: int
    kind: str
    variant: int
    result: str = "lost"
    detail: str = ""
    seconds: float | None = None
    started: float = 0.0  # since the run began
    ended: float = 0.0
    attempts: int = 0
    last_attempt: float = 0.0  # when the attempt that gave the outcome started


@dataclass
class SoakReport:
    plan: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    rss_start_mb: float = 0.0  # before the first request
    rss_warm_mb: float = 0.0  # once `warmup` of the requests have started
    rss_end_mb: float = 0.0  # just before the SIGTERM
    sigterm_s: float | None = None
    wall_s: float = 0.0
    server_exit: int | None = None

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.result] = counts.get(o.result, 0) + 1
        good = sorted(o.seconds for o in self.outcomes if o.result == "audio" and o.seconds is not None)
        reasons: dict[str, int] = {}
        for o in self.outcomes:
            if o.result == "error":
                reasons[o.detail] = reasons.get(o.detail, 0) + 1
        return {"requests": len(self.outcomes), "outcomes": counts, "error_reasons": reasons,
                "busy_retries": sum(max(0, o.attempts - 1) for o in self.outcomes),
                "errors": counts.get("error", 0), "lost": counts.get("lost", 0),
                "mismatched": sum(o.result == "mismatch" for o in self.outcomes),
                "in_flight_at_sigterm": len(self.in_flight_at_sigterm()),
                "in_flight_at_sigterm_with_audio": sum(o.result == "audio" for o in self.in_flight_at_sigterm()),
                "latency_p50_s": _rounded(percentile(good, 50)), "latency_p99_s": _rounded(percentile(good, 99)),
                "rss_start_mb": round(self.rss_start_mb, 1), "rss_warm_mb": round(self.rss_warm_mb, 1),
                "rss_end_mb": round(self.rss_end_mb, 1),
                "wall_s": round(self.wall_s, 1), "server_exit": self.server_exit}

    def in_flight_at_sigterm(self) -> list[Outcome]:
        """Good requests whose last attempt was running at the SIGTERM (begun 0.2 s before it, answered after
        it; a busy refusal takes milliseconds, so these were admitted): the drain must finish them."""
        if self.sigterm_s is None:
            return []
        return [o for o in self.outcomes if o.kind in ("http", "grpc")
                and o.last_attempt < self.sigterm_s - 0.2 and o.ended > self.sigterm_s]

    def write(self, path: Path) -> None:
        doc = {"summary": self.summary(), "plan": self.plan, "outcomes": [asdict(o) for o in self.outcomes]}
        Path(path).write_text(json.dumps(doc, indent=2))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants (Linux /proc), in MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total / 1024.0


REASONS = ("server busy", "shutting down", "time limit", "is empty", "longer than this model's window",
           "data-type", "expected 5 inputs", "Deadline Exceeded", "Connection refused", "unavailable")


def reason(exc: Exception) -> str:
    """The cause of a failed request in a few words (Triton wraps a backend's message in tracebacks)."""
    text = str(exc) or type(exc).__name__
    for known in REASONS:
        if known.lower() in text.lower():
            return known
    return text.splitlines()[0][:160]


def _tensors(module: Any, v: Variant, broken: str | None = None) -> list[Any]:
    """The request of `v`, or a malformed form of it (`broken`: empty, long, dtype or missing)."""
    replace = {"empty": {"prompt": ("BYTES", np.array([[b""]], dtype=object))},
               "long": {"seconds": ("FP32", np.array([[999.0]], np.float32))},
               "dtype": {"seed": ("FP32", np.array([[1.5]], np.float32))}}.get(broken or "", {})
    drop = ("cfg_scale", "seed") if broken == "missing" else ()
    return infer_inputs(module, v.prompt, v.seconds, v.steps, v.cfg_scale, v.seed, replace, drop)


def _hang_up(host: str, port: int, v: Variant) -> None:
    body = json.dumps({"inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": [v.prompt]},
        {"name": "seconds", "datatype": "FP32", "shape": [1, 1], "data": [v.seconds]},
        {"name": "steps", "datatype": "INT32", "shape": [1, 1], "data": [v.steps]},
        {"name": "cfg_scale", "datatype": "FP32", "shape": [1, 1], "data": [v.cfg_scale]},
        {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [v.seed]}]}).encode()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def run_soak(host: str, http_port: int, grpc_port: int, server_pid: int, plan: SoakPlan,
             reference: Callable[[Variant], np.ndarray]) -> SoakReport:
    """Run `plan` against the server; `server_pid` is signalled once (SIGTERM) and waited for."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    kinds = plan.kinds()
    rng = random.Random(plan.seed + 1)
    report = SoakReport(plan={**asdict(plan), "variants": [asdict(v) for v in plan.variants]})
    report.outcomes = [Outcome(i, k, rng.randrange(len(plan.variants))) for i, k in enumerate(kinds)]
    refs = {i: reference(v) for i, v in enumerate(plan.variants)}
    rng_pause = random.Random(plan.seed + 2)
    lock, next_index = threading.Lock(), [0]
    sigterm_at = int(plan.requests * plan.sigterm_after)
    warm_at = int(plan.requests * plan.warmup)
    busy = [0]
    t_start = time.monotonic()
    report.rss_start_mb = tree_rss_mb(server_pid)

    def one(o: Outcome) -> None:
        v = plan.variants[o.variant]
        if o.kind == "hangup":
            try:
                _hang_up(host, http_port, v)
                o.result, o.detail = "abandoned", "sent, then hung up"
            except OSError as exc:
                o.result, o.detail = "error", f"connect: {exc}"
            return
        t0 = time.monotonic()
        for _ in range(plan.busy_retries + 1):
            o.attempts += 1
            o.last_attempt = time.monotonic() - t_start
            attempt(o, v)
            if not (o.result == "error" and o.detail == "server busy"):
                break
            time.sleep(rng_pause.uniform(0.025, 0.075))
        o.seconds = time.monotonic() - t0

    def attempt(o: Outcome, v: Variant) -> None:
        try:
            if o.kind in ("grpc", "impatient"):
                client = grpcclient.InferenceServerClient(f"{host}:{grpc_port}")
                timeout = 0.05 if o.kind == "impatient" else plan.request_timeout_s
                res = client.infer(MODEL, _tensors(grpcclient, v), client_timeout=timeout)
            else:
                client = httpclient.InferenceServerClient(f"{host}:{http_port}",
                                                          network_timeout=plan.request_timeout_s)
                broken = ("empty", "long", "missing", "dtype")[o.index % 4] if o.kind == "bad" else None
                res = client.infer(MODEL, _tensors(httpclient, v, broken))
            audio = res.as_numpy("audio")[0]
            ref = refs[o.variant]
            rel = float(np.abs(audio - ref).max() / max(float(np.abs(ref).max()), 1e-12)) \
                if audio.shape == ref.shape else float("inf")
            o.result, o.detail = ("audio", f"rel {rel:.1e}") if rel <= plan.tolerance else ("mismatch", f"rel {rel:.3g}")
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome of its own
            abandoned = o.kind == "impatient" and "deadline" in str(exc).lower()
            o.result, o.detail = ("abandoned" if abandoned else "error"), reason(exc)

    def client_loop() -> None:
        while True:
            with lock:
                if next_index[0] >= plan.requests:
                    return
                o = report.outcomes[next_index[0]]
                next_index[0] += 1
                busy[0] += 1
            o.started = time.monotonic() - t_start
            try:
                one(o)
            finally:
                o.ended = time.monotonic() - t_start
                with lock:
                    busy[0] -= 1

    def terminator() -> None:
        while next_index[0] < warm_at:
            time.sleep(0.01)
        report.rss_warm_mb = tree_rss_mb(server_pid)
        while True:
            with lock:
                ready = next_index[0] >= sigterm_at and busy[0] >= min(4, plan.clients)
            if ready:
                break
            time.sleep(0.01)
        report.rss_end_mb = tree_rss_mb(server_pid)
        report.sigterm_s = time.monotonic() - t_start
        os.kill(server_pid, signal.SIGTERM)

    threads = [threading.Thread(target=client_loop, name=f"soak-client-{i}", daemon=True) for i in range(plan.clients)]
    killer = threading.Thread(target=terminator, name="soak-sigterm", daemon=True)
    killer.start()
    for t in threads:
        t.start()
    deadline = time.monotonic() + plan.request_timeout_s * (1 + plan.requests / plan.clients / 10)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    killer.join(5)
    report.wall_s = time.monotonic() - t_start
    return report


def markdown(summary: dict[str, Any]) -> str:
    rows = [("requests", summary["requests"]), ("outcomes", summary["outcomes"]),
            ("errors by reason", summary["error_reasons"]), ("'server busy' retries", summary["busy_retries"]),
            ("lost", summary["lost"]),
            ("audio different from its sequential run", summary["mismatched"]),
            ("good requests in flight at the SIGTERM / answered with audio",
             f"{summary['in_flight_at_sigterm']} / {summary['in_flight_at_sigterm_with_audio']}"),
            ("latency p50 / p99 (s, audio answers)", f"{summary['latency_p50_s']} / {summary['latency_p99_s']}"),
            ("server RSS at start / warm / before SIGTERM (MiB)",
             f"{summary['rss_start_mb']} / {summary['rss_warm_mb']} / {summary['rss_end_mb']}"),
            ("server exit code after the drain", summary["server_exit"]), ("wall (s)", summary["wall_s"])]
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]) + "\n"
