"""One scheduler for all requests: a bounded queue feeding continuous batching in decode lanes.

A lane is a decode thread that owns one running ``DecodeBatch`` (and its own ``Engine``; the
lanes share the onnxruntime sessions). Between two decoder steps a lane admits waiting
sentences into its batch (up to its share of the rows and ``max_batch_tokens`` source tokens,
oldest first, then the closest in length, to cut padding), and finished rows leave the batch at
once (their slots are reused, see ``service.engine``). Newcomers join a running batch in groups:
once half the lane's free rows can be filled, or the oldest has waited ``max_wait_ms`` or two
decoder steps. When a lane is empty it waits up to ``max_wait_ms`` for more sentences to
arrive before starting, so concurrent single-sentence calls share a batch.

With several lanes (``SchedulerConfig.lanes``), all take from the one queue and each admits up
to its fair share of the work in flight: ceil((queued + rows in every lane) / lanes) rows, at
most ``max_batch_rows``. So one call is decoded by one lane, and 64 concurrent ones by two
lanes of ~32 rows on a two-lane server. onnxruntime releases the GIL while it runs, so lanes
decode in parallel, and the asyncio server stays responsive beside them.

Expired and cancelled sentences never start, and are dropped from a running batch. A full
queue refuses new work at once (``QueueFull``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from service.engine import (
    DecodeBatch,
    EncodeStats,
    Engine,
    SentenceJob,
    SentenceResult,
    StepStats,
)
from service.runtime import Runtime

log = logging.getLogger("nmtserve.scheduler")


class QueueFull(Exception):
    """The bounded queue cannot take these sentences now."""


class DeadlineExceeded(Exception):
    """The sentence's deadline passed before it finished."""


class Cancelled(Exception):
    """The caller went away; the sentence was dropped."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new work."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 1024  # sentences waiting, at most
    max_batch_rows: int = 64  # rows decoded together, at most
    max_batch_tokens: int = 8192  # source tokens in the running batch, at most
    max_wait_ms: float = 5.0  # how long an idle scheduler waits to fill a first batch
    lanes: int = 1  # batches decoded in parallel, each in its own thread (0: see plan_lanes)

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.max_batch_rows < 1 or self.max_batch_tokens < 1:
            raise ValueError("queue and batch limits must be positive")
        if self.lanes < 0:
            raise ValueError("lanes must be ≥ 0")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be ≥ 0")


@dataclass
class _Pending:
    job: SentenceJob
    future: Future[SentenceResult]


class _Lane:
    """One decode thread's state: its engine, running batch rows and step time."""

    def __init__(self, index: int, engine: Engine) -> None:
        self.index = index
        self.engine = engine
        self.running: dict[int, _Pending] = {}  # id(job) → pending, for rows in its batch
        self.rows = 0  # live rows in its batch, as of its last admission check
        self.step_s = 0.0  # moving average of a decoder step's time
        self.thread: threading.Thread | None = None


class Observer:
    """Hooks for metrics; the default does nothing."""

    def queue_depth(self, n: int) -> None: ...
    def admitted(self, stats: EncodeStats) -> None: ...
    def stepped(self, stats: StepStats) -> None: ...
    def finished(self, result: SentenceResult) -> None: ...
    def dropped(self, reason: str) -> None: ...


