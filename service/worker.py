"""Decoding in a child process, apart from the gRPC event loop (``--decode-in process``).

The scheduler, the engine and the onnxruntime sessions run in a process of their own (started
with ``spawn``: no gRPC state is forked). ``DecodeProcess`` stands in for ``Scheduler`` in the
server: the same ``start``/``submit``/``stop``, futures resolved as sentences finish. The point
is the interpreter lock: in one process every decoder step has to win the lock back from the
event loop between onnxruntime calls. Measured on the d256 model, scheduler alone at
concurrency 64 beside a Python loop busy 35% of the time: -8% with the loop in another
process, -22% with it in a thread of the same process.

Between the two processes: pipes in each direction carrying pickled lists of messages.
Down: ``("submit", [(key, source_ids, limit, options, deadline), ...])``,
``("cancel", [key, ...])``, ``("stop", timeout)``. Up: ``("ready", RuntimeInfo)`` or
``("error", message)`` once, then ``("done", key, SentenceResult)``, ``("failed", key, (kind,
text))``, ``("obs", hook, args)`` for the metrics, and ``("stopped", ok)`` last. The pipes
pickle only these messages between the server's own two processes; nothing read from a bundle
is ever unpickled. Deadlines
cross as ``time.monotonic()`` values (one clock for every process on Linux). A job's
``cancelled`` event, set by the server when the caller goes away, sends a cancel message.

The bounded queue is enforced here, before sending: at most ``max_queue_tokens`` source tokens
beyond the ``max_batch_tokens`` being decoded are in the child at once. If the child dies
(killed, crashed), every sentence in it fails, calls get an error, new calls are refused
(UNAVAILABLE) while a new child starts, and the server keeps serving.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.bundle import load_bundle
from service.engine import (
    EncodeStats,
    SentenceJob,
    SentenceResult,
    StepStats,
    empty_result,
)
from service.logs import current_setup, setup_logging
from service.runtime import Runtime, RuntimeConfig
from service.scheduler import (
    Cancelled,
    DeadlineExceeded,
    Observer,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    ShuttingDown,
    Ticket,
    settle,
)

log = logging.getLogger("nmtserve.worker")


@dataclass(frozen=True)
class RuntimeInfo:
    """What the server reports of the runtime it cannot see (it lives in the child)."""

    provider: str
    inplace: bool
    n_layers: int
    n_heads: int
    threads: int  # intra-op threads of each lane
    packing: str
    lanes: int

    @classmethod
    def of(cls, rt: Runtime, lanes: int) -> RuntimeInfo:
        return cls(rt.provider, rt.inplace, rt.n_layers, rt.n_heads, rt.threads, rt.packing, lanes)


class DecodeProcessDied(ShuttingDown):
    """The decode process is gone; a new one is starting."""


# ----------------------------------------------------------------------------- server side


class _Cancel(threading.Event):
    """A job's cancelled flag that also tells the child."""

    def __init__(self, owner: DecodeProcess, key: int) -> None:
        super().__init__()
        self._owner, self._key = owner, key

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._owner._cancel(self._key)


def _cancel_all(jobs: list[SentenceJob]) -> None:
    for job in jobs:
        job.cancelled.set()  # a _Cancel: tells the child


