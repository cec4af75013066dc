"""Test doubles for the decoder: steps that stall or fail, and rows that run to their limit,
so that tests reach states a tiny model decodes too fast to show. They wrap the engines from
outside; production code has no hooks for them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle import Limits
from service.engine import DecodeBatch, Engine, Row, SentenceJob
from service.runtime import Runtime
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


@dataclass
class Exact(SentenceJob):
    """A sentence that runs to its limit: an ExactLength engine never lets it choose EOS."""


class ExactLength(Engine):
    """An engine whose Exact rows never choose EOS (the best other token instead), so that they
    run exactly to their limit whatever the model says: long rows on a tiny model, and the
    fixed output lengths of benchmarks/engines.py. The production engine has no such option:
    this one masks the logits its runtime returns."""

    def __init__(self, runtime: Runtime, limits: Limits, capacity: int = 64) -> None:
        super().__init__(_NoEos(runtime, self), limits, capacity)  # type: ignore[arg-type]
        self.rows: list[Row | None] = []

    def step(self, batch: DecodeBatch) -> Any:
        tidy = batch.tidy()  # Engine.step tidies too: a tidy batch stays as it is
        if tidy is None:
            return super().step(batch)
        self.rows = tidy.rows  # row i of the runtime's logits
        return super().step(tidy)


class _NoEos:
    """The runtime, with EOS masked in the logits of the engine's Exact rows."""

    def __init__(self, runtime: Runtime, engine: ExactLength) -> None:
        self._rt, self._engine = runtime, engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def _mask(self, logits: np.ndarray) -> None:
        for i, row in enumerate(self._engine.rows):
            if row is not None and isinstance(row.job, Exact):
                logits[i, self._rt.eos_id] = -np.inf

    def step(self, *args: Any) -> Any:
        out = self._rt.step(*args)
        self._mask(out[0])
        return out

    def step_inplace(self, *args: Any) -> Any:
        out = self._rt.step_inplace(*args)
        self._mask(out[0])
        return out


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
