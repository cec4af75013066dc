"""Test doubles for the decoder: steps that stall or fail, so that tests reach states a tiny
model decodes too fast to show. They wrap the engines from outside; production code has no
hooks for them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from service.engine import DecodeBatch, Engine
from service.scheduler import Scheduler


@contextmanager
def before_each_step(scheduler: Scheduler, hook: Callable[[], None]) -> Iterator[None]:
    """Calls hook() ahead of every decoder step of the scheduler's lanes while the block runs:
    a hook that sleeps stalls the steps, one that raises fails the batch."""
    engines = {id(lane.engine): lane.engine for lane in scheduler._lanes}.values()
    for engine in engines:

        def step(batch: DecodeBatch, _step: Callable[[DecodeBatch], Any] = engine.step) -> Any:
            hook()
            return _step(batch)

        engine.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        for engine in engines:
            del engine.step  # back to Engine.step


def fail_once(message: str) -> Callable[[], None]:
    """A hook that raises RuntimeError(message) at the first step it sees, then lets steps run."""
    left = [1]

    def hook() -> None:
        if left:
            left.pop()
            raise RuntimeError(message)

    return hook


def slow_server() -> int:
    """``python -m tests.doubles SECONDS serve ...``: the server as users start it, except that
    every decoder step takes at least SECONDS (a known, small capacity for overload tests)."""
    from service.cli import main

    seconds = float(sys.argv.pop(1))
    step = Engine.step

    def slow(self: Engine, batch: DecodeBatch) -> Any:
        time.sleep(seconds)
        return step(self, batch)

    Engine.step = slow  # type: ignore[method-assign]
    return main()


if __name__ == "__main__":
    sys.exit(slow_server())
