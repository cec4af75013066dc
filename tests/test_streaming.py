"""TranslateStream's flow control against a client that never reads (a real server, a real
grpc.aio client): the server decodes one window ahead and no more, the stream buffer refuses
what would overrun it, and cancelling the stream gives everything back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

BUFFER = 1_000_000  # bytes; streams may hold half: ~40 of the tiny model's longest results
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
    limits = {"result_buffer_bytes": BUFFER, "max_message_bytes": BUFFER // 2}
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

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(buffered.target, options=NO_BDP) as ch:
            stub = pb_grpc.TranslatorStub(ch)
            before = finished(buffered)
            stalled = stub.TranslateStream(HEAVY)  # never read
            deadline = time.monotonic() + 20
            while True:  # until the server has stopped decoding for it
                seen = finished(buffered)
                await asyncio.sleep(0.5)
                if finished(buffered) == seen > before or time.monotonic() > deadline:
                    break
            decoded = finished(buffered) - before
            # One window (BUFFER / 2 over the worst-case size of a result) and what the
            # client's transport took; the old server decoded all 160 at once.
            assert 0 < decoded < 120, decoded
            assert sv.results.used == sv.results.streamed == BUFFER // 2
            # A second stream does not fit in the buffer: refused at once, naming it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.TranslateStream(HEAVY):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "not received yet" in (err.value.details() or "")
            # Translate calls are not held up by it (streams may hold half the buffer); each
            # gives its reservation back when it ends.
            for _ in range(3):
                ok = await stub.Translate(pb.TranslateRequest(sentences=["one two"]), timeout=10)
                assert ok.results[0].translation
            assert sv.results.used == BUFFER // 2 and sv.results.calls == 1
            stalled.cancel()
            for _ in range(200):  # the handler's finally runs on the server's loop
                if sv.results.used == 0:
                    break
                await asyncio.sleep(0.02)
            assert sv.results.used == 0 and sv.results.calls == 0
            # Everything given back: the same heavy stream, read, now arrives whole.
            indexes = [r.index async for r in stub.TranslateStream(HEAVY, timeout=60)]
            assert sorted(indexes) == list(range(160))

    asyncio.run(scenario())
    gauge = buffered.server.metrics.result_buffer._value
    for _ in range(200):  # the last call's reservation is given back once gRPC has ended it
        if gauge.get() == 0:
            break
        time.sleep(0.01)
    assert gauge.get() == 0 and sv.results.used == 0 and sv.results.calls == 0