class DecodeProcess:
    """Stands in for ``Scheduler``; the scheduler itself runs in a child process."""

    def __init__(
        self,
        bundle_dir: Path,
        runtime_cfg: RuntimeConfig,
        cfg: SchedulerConfig,
        observer: Observer | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.runtime_cfg = runtime_cfg
        self.cfg = cfg
        self.obs = observer or Observer()
        self.info: RuntimeInfo | None = None
        self._lock = threading.Lock()  # _pending, _stopping, _alive, and sending
        self._pending: dict[int, tuple[SentenceJob, Future[SentenceResult]]] = {}
        self._pending_tokens = 0
        self._keys = itertools.count()
        self._stopping = False
        self._alive = False
        self._stopped_ok = False
        self._queued = 0
        self._proc: Any = None
        self._down: _Outbox | None = None
        self._reader: threading.Thread | None = None
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Starts the child and waits until its sessions are loaded and warmed up."""
        ctx = mp.get_context("spawn")
        down_r, down_w = ctx.Pipe(duplex=False)
        up_r, up_w = ctx.Pipe(duplex=False)
        # The bound is kept here; the child queues whatever it is sent (as one call per batch).
        bound = self.cfg.max_queue_tokens + self.cfg.max_batch_tokens
        child_cfg = replace(self.cfg, max_queue_tokens=bound, max_call_tokens=bound)
        proc = ctx.Process(
            target=_child_main,
            args=(down_r, up_w, str(self.bundle_dir), self.runtime_cfg, child_cfg, current_setup()),
            name="nmtserve-decode",
            daemon=True,
        )
        proc.start()
        down_r.close()
        up_w.close()
        try:
            kind, body = up_r.recv()[0]
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the decode process exited with code {proc.exitcode}") from None
        if kind == "error":
            proc.join(5)
            raise RuntimeError(f"the decode process could not start: {body}")
        self.info = body
        with self._lock:
            self._proc, self._down, self._alive = proc, _Outbox(down_w), True
        self._reader = threading.Thread(
            target=self._read, args=(up_r, proc), name="nmtserve-decode-reader", daemon=True
        )
        self._reader.start()
        log.info("decoding in process %d", proc.pid)

    def stop(self, timeout: float | None = None) -> bool:
        """Refuses new work, lets the child finish what it holds, then ends it."""
        with self._lock:
            self._stopping = True
            if self._proc is None:  # never started: nothing to finish
                return True
            if self._alive:
                self._send(("stop", timeout))
        if self._reader is not None:
            self._reader.join(None if timeout is None else timeout + 10)
        if self._down is not None:
            self._down.close()
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        return self._stopped_ok and not self._pending

    # ------------------------------------------------------------------ requests

    def submit(self, jobs: list[SentenceJob]) -> Ticket:
        """Sends all the jobs or none: QueueFull when they do not fit."""
        futures: list[Future[SentenceResult]] = []
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is draining")
            if not self._alive:
                raise DecodeProcessDied("the decode process is restarting")
            tokens = sum(len(j.source_ids) for j in jobs if j.limit > 0)
            bound = self.cfg.max_queue_tokens + self.cfg.max_batch_tokens
            if self._pending_tokens + tokens > bound:
                raise QueueFull(
                    f"queue full: {self._pending_tokens} source tokens in the decoder, at most "
                    f"{self.cfg.max_queue_tokens} waiting beside {self.cfg.max_batch_tokens} "
                    "decoding"
                )
            assert self.info is not None
            batch = []
            for job in jobs:
                fut: Future[SentenceResult] = Future()
                futures.append(fut)
                if not (job.source_ids and job.limit > 0):
                    settle(fut, empty_result(job, self.info.n_layers, self.info.n_heads))
                    continue
                key = next(self._keys)
                job.cancelled = _Cancel(self, key)
                self._pending[key] = (job, fut)
                self._pending_tokens += len(job.source_ids)
                batch.append((key, job.source_ids, job.limit, job.options, job.deadline))
            if batch:
                self._send(("submit", batch))
        return Ticket(jobs, futures, _cancel_all)

    @property
    def queued(self) -> int:
        """Sentences waiting in the child's queue, as it last reported."""
        return self._queued

    @property
    def lanes(self) -> int:
        return self.cfg.lanes

    def _cancel(self, key: int) -> None:
        with self._lock:
            if key in self._pending and self._alive:
                self._send(("cancel", [key]))

    def _send(self, msg: tuple[Any, ...]) -> None:  # with self._lock held
        """Queues a message for the child; a thread sends what has gathered as one batch, so
        the sentences of concurrent calls reach the child's scheduler together."""
        assert self._down is not None
        self._down.put(msg)

    # ------------------------------------------------------------------ results

    def _read(self, up: Connection, proc: Any) -> None:
        while True:
            try:
                msgs = up.recv()
            except (EOFError, OSError):
                break
            for msg in msgs:
                self._handle(msg)
        up.close()
        proc.join(10)
        with self._lock:
            self._alive = False
            stopping = self._stopping
            lost = list(self._pending.values())
            self._pending.clear()
            self._pending_tokens = 0
        if lost:
            error: Exception = (
                ShuttingDown("the server stopped before this sentence finished")
                if stopping
                else RuntimeError(f"the decode process exited with code {proc.exitcode}")
            )
            for _, fut in lost:
                settle(fut, error=error)
        if not stopping:
            log.error("the decode process exited with code %s; starting a new one", proc.exitcode)
            self._restart()

    def _restart(self) -> None:
        while not self._stopping:
            try:
                self.start()
                self.restarts += 1
                return
            except Exception:
                log.exception("could not start a new decode process; retrying in 1s")
                time.sleep(1.0)

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "done" or kind == "failed":
            with self._lock:
                entry = self._pending.pop(msg[1], None)
                if entry is not None:
                    self._pending_tokens -= len(entry[0].source_ids)
            if entry is None:
                return
            fut = entry[1]
            if kind == "done":
                settle(fut, msg[2])
                self.obs.finished(msg[2])
            else:
                settle(fut, error=_failure_in(*msg[2]))
        elif kind == "obs":
            hook, args = msg[1], msg[2]
            if hook == "queue_depth":
                self._queued = args[0]
            getattr(self.obs, hook)(*args)
        elif kind == "stopped":
            self._stopped_ok = bool(msg[1])


# ----------------------------------------------------------------------------- child side


class _Outbox:
    """Messages to the server, sent in batches from a thread of their own."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.items: deque[tuple[Any, ...]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="nmtserve-outbox", daemon=True)
        self.thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                batch = list(self.items)
                self.items.clear()
                closed = self.closed
            if batch:
                try:
                    self.conn.send(batch)
                except OSError:  # the other process is gone; its reader reports that
                    return
            if closed:
                return


_FAILURES: dict[str, type[Exception]] = {
    "DeadlineExceeded": DeadlineExceeded,
    "Cancelled": Cancelled,
}


def _failure_out(exc: BaseException) -> tuple[str, str]:
    """A failure crosses as (kind, text): no exception object of any class travels."""
    name = type(exc).__name__
    return (name, str(exc)) if name in _FAILURES else ("RuntimeError", f"{name}: {exc}")


def _failure_in(kind: str, text: str) -> Exception:
    return _FAILURES.get(kind, RuntimeError)(text)


class _Forward(Observer):
    """The child's scheduler hooks, sent up to the server's metrics (finished: with results)."""

    def __init__(self, out: _Outbox) -> None:
        self.out = out

    def queue_depth(self, n: int) -> None:
        self.out.put(("obs", "queue_depth", (n,)))

    def admitted(self, stats: EncodeStats) -> None:
        self.out.put(("obs", "admitted", (stats,)))

    def stepped(self, stats: StepStats) -> None:
        self.out.put(("obs", "stepped", (stats,)))

    def dropped(self, reason: str) -> None:
        self.out.put(("obs", "dropped", (reason,)))


def _child_main(
    down: Connection, up: Connection, bundle_dir: str, runtime_cfg: RuntimeConfig,
    cfg: SchedulerConfig, logs: tuple[str, str],
) -> None:  # fmt: skip
    # The server process handles signals and tells this one when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(*logs)
    try:
        bundle = load_bundle(bundle_dir)
        rt = Runtime(bundle, runtime_cfg)
        rt.warm_up()
        out = _Outbox(up)
        sched = Scheduler.over(rt, cfg, _Forward(out))
    except Exception as e:
        up.send([("error", f"{type(e).__name__}: {e}")])
        return
    up.send([("ready", RuntimeInfo.of(rt, sched.lanes))])
    sched.start()
    jobs: dict[int, SentenceJob] = {}

    def finished(key: int, fut: Future[SentenceResult]) -> None:
        jobs.pop(key, None)
        exc = fut.exception()
        if exc is not None:
            out.put(("failed", key, _failure_out(exc)))
        else:
            out.put(("done", key, fut.result()))

    while True:
        try:
            msgs = down.recv()
        except (EOFError, OSError):  # the server is gone
            sched.stop(0)
            return
        submits: list[Any] = []  # consecutive submits go to the scheduler as one group
        for kind, body in [*msgs, ("flush", None)]:
            if kind == "submit":
                submits += body
                continue
            if submits:
                _child_handle("submit", submits, sched, jobs, finished, out)
                submits = []
            if kind != "flush" and not _child_handle(kind, body, sched, jobs, finished, out):
                return


def _child_handle(
    kind: str,
    body: Any,
    sched: Scheduler,
    jobs: dict[int, SentenceJob],
    finished: Callable[[int, Future[SentenceResult]], None],
    out: _Outbox,
) -> bool:
    """One message from the server; False once the child should exit."""
    if kind == "submit":
        # Queued from now: the scheduler's waits (max_wait_ms, patience) count time in its
        # queue, as in a thread of the server; the trip through the pipe is not queueing.
        now = time.monotonic()
        new = [
            SentenceJob(ids, limit, opts, deadline, enqueued_at=now)
            for _, ids, limit, opts, deadline in body
        ]
        for (key, *_), job in zip(body, new, strict=True):
            jobs[key] = job
        for (key, *_), fut in zip(body, sched.submit(new).futures, strict=True):
            fut.add_done_callback(functools.partial(finished, key))
    elif kind == "cancel":
        sched.cancel([jobs[key] for key in body if key in jobs])
    elif kind == "stop":
        ok = sched.stop(body)
        out.put(("stopped", ok))
        out.close()
        return False
    return True
