"""Overload: offered load at 10× capacity. The excess is refused at once with
RESOURCE_EXHAUSTED, the queue stays bounded, accepted requests meet their deadlines, and the
server serves normally once the load drops."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.conftest import ServerThread


def test_ten_times_capacity(tiny_bundle: Path) -> None:
    srv = ServerThread(
        tiny_bundle,
        max_queue_tokens=32,
        max_call_tokens=32,
        max_batch_rows=8,
        max_wait_ms=1.0,
    )
    srv.wait_serving()
    sched = srv.scheduler
    # A known, small capacity: every decoder step takes ≥ 100 ms, so ≤ 8 rows × 10 steps/s.
    # (Small, so that the load generator in this process is never the bottleneck.)
    sched.fault = lambda _b: time.sleep(0.1)
    try:
        # Capacity measured first, closed loop.
        async def closed(seconds: float) -> float:
            done = 0
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = pb_grpc.TranslatorStub(ch)
                end = time.monotonic() + seconds

                async def worker() -> None:
                    nonlocal done
                    while time.monotonic() < end:
                        await stub.Translate(pb.TranslateRequest(sentences=["seven"]), timeout=10)
                        done += 1

                await asyncio.gather(*(worker() for _ in range(8)))
            return done / seconds

        capacity = asyncio.run(closed(2.0))
        assert capacity > 5

        # Open loop at 10× capacity for 2 s.
        async def flood(rate: float, seconds: float) -> list[tuple[str, float]]:
            out: list[tuple[str, float]] = []
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = pb_grpc.TranslatorStub(ch)

                async def one() -> None:
                    t = time.monotonic()
                    try:
                        await stub.Translate(pb.TranslateRequest(sentences=["seven"]), timeout=5)
                        out.append(("OK", time.monotonic() - t))
                    except grpc.aio.AioRpcError as e:
                        out.append((e.code().name, time.monotonic() - t))

                tasks = []
                start = time.monotonic()
                n = int(rate * seconds)
                for i in range(n):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one()))
                    assert sched.queued_tokens <= 32  # the queue never grows past its bound
                await asyncio.gather(*tasks)
            return out

        results = asyncio.run(flood(10 * capacity, 2.0))
        codes = [c for c, _ in results]
        refused = [t for c, t in results if c == "RESOURCE_EXHAUSTED"]
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, set(codes)  # no deadline missed
        assert codes.count("OK") > 0
        assert len(refused) > len(results) / 2
        accepted = [t for c, t in results if c == "OK"]
        print(
            f"capacity {capacity:.0f}/s, offered {10 * capacity:.0f}/s: {len(accepted)} OK, "
            f"{len(refused)} refused; refusal p50 {np.percentile(refused, 50) * 1e3:.0f} ms, "
            f"p99 {np.percentile(refused, 99) * 1e3:.0f} ms; accepted p50 "
            f"{np.percentile(accepted, 50) * 1e3:.0f} ms"
        )
        # Refused at once, not after queueing behind the accepted work.
        assert float(np.percentile(refused, 99)) < 0.1
        assert float(np.percentile(refused, 99)) < 0.25 * float(np.percentile(accepted, 50))
    finally:
        sched.fault = None
    # Recovery: the load is gone, the server serves normally with an empty queue.
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.TranslatorStub(ch)
        resp = stub.Translate(pb.TranslateRequest(sentences=["seven", "twelve"]), timeout=10)
        assert len(resp.results) == 2
    assert sched.queued == 0
    srv.stop()
