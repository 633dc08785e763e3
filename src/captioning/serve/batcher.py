"""Micro-batching: requests that arrive within a few milliseconds are captioned as one batch.

One worker thread owns the model: no model per request, no two threads in one session. It takes
the oldest waiting request, waits up to `max_batch_delay_s` after that request arrived for others
with the same batch key (the same decoding options: greedy with greedy, the same beam size), up to
`max_batch_size` of them, and captions them in one call. Requests with other options wait their
turn in arrival order; a sampling request (key None) is never batched, so its seed draws what
`Captioner.caption` alone draws. The queue is bounded: `submit` past `max_queue` waiting requests
raises `QueueFull` at once (the caller answers 503 + Retry-After). A batch that raises is captioned
again one request at a time, so one input that breaks it fails only its own request.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds `max_queue` requests (or the server is stopping); retry after a while."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    source: object                  # what caption_fn takes: an opened image
    keywords: dict                  # Captioner.caption's keyword arguments
    key: tuple | None               # batch key; None: alone
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """`caption_fn(sources, keywords) -> results` (one per source, in order) run on one thread."""

    def __init__(self, caption_fn: Callable[[list, dict], list], *, max_batch_size: int = 8,
                 max_batch_delay_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int, float], None] | None = None,
                 warmup: Callable[[], None] | None = None):
        self.caption_fn, self.on_batch, self.warmup = caption_fn, on_batch, warmup
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.delay = max_batch_delay_s
        self.ready = threading.Event()          # warmed up: /ready says so
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._batch_s = 0.0                     # moving average of a batch's seconds
        self._thread = threading.Thread(target=self._run, name="caption-worker", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._jobs)

    def retry_after_s(self) -> int:
        """A guess at when the queue will have room: its batches times a batch's seconds."""
        batches = math.ceil(max(self.depth, 1) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_s))

    def full(self) -> bool:
        return self._closing or len(self._jobs) >= self.max_queue

    def submit(self, source, keywords: dict, key: tuple | None) -> Job:
        job = Job(source, keywords, key)
        with self._cond:
            if self._closing:
                raise QueueFull("the server is stopping", self.retry_after_s())
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting, "
                                f"--max-queue): retry later", self.retry_after_s())
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    def forget(self, job: Job) -> None:
        """A request that stopped waiting (timed out): out of the queue if it is still there."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass
        job.future.cancel()

    def close(self, timeout_s: float | None = None) -> None:
        """Caption what is queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        if self.warmup is not None:
            self.warmup()
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if live:
                start = time.monotonic()
                self._caption(live)
                seconds = time.monotonic() - start
                self._batch_s = 0.8 * (self._batch_s or seconds) + 0.2 * seconds
                if self.on_batch is not None:
                    self.on_batch(len(live), seconds)

    def _next_batch(self) -> list[Job] | None:
        """The oldest request and those that may share its batch, once the batch is full or the
        oldest has waited `delay`; None once closing and empty."""
        with self._cond:
            while not self._jobs:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._jobs[0]
            while True:
                batch = [first] if first.key is None else \
                    [job for job in self._jobs if job.key == first.key][:self.max_batch_size]
                left = first.enqueued + self.delay - time.monotonic()
                if first.key is None or len(batch) >= self.max_batch_size or left <= 0 \
                        or self._closing or first not in self._jobs:
                    break
                self._cond.wait(left)
            for job in batch:
                if job in self._jobs:
                    self._jobs.remove(job)
            return batch

    def _caption(self, jobs: list[Job]) -> None:
        try:
            results = self.caption_fn([job.source for job in jobs], jobs[0].keywords)
        except Exception as e:  # noqa: BLE001 -- it goes to the request(s) that caused it
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            for job in jobs:                    # which one broke it? each alone
                self._caption([job])
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)
