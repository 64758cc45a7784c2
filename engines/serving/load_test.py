"""Load-test a quadit_generate server (scripts/serve.py) over loopback with tritonclient, HTTP or gRPC.

For each concurrency C (`--clients`, or each value of `--sweep`) it sends the same R requests (distinct
prompts and seeds, one length and step count so that they can batch) from C client threads and records
throughput, p50/p95/p99 latency, errors and the batch sizes the server reports; C=1 is the sequential
baseline every other row is compared with. Bounded: at most --requests per row and --time-budget-s for the
whole run (rows not started by then are skipped and marked so); only loopback addresses are accepted.
Writes OUT.json, OUT.md and OUT.png (latency and throughput against concurrency).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import platform
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from engines.runtime.logs import setup_logging
from engines.serving.client import infer_inputs

log = logging.getLogger("load_test")
MODEL = "quadit_generate"
PROMPTS = ["rain on a tin roof", "a dog barking in a large hall", "distant thunder", "a creaking wooden door",
           "birdsong at dawn", "waves on a pebble beach", "a busy cafe", "footsteps on gravel"]
MAX_REQUESTS = 1000


def loopback_target(url: str, protocol: str) -> tuple[str, int]:
    """host:port of `url`, refused unless it is a loopback address (this tool never loads other hosts)."""
    from exporter.errors import InputError

    parsed = urlparse(url if "//" in url else f"//{url}")
    host, port = parsed.hostname, parsed.port or (8000 if protocol == "http" else 8001)
    if host is None:
        raise InputError(f"--url {url}: no host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port)}
    except socket.gaierror as exc:
        raise InputError(f"--url {url}: {exc}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"--url {url} is not a loopback address; this load test only targets this machine")
    return host, port


def _client(protocol: str, target: str):
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(target, network_timeout=900, connection_timeout=60)
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(target)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_row(protocol: str, target: str, clients: int, requests: int, seconds: float, steps: int, cfg: float,
            deadline: float) -> dict:
    """R requests from `clients` threads; each thread has its own client (connection)."""
    lock, next_index = threading.Lock(), [0]
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []

    def worker() -> None:
        module, client = _client(protocol, target)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests or time.monotonic() > deadline:
                        return
                    next_index[0] += 1
                inputs = infer_inputs(module, PROMPTS[i % len(PROMPTS)], seconds, steps, cfg, 1000 + i)
                t0 = time.perf_counter()
                try:
                    result = client.infer(MODEL, inputs)
                    took = time.perf_counter() - t0
                    size = int(result.as_numpy("batch_size")[0, 0])
                    with lock:
                        latencies.append(took)
                        batch_sizes.append(size)
                except Exception as exc:  # noqa: BLE001 - an error is a result of a load test
                    with lock:
                        errors.append(str(exc).splitlines()[0][:200])
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = len(latencies)
    return {"clients": clients, "protocol": protocol, "requests": next_index[0], "ok": done, "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "wall_s": round(wall, 3),
            "throughput_rps": round(done / wall, 4) if wall > 0 else None,
            "latency_s": {k: (round(v, 3) if v is not None else None) for k, v in
                          {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                           "p99": percentile(latencies, 99),
                           "mean": sum(latencies) / done if done else None}.items()},
            "mean_batch_size": round(sum(batch_sizes) / done, 2) if done else None,
            "batch_sizes": {str(b): batch_sizes.count(b) for b in sorted(set(batch_sizes))}}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}


def markdown(report: dict) -> str:
    p = report["params"]
    lines = [f"# Serving load test: {MODEL}", "",
             f"{p['requests']} requests per row ({p['seconds']:g} s audio, {p['steps']} steps, cfg {p['cfg_scale']:g}, "
             f"distinct prompts and seeds), server HTTP `{report['server']['http']}` / gRPC `{report['server']['grpc']}` "
             f"(max batch {report['server_max_batch']}); machine: {report['machine']['cpu']}, "
             f"{report['machine']['cores']} cores (1-minute load average {report['machine'].get('loadavg_1m_at_start')} at the "
             f"start, {report['machine'].get('loadavg_1m_at_end')} at the end: other work shared the cores). "
             "Row C=1 is the sequential baseline (one request at a time).", "",
             "| protocol | clients | ok | errors | throughput (req/s) | vs sequential | p50 (s) | p95 (s) | p99 (s) "
             "| mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lat = r["latency_s"]
        speed = f"{r['speedup_vs_sequential']:.2f}x" if r.get("speedup_vs_sequential") else "-"
        fmt = (lambda v: f"{v:.2f}" if v is not None else "-")
        lines.append(f"| {r['protocol']} | {r['clients']} | {r['ok']} | {r['errors']} | {fmt(r['throughput_rps'])} | "
                     f"{speed} | {fmt(lat['p50'])} | {fmt(lat['p95'])} | {fmt(lat['p99'])} | "
                     f"{fmt(r['mean_batch_size'])} |")
    if report.get("skipped"):
        lines += ["", f"Skipped (time budget spent): {report['skipped']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax2 = ax.twinx()
    for proto, style in (("http", "-"), ("grpc", "--")):
        rows = [r for r in report["rows"] if r["protocol"] == proto and r["ok"]]
        if not rows:
            continue
        c = [r["clients"] for r in rows]
        ax.plot(c, [r["latency_s"]["p50"] for r in rows], "o" + style, color="C0", label=f"p50 latency ({proto})")
        ax.plot(c, [r["latency_s"]["p95"] for r in rows], "s" + style, color="C1", label=f"p95 latency ({proto})")
        ax2.plot(c, [r["throughput_rps"] for r in rows], "^" + style, color="C2", label=f"throughput ({proto})")
    ax.set_xscale("log", base=2)
    levels = sorted({r["clients"] for r in report["rows"]})
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (s)")
    ax2.set_ylabel("throughput (requests/s)")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    p = report["params"]
    ax.set_title(f"{MODEL}: {p['seconds']:g} s audio, {p['steps']} steps, {report['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def execute(args: argparse.Namespace) -> int:
    """`quadit load-test` after argument parsing (the parser: `engines.cli.load_test`)."""
    setup_logging(args.verbose)
    from exporter.errors import InputError

    if not 1 <= args.requests <= MAX_REQUESTS:
        raise InputError(f"--requests must be from 1 to {MAX_REQUESTS}, got {args.requests}")
    try:
        levels = sorted({1, *(int(c) for c in args.sweep.split(","))}) if args.sweep else sorted({1, args.clients})
    except ValueError:
        raise InputError(f"--sweep must be comma-separated integers, got {args.sweep}") from None
    if min(levels) < 1 or max(levels) > 64:
        raise InputError(f"concurrencies must be from 1 to 64, got {levels}")
    if not args.time_budget_s > 0:
        raise InputError("--time-budget-s must be positive")
    host, port = loopback_target(args.url, "http")
    grpc_host, grpc_port = loopback_target(args.grpc_url, "grpc") if args.grpc_url else (host, port + 1)
    protocols = ["http", "grpc"] if args.protocol == "both" else [args.protocol]
    targets = {"http": f"{host}:{port}", "grpc": f"{grpc_host}:{grpc_port}"}
    _, probe = _client(protocols[0], targets[protocols[0]])
    try:
        ready = probe.is_model_ready(MODEL)
        config = probe.get_model_config(MODEL) if ready else None
    except Exception as exc:  # noqa: BLE001 - refused connection, wrong protocol ...
        raise InputError(f"no {protocols[0]} server answers at {targets[protocols[0]]}: {exc}") from None
    finally:
        probe.close()
    if not ready:
        raise InputError(f"model {MODEL} is not ready at {targets[protocols[0]]}")
    max_batch = config["max_batch_size"] if isinstance(config, dict) else config.config.max_batch_size

    host_facts = machine()
    deadline = time.monotonic() + args.time_budget_s
    rows, skipped = [], []
    # warm-up: the first request of a fresh server pays for session initialisation
    run_row(protocols[0], targets[protocols[0]], 1, 1, args.seconds, 2, args.cfg_scale, deadline)
    for proto in protocols:
        for c in levels:
            if time.monotonic() > deadline:
                skipped.append(f"{proto} x{c}")
                continue
            log.info("%s, %d client(s): %d requests", proto, c, args.requests)
            row = run_row(proto, targets[proto], c, args.requests, args.seconds, args.steps, args.cfg_scale, deadline)
            log.info("  %.3f req/s, p50 %s s, p95 %s s, %d errors, mean batch %s", row["throughput_rps"] or 0,
                     row["latency_s"]["p50"], row["latency_s"]["p95"], row["errors"], row["mean_batch_size"])
            rows.append(row)
        base = next((r for r in rows if r["protocol"] == proto and r["clients"] == 1 and r["throughput_rps"]), None)
        for r in rows:
            if r["protocol"] == proto and base:
                r["speedup_vs_sequential"] = round(r["throughput_rps"] / base["throughput_rps"], 3) \
                    if r["throughput_rps"] else None
    report = {"kind": "quadit-serving-load-test", "server": targets, "server_max_batch": max_batch,
              "params": {"requests": args.requests, "seconds": args.seconds, "steps": args.steps,
                         "cfg_scale": args.cfg_scale, "levels": levels, "protocols": protocols},
              "machine": {**host_facts, "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}, "rows": rows, "skipped": skipped,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0
