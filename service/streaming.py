"""Results that clients have not received yet, bounded. Every call reserves the worst-case
size of its results in the server's result buffer before any decoding, and gives it back when
the call has ended (its answer sent, or the call gone): a client that does not read its
answers holds its reservation, not more, and calls that would overrun the buffer are refused
at once. A stream decodes ahead of what its client has read by at most a window (the
worst-case sizes of the results in flight), so it reserves one window, not its whole call.
Everything here runs on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from service.engine import SentenceJob, SentenceResult
from service.scheduler import DeadlineExceeded, QueueFull, Ticket
from service.translator import Translator

WINDOW_BYTES = 16 * 1024 * 1024  # one stream's results in flight, at most (or its largest one)


class ResultsFull(Exception):
    """The calls in progress hold the whole result buffer."""


class ResultBuffer:
    """Bytes reserved by the calls in progress for results their clients have not received.
    Streams together may hold at most half of it, so that streams whose clients stopped
    reading cannot refuse Translate calls, and one client connection at most a quarter, so
    that one client cannot lock the others out."""

    def __init__(self, total: int, observe: Callable[[int], None] = lambda used: None) -> None:
        self.total = total
        self.used = 0
        self.calls = 0
        self.streamed = 0  # of `used`, held by streams
        self.by_peer: dict[str, int] = {}  # of `used`, per client connection
        self._observe = observe  # told the bytes in use after each change (a metrics gauge)

    def _refusal(self, n: int, stream: bool, peer: str) -> str | None:
        """Why n more bytes do not fit, or None."""
        if self.used + n > self.total:
            return (
                f"{self.calls} call(s) in progress hold {self.used:,} of the server's "
                f"{self.total:,} bytes"
            )
        if stream and self.streamed + n > self.total // 2:
            return (
                f"streams in progress hold {self.streamed:,} of the {self.total // 2:,} bytes "
                "streams may hold"
            )
        if self.by_peer.get(peer, 0) + n > self.total // 4:
            return (
                f"this client connection's calls hold {self.by_peer[peer]:,} of the "
                f"{self.total // 4:,} bytes one connection may hold"
            )
        return None

    def reserve(self, n: int, stream: bool = False, peer: str = "") -> None:
        why = self._refusal(n, stream, peer)
        if why is not None:
            raise ResultsFull(
                f"{why} for results their clients have not received yet; this call needs {n:,}"
            )
        self._add(n, stream, peer, 1)

    def release(self, n: int, stream: bool = False, peer: str = "") -> None:
        self._add(-n, stream, peer, -1)

    def _add(self, n: int, stream: bool, peer: str, calls: int) -> None:
        self.used += n
        self.calls += calls
        self.streamed += n if stream else 0
        left = self.by_peer.get(peer, 0) + n
        if left:
            self.by_peer[peer] = left
        else:
            self.by_peer.pop(peer, None)
        self._observe(self.used)

    def hold(self, n: int, context: Any, stream: bool = False) -> None:
        """Reserves n bytes until the call ends (gRPC calls back when its status is sent or
        the call is gone), whatever the handler does meanwhile."""
        peer = str(context.peer())
        self.reserve(n, stream, peer)
        context.add_done_callback(lambda _: self.release(n, stream, peer))


def window_bytes(bounds: list[int], total: int) -> int:
    """A stream's window: the worst-case sizes of its results, at most WINDOW_BYTES (or its
    largest result) and what one connection may hold (a quarter of the buffer, ``total``)."""
    return min(sum(bounds), max(WINDOW_BYTES, max(bounds)), total // 4)


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    """Runs fn on the event loop, from a decode thread; a loop that has closed (the server
    stopped) has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _arrived(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int], i: int, _: object) -> None:
    on_loop(loop, queue.put_nowait, i)


async def stream(
    tr: Translator,
    jobs: list[SentenceJob],
    bounds: list[int],
    window: int,
    patience: float | None,
    write: Callable[[int, SentenceResult], Awaitable[None]],
) -> int:
    """Decodes the jobs and writes each result as it finishes, keeping at most a window of
    results in flight: the next sentences are queued as earlier results are written. On any
    failure, or when the call goes away, the unfinished sentences are dropped. bounds: each
    result's worst-case size; the caller has reserved the window (``window_bytes``) in the
    result buffer."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[int] = asyncio.Queue()
    futures: dict[int, Future[SentenceResult]] = {}
    tickets: list[Ticket] = []
    queued = ahead = 0  # sentences queued so far; bytes of results in flight

    def fill() -> None:
        nonlocal queued, ahead
        end, more = queued, ahead
        while end < len(jobs) and more + bounds[end] <= window:
            more += bounds[end]
            end += 1
        if end == queued:
            return
        try:
            ticket = tr.queue(jobs[queued:end])
        except QueueFull:
            if futures:  # results are still coming: try again after the next one
                return
            raise
        tickets.append(ticket)
        for k, f in enumerate(ticket.futures, start=queued):
            futures[k] = f
            f.add_done_callback(functools.partial(_arrived, loop, arrived, k))
        queued, ahead = end, more

    timer = None if patience is None else loop.call_later(patience, arrived.put_nowait, -1)
    try:
        fill()
        for _ in jobs:
            i = await arrived.get()
            if i < 0:
                raise DeadlineExceeded("deadline passed before the translation finished")
            await write(i, futures.pop(i).result())  # result() raises its failure
            ahead -= bounds[i]
            fill()
    except BaseException:
        for ticket in tickets:
            ticket.cancel()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    return len(jobs)
