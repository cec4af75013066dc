"""The result buffer and TranslateStream's flow control against a client that never reads (a
real server, real grpc.aio clients): the server decodes one window ahead and no more, refuses
that connection what would overrun its share, serves other clients, and cancelling the stream
gives everything back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

BUFFER = 1_000_000  # bytes; one connection may hold a quarter: ~20 of the tiny model's results
LONG = " ".join(["three hundred and twenty-one"] * 4)  # 24 source tokens, the tiny limit
# Full attention of every layer and head on 160 long sentences: ~2 MB of worst-case results.
HEAVY = pb.TranslateRequest(
    sentences=[LONG] * 160, options=pb.TranslateOptions(attention=pb.ATTENTION_ALL_LAYERS)
)
# A client that reads nothing: without BDP probing its flow-control window stays 64 KiB, so
# the server's writes block soon after the window is full (with probing grpc grows it to MBs).
NO_BDP = [("grpc.http2.bdp_probe", 0)]


@pytest.fixture(scope="module")
def buffered(tiny_bundle: Path) -> Iterator[ServerThread]:
    limits = {"result_buffer_bytes": BUFFER, "max_message_bytes": BUFFER // 4}
    srv = ServerThread(tiny_bundle, lanes=1, metrics_port=0, **limits)
    srv.wait_serving()
    yield srv
    srv.stop()


def finished(srv: ServerThread) -> float:
    """Sentences the server has decoded so far (its nmtserve_sentences counter)."""
    return sum(
        s.value
        for m in srv.server.metrics.registry.collect()
        for s in m.samples
        if s.name == "nmtserve_sentences_total"
    )


def test_a_client_that_never_reads_holds_one_window(buffered: ServerThread) -> None:
    sv = buffered.server.servicer
    assert sv is not None
    share = BUFFER // 4  # what one client connection may hold

    async def scenario() -> None:
        async with (
            grpc.aio.insecure_channel(buffered.target, options=NO_BDP) as slow,
            grpc.aio.insecure_channel(buffered.target) as other,
        ):
            stub, other_stub = pb_grpc.TranslatorStub(slow), pb_grpc.TranslatorStub(other)
            before = finished(buffered)
            stalled = stub.TranslateStream(HEAVY)  # never read
            deadline = time.monotonic() + 20
            while True:  # until the server has stopped decoding for it
                seen = finished(buffered)
                await asyncio.sleep(0.5)
                if finished(buffered) == seen > before or time.monotonic() > deadline:
                    break
            decoded = finished(buffered) - before
            # One window (a connection's share over the worst-case size of a result) and what
            # the client's transport took; the old server decoded all 160 at once.
            assert 0 < decoded < 80, decoded
            assert sv.results.used == sv.results.streamed == share
            # More from the same connection does not fit: refused at once, naming why.
            small = pb.TranslateRequest(sentences=["one two"])
            for call in (stub.TranslateStream(HEAVY), stub.Translate(small)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        async for _ in call:
                            pass
                    else:
                        await call
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this client connection's calls hold" in (err.value.details() or "")
            # Another client is served, streams and Translate calls alike, and each call gives
            # its reservation back when it ends.
            indexes = [r.index async for r in other_stub.TranslateStream(HEAVY, timeout=60)]
            assert sorted(indexes) == list(range(160))
            for _ in range(3):
                ok = await other_stub.Translate(small, timeout=10)
                assert ok.results[0].translation
            await settled(lambda: sv.results.calls == 1)
            assert sv.results.used == share
            stalled.cancel()
            await settled(lambda: sv.results.used == 0)
            assert sv.results.calls == 0 and sv.results.by_peer == {}
            # Everything given back: the same heavy stream, read, now arrives whole.
            indexes = [r.index async for r in stub.TranslateStream(HEAVY, timeout=60)]
            assert sorted(indexes) == list(range(160))
            await settled(lambda: sv.results.used == 0)

    asyncio.run(scenario())
    assert buffered.server.metrics.result_buffer._value.get() == 0
    assert sv.results.used == 0 and sv.results.calls == 0


async def settled(done: Callable[[], bool]) -> None:
    """Waits (≤ 4 s) for done(): a call's reservation is given back once gRPC has ended it,
    on the server's loop, just after its client has seen the end."""
    for _ in range(200):
        if done():
            return
        await asyncio.sleep(0.02)


def test_a_deadline_passing_while_blocked_in_a_write_frees_the_reservation(
    buffered: ServerThread,
) -> None:
    """gRPC resets a call whose deadline passes while its answer waits for a client that does
    not read: its reservation is given back and the call counts as DEADLINE_EXCEEDED (not
    CANCELLED, which it was counted as)."""
    sv = buffered.server.servicer
    assert sv is not None
    requests = buffered.server.metrics.requests
    before = requests.labels("TranslateStream", "DEADLINE_EXCEEDED")._value.get()

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(buffered.target, options=NO_BDP) as slow:
            stalled = pb_grpc.TranslatorStub(slow).TranslateStream(HEAVY, timeout=1.5)
            await settled(lambda: sv.results.used > 0)
            assert sv.results.used == BUFFER // 4
            await asyncio.sleep(1.6)
            await settled(lambda: sv.results.used == 0)
            assert sv.results.used == 0 and sv.results.calls == 0
            assert await stalled.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            counted = requests.labels("TranslateStream", "DEADLINE_EXCEEDED")._value
            await settled(lambda: counted.get() == before + 1)  # when the handler has ended
            assert counted.get() == before + 1, [
                (m.labels, m.value)
                for f in buffered.server.metrics.registry.collect()
                for m in f.samples
                if m.name == "nmtserve_requests_total"
            ]

    asyncio.run(scenario())