class Scheduler:
    """The queue and its decode lanes: one engine per lane (``Scheduler.over`` makes them),
    or one engine for a single lane."""

    def __init__(
        self,
        engine: Engine | list[Engine],
        cfg: SchedulerConfig | None = None,
        observer: Observer | None = None,
    ) -> None:
        engines = engine if isinstance(engine, list) else [engine]
        self.cfg = cfg or SchedulerConfig()
        if self.cfg.lanes not in (0, len(engines)):
            raise ValueError(f"{self.cfg.lanes} lanes configured, {len(engines)} engines given")
        self.engine = engines[0]
        self.obs = observer or Observer()
        self._lanes = [_Lane(i, e) for i, e in enumerate(engines)]
        # A lane's rows when the work is spread evenly: the group sizes it waits for
        self._lane_rows = -(-self.cfg.max_batch_rows // len(self._lanes))
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.fault: Callable[[DecodeBatch], None] | None = None  # test hook: raise in a step

    @classmethod
    def over(
        cls, runtime: Runtime, cfg: SchedulerConfig, observer: Observer | None = None
    ) -> Scheduler:
        """cfg.lanes engines over one runtime (onnxruntime sessions take concurrent runs), each
        first allocating its cache for its share of the rows. lanes 0 counts as 1 here: resolve
        "auto" with ``service.runtime.plan_lanes`` first, as the translator does."""
        lanes = max(1, cfg.lanes)
        capacity = -(-cfg.max_batch_rows // lanes)
        limits = runtime.bundle.limits
        log.info("%d decode lane(s), %d intra-op thread(s) each", lanes, runtime.threads)
        return cls([Engine(runtime, limits, capacity) for _ in range(lanes)], cfg, observer)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        for lane in self._lanes:
            name = "nmtserve-decode" + (f"-{lane.index}" if len(self._lanes) > 1 else "")
            lane.thread = threading.Thread(target=self._loop, args=(lane,), name=name, daemon=True)
            lane.thread.start()

    def submit(self, jobs: list[SentenceJob]) -> list[Future[SentenceResult]]:
        """Queues all the jobs or none: QueueFull when they do not fit."""
        futures: list[Future[SentenceResult]] = []
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is draining")
            to_queue = [j for j in jobs if j.source_ids and j.limit > 0]
            if len(self._queue) + len(to_queue) > self.cfg.max_queue:
                raise QueueFull(
                    f"queue full: {len(self._queue)} of {self.cfg.max_queue} sentences waiting"
                )
            for job in jobs:
                fut: Future[SentenceResult] = Future()
                futures.append(fut)
                if job.source_ids and job.limit > 0:
                    self._queue.append(_Pending(job, fut))
                else:
                    fut.set_result(self.engine.empty_result(job))
            self.obs.queue_depth(len(self._queue))
            if to_queue:  # wake an idle lane only when there is work for it
                self._cond.notify()
        return futures

    def stop(self, timeout: float | None = None) -> bool:
        """Refuses new work, finishes what was accepted, then ends the thread. Returns whether
        everything finished within timeout."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for lane in self._lanes:
            if lane.thread is not None:
                lane.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(lane.thread is not None and lane.thread.is_alive() for lane in self._lanes)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ the decode thread

    def _loop(self, lane: _Lane) -> None:
        engine = lane.engine
        batch: DecodeBatch | None = None
        while True:
            admit = self._take(lane, batch)
            if admit is None:  # stopping, nothing left anywhere
                return
            try:
                if admit:
                    batch = engine.admit(batch, [p.job for p in admit])
                    for p in admit:
                        lane.running[id(p.job)] = p
                    assert engine.last_encode is not None
                    self.obs.admitted(engine.last_encode)
                if batch is None:
                    continue
                if self.fault is not None:
                    self.fault(batch)
                done, batch, stats = engine.step(batch)
                lane.step_s = 0.9 * lane.step_s + 0.1 * stats.seconds
                self.obs.stepped(stats)
                for job, res in done:
                    p = lane.running.pop(id(job))
                    if not p.future.done():
                        p.future.set_result(res)
                    self.obs.finished(res)
                batch = self._drop_dead(lane, batch)
            except Exception as e:  # one failing batch fails only its own sentences
                log.exception("decode batch failed")
                failed = list(lane.running.values()) + (admit or [])
                for p in failed:
                    if not p.future.done():
                        p.future.set_exception(e)
                lane.running.clear()
                batch = None

    def _share(self, lane: _Lane) -> int:
        """The most rows this lane should hold now: its fair share of the work in flight."""
        if len(self._lanes) == 1:
            return self.cfg.max_batch_rows
        total = len(self._queue) + sum(x.rows for x in self._lanes)
        return max(1, min(self.cfg.max_batch_rows, -(-total // len(self._lanes))))

    def _take(self, lane: _Lane, batch: DecodeBatch | None) -> list[_Pending] | None:
        """Waits when idle, then picks sentences to admit: [] for none, None to exit."""
        with self._cond:
            lane.rows = len(batch.live) if batch is not None else 0
            if batch is None:
                while not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait(0.5)
                # Idle: give concurrent callers max_wait_ms to arrive and share this batch.
                oldest = self._queue[0].job.enqueued_at
                wait_until = oldest + self.cfg.max_wait_ms / 1000.0
                while len(self._queue) < self._lane_rows and not self._stopping:
                    left = wait_until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            running = batch.live_rows() if batch is not None else []
            rows = len(running)
            tokens = sum(r.source_len for r in running)
            share = self._share(lane)
            if not self._queue or rows >= share:
                return []
            if rows and not self._stopping:
                # A running batch takes newcomers in groups: each admission is an encoder run,
                # and small encoder batches cost up to 2.5x more per sentence. So wait until
                # half the lane's free rows (of its even share of max_batch_rows) can be
                # filled, or the oldest sentence has waited
                # max_wait_ms or two decoder steps, whichever is longer (measured: +25%
                # throughput on a d256 3+3 model at concurrency 64; a newcomer's latency grows
                # by at most two steps).
                free = self._lane_rows - rows
                waited = time.monotonic() - self._queue[0].job.enqueued_at
                patience = max(self.cfg.max_wait_ms / 1e3, 2 * lane.step_s)
                if len(self._queue) < max(1, free // 2) and waited < patience:
                    return []
            now = time.monotonic()
            live: list[_Pending] = []
            for p in self._queue:
                # Expiry first: a passed deadline also cancels the call on the gRPC side.
                if p.job.expired(now):
                    p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    self.obs.dropped("deadline")
                elif p.job.cancelled.is_set():
                    p.future.set_exception(Cancelled("cancelled before it started"))
                    self.obs.dropped("cancelled")
                else:
                    live.append(p)
            if not live:
                self._queue.clear()
                self.obs.queue_depth(0)
                return []
            # Oldest first (fairness), then the closest source lengths (less padding).
            ref = len(live[0].job.source_ids)
            order = [live[0], *sorted(live[1:], key=lambda p: abs(len(p.job.source_ids) - ref))]
            chosen: list[_Pending] = []
            for p in order:
                n = len(p.job.source_ids)
                if rows + len(chosen) >= share:
                    break
                if chosen and tokens + n > self.cfg.max_batch_tokens:
                    continue
                if not chosen and rows and tokens + n > self.cfg.max_batch_tokens:
                    break  # the running batch must shrink first
                chosen.append(p)
                tokens += n
            taken = {id(p) for p in chosen}
            self._queue = deque(p for p in live if id(p) not in taken)
            lane.rows = rows + len(chosen)
            self.obs.queue_depth(len(self._queue))
            if self._queue and len(self._lanes) > 1:
                self._cond.notify()  # another lane may take what this one left
            return chosen

    def _drop_dead(self, lane: _Lane, batch: DecodeBatch | None) -> DecodeBatch | None:
        """Rows whose caller cancelled or whose deadline passed leave the batch now."""
        if batch is None:
            return None
        now = time.monotonic()
        for i in batch.live:
            job = batch.rows[i].job  # type: ignore[union-attr]
            if job.cancelled.is_set() or job.expired(now):
                p = lane.running.pop(id(job))
                reason = "deadline" if job.expired(now) else "cancelled"
                exc: Exception = (
                    Cancelled("cancelled while decoding")
                    if reason == "cancelled"
                    else DeadlineExceeded("deadline passed while decoding")
                )
                if not p.future.done():
                    p.future.set_exception(exc)
                self.obs.dropped(reason)
                batch.release(i)
        return batch if batch.live else None
