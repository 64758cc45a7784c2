"""The dynamic batcher behind the server: a bounded queue of generations and one worker thread.

Each generation (one row of a Triton request) waits in the queue; the worker takes the oldest one, waits up
to `max_queue_delay_ms` after its arrival for company, then steps together every queued generation with the
same batch key (latent length, steps, sampler settings), oldest first, at most `max_batch` of them (the
family's batched run: `engines.serving.batching.generate_batch` for SAO, `engines.serving.unet_batching` for
the UNet family; see `engines.serving.families`). Generations with other keys stay queued, in order, for the next round.

Why the batching lives here and not in Triton's own dynamic batcher: Triton hands a batch of requests to
one execute call and PyTriton answers a failed call with one error for all of them, so one bad or expired
request would fail its neighbours. Here every generation has its own future: a bad request is refused at
`submit`, an expired one gets its own error, the others go on.

Time limit: a generation gets a time-out error once `request_timeout_s` has passed since its request
arrived (`submit(..., arrived_at=)`; the server passes the moment Triton handed it the request, and keeps
Triton's own queue empty: see `engines.serving.server`), checked before its batch starts and between steps.
A batch in which some generation expired is
abandoned; the expired ones fail, the rest go back to the front of the queue (their result does not depend
on the batch they run in, so restarting them changes nothing but time).

Draining: `close()` refuses new generations; the worker finishes everything queued, then exits.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from engines.serving.families import ServedFamily, served_family
from exporter.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 4
    max_queue_delay_ms: float = 50.0
    request_timeout_s: float = 300.0
    max_queue: int = 64
    max_inflight: int | None = None  # requests admitted at once (queued or running); None: 2 * max_batch
    dit_batch_sizes: tuple[int, ...] | None = None  # DiT batch sizes the backend runs (TensorRT profiles)

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"--max-batch must be a positive integer, got {self.max_batch}")
        if not self.max_queue_delay_ms >= 0:
            raise InputError(f"--max-queue-delay-ms must be >= 0, got {self.max_queue_delay_ms}")
        if not self.request_timeout_s > 0:
            raise InputError(f"--request-timeout-s must be positive, got {self.request_timeout_s}")
        if not isinstance(self.max_queue, int) or self.max_queue < self.max_batch:
            raise InputError(f"--max-queue must be an integer >= --max-batch, got {self.max_queue}")
        if self.max_inflight is not None and (not isinstance(self.max_inflight, int)
                                              or self.max_inflight < self.max_batch):
            raise InputError(f"--max-inflight must be an integer >= --max-batch, got {self.max_inflight}")
        if self.dit_batch_sizes is not None and (not self.dit_batch_sizes or min(self.dit_batch_sizes) < 1):
            raise InputError(f"DiT batch sizes must be positive, got {self.dit_batch_sizes}")


    @property
    def inflight(self) -> int:
        """Requests admitted at once: enough for one batch running and the next one gathering by default."""
        return self.max_inflight if self.max_inflight is not None else 2 * self.max_batch


class ServiceClosed(RuntimeError):
    """The server is draining for shutdown and takes no new requests."""


class RequestTimeout(TimeoutError):
    pass


@dataclass
class Generation:
    options: Any  # GenerateOptions or UNetGenerateOptions
    key: Any  # the family's batch key
    queued_at: float
    deadline: float
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    generations: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class _Expired(Exception):
    pass


class GenerateScheduler:
    """Queue + worker thread over one pipeline; `submit` returns one future per generation. `family` (default:
    the pipeline's own, `served_family`) supplies the batch key and the batched run."""

    def __init__(self, pipeline: Any, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic,
                 family: ServedFamily | None = None) -> None:
        self.pipeline, self.config, self.clock = pipeline, config, clock
        self.family = family or served_family(pipeline)
        self.stats = BatchStats()
        self._queue: list[Generation] = []
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self._worker = threading.Thread(target=self._loop, name="quadit-batcher", daemon=True)
        self._worker.start()

    # -- client side -------------------------------------------------------------------------------------
    def submit(self, requests: Sequence[Any], arrived_at: float | None = None) -> list[Future]:
        """Queue generations (validated by the caller); all or none are queued. Their time limit counts
        from `arrived_at` (this scheduler's clock; default now)."""
        now = self.clock() if arrived_at is None else arrived_at
        items = [Generation(o, self.family.key(o), now, now + self.config.request_timeout_s)
                 for o in requests]
        with self._cv:
            if self._closed:
                raise ServiceClosed("the server is shutting down and accepts no new requests")
            if len(self._queue) + len(items) > self.config.max_queue:
                raise ServiceClosed(f"the queue is full ({len(self._queue)} generations waiting, at most "
                                    f"{self.config.max_queue}); retry later")
            self._queue.extend(items)
            self._cv.notify_all()
        return [it.future for it in items]

    def close(self) -> None:
        """Refuse new generations; queued and running ones still finish."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish the queue after `close()`; True when it did."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + (1 if self._busy else 0)

    # -- worker side -------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Generation] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue[0]
            delay = self.config.max_queue_delay_ms / 1000.0
            while len(self._queue) < self.config.max_batch and not self._closed:
                left = first.queued_at + delay - self.clock()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = [it for it in self._queue if it.key == first.key][:self.config.max_batch]
            chosen = {id(it) for it in batch}
            self._queue = [it for it in self._queue if id(it) not in chosen]
            self._busy = True
            return batch

    def _expire(self, batch: list[Generation]) -> list[Generation]:
        now, alive = self.clock(), []
        for it in batch:
            if now >= it.deadline:
                it.future.set_exception(RequestTimeout(
                    f"request exceeded the server's time limit of {self.config.request_timeout_s:g} s "
                    f"({now - it.queued_at:.1f} s since it arrived)"))
            else:
                alive.append(it)
        return alive

    def _run(self, batch: list[Generation]) -> None:
        deadline = min(it.deadline for it in batch)

        def on_step(_: int) -> None:
            if self.clock() >= deadline:
                raise _Expired

        t0 = time.perf_counter()
        try:
            result = self.family.run([it.options for it in batch], self.config.dit_batch_sizes, on_step)
        except _Expired:
            rest = self._expire(batch)
            log.warning("batch of %d abandoned at the time limit; %d generation(s) re-queued", len(batch), len(rest))
            with self._cv:
                self._queue[:0] = rest
            return
        except Exception as exc:  # a failure of the backend: every generation of the batch gets it
            log.exception("batch of %d failed", len(batch))
            for it in batch:
                it.future.set_exception(exc)
            return
        seconds = time.perf_counter() - t0
        key = batch[0].key
        log.info("stepped %d request(s) together (latent length %d, %d steps): %d model calls, %d rows, %.2f s",
                 len(batch), key.latent_length, key.steps, result.dit_calls, result.dit_rows, seconds)
        self.stats.batches += 1
        self.stats.generations += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.sizes[len(batch)] = self.stats.sizes.get(len(batch), 0) + 1
        for it, audio in zip(batch, result.audio):
            it.future.set_result(BatchOutput(audio=audio, sample_rate=result.sample_rate, batch_size=len(batch)))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                batch = self._expire(batch)
                if batch:
                    self._run(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


@dataclass(frozen=True)
class BatchOutput:
    audio: torch.Tensor  # [channels, samples]: 2 for SAO, 1 for the UNet family
    sample_rate: int
    batch_size: int  # how many generations were stepped together with this one


def results(futures: Sequence[Future], timeout: float) -> list[Any]:
    """Wait for every future; the first failure is raised after all have settled (none is left running)."""
    out, first_error = [], None
    for f in futures:
        try:
            out.append(f.result(timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - re-raised below
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return out
