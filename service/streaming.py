"""TranslateStream's flow control. A stream decodes ahead of what its client has read by at
most a window of bytes (the worst-case sizes of the results in flight), and all streams
together by at most the server's stream buffer: a client that never reads holds one window,
not every result of its call, and streams that would overrun the buffer are refused at once.
Everything here runs on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

from service.engine import SentenceJob, SentenceResult
from service.scheduler import DeadlineExceeded, QueueFull, Ticket
from service.translator import RequestOptions, Translator

WINDOW_BYTES = 16 * 1024 * 1024  # one stream's results in flight, at most (or its largest one)


class StreamsFull(Exception):
    """The streams in progress hold the whole stream buffer."""


class StreamBuffer:
    """Bytes reserved by the streams in progress for results their clients have not read."""

    def __init__(self, total: int, observe: Callable[[int], None] = lambda used: None) -> None:
        self.total = total
        self.used = 0
        self.streams = 0
        self._observe = observe  # told the bytes in use after each change (a metrics gauge)

    def reserve(self, n: int) -> None:
        if self.used + n > self.total:
            raise StreamsFull(
                f"{self.streams} stream(s) in progress hold {self.used:,} of the server's "
                f"{self.total:,} bytes for results their clients have not read yet; this "
                f"stream needs {n:,}"
            )
        self.used += n
        self.streams += 1
        self._observe(self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self.streams -= 1
        self._observe(self.used)


def _arrived(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int], i: int, _: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
        loop.call_soon_threadsafe(queue.put_nowait, i)


async def stream(
    tr: Translator,
    jobs: list[SentenceJob],
    opts: RequestOptions,
    buffer: StreamBuffer,
    patience: float | None,
    write: Callable[[int, SentenceResult], Awaitable[None]],
) -> int:
    """Decodes the jobs and writes each result as it finishes, keeping at most a window of
    results in flight: the next sentences are queued as earlier results are written. On any
    failure, or when the call goes away, the unfinished sentences are dropped."""
    bounds = [tr.result_bytes(j, opts) for j in jobs]
    window = min(sum(bounds), max(WINDOW_BYTES, max(bounds)), buffer.total)
    buffer.reserve(window)
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
        buffer.release(window)
    return len(jobs)
