"""Patience for PyTriton's instance handshake. This file also runs inside Triton's Python-backend stubs:
`engines.serving.server.harden_handshake` copies it into the model store next to PyTriton's proxy files,
so it imports the standard library only.

The race it closes: PyTriton's instances 1..n of a model get their config from a Unix socket that
instance 0 serves (`TritonPythonModel.initialize` in `pytriton/proxy/model.py`), through
`get_config_from_handshake_server` in `pytriton/proxy/communication.py`. That client waits at most 1 s for
the socket file and then connects once. Triton initialises the instances in parallel, and instance 0 first
starts its tensor-store process and then its `HandshakeServer`, whose `asyncio.start_unix_server` binds the
socket (the file appears) before it listens. An instance that connects between bind and listen gets
ECONNREFUSED, and one that starts more than 1 s before instance 0 serves gets TimeoutError; either fails the
whole model load. With the load at tritonserver's start-up a failed load stops tritonserver.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

PATIENCE_S = 60.0  # how long instances 1..n wait for instance 0 (a cold instance 0 on a loaded host: seconds)
PAUSE_S = 0.01

# what a handshake that came too early raises: nothing listens yet (ECONNREFUSED), the socket file is not there
# yet (PyTriton's own TimeoutError after 1 s, or FileNotFoundError from connect), or no answer in time
TOO_EARLY = (ConnectionRefusedError, FileNotFoundError, TimeoutError)


def patient(fetch: Callable[..., Any], patience_s: float = PATIENCE_S, pause_s: float = PAUSE_S) -> Callable[..., Any]:
    """`fetch` (PyTriton's `get_config_from_handshake_server(socket_path, timeout_s=1.0)`), tried again on
    a too-early failure until `patience_s` has passed; then the last failure is raised. Each try is a fresh
    connection, so a retry never reads half of an earlier answer."""

    @functools.wraps(fetch)
    def get_config(socket_path: Any, *args: Any, **kwargs: Any) -> Any:
        give_up_at = time.monotonic() + patience_s
        while True:
            try:
                return fetch(socket_path, *args, **kwargs)
            except TOO_EARLY:
                if time.monotonic() >= give_up_at:
                    raise
                time.sleep(pause_s)

    get_config.quadit_patient = True  # type: ignore[attr-defined]
    return get_config
