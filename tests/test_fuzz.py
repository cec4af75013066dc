"""Property-based fuzzing of a real server: any text, any size, any option values.

The server never crashes or hangs; every answer is OK (one well-formed result per sentence) or
INVALID_ARGUMENT with a field violation. The default run tries FUZZ_EXAMPLES (60) requests;
``make fuzz-long`` runs 10,000.

Lone surrogates cannot travel: protobuf strings are UTF-8 and the client refuses to encode
them, so they never reach the wire (tested too).
"""

from __future__ import annotations

import os

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.conftest import ServerThread

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))

WORDS = ["one", "two", "hundred", "thousand", "and", "twenty-", "seven", ",", "😀", "مرحبا"]
ODD = st.characters(codec="utf-8", categories=["Cc", "Cf", "Mn", "Zs"])  # control, format, …
texts = st.one_of(
    st.text(max_size=60),  # any code point (no surrogates: they are not valid UTF-8)
    st.text(alphabet=ODD, max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join),
    st.sampled_from(["", " ", "\x00", "\u202e", "x" * 5000, "seven " * 60]),
)
options = st.builds(
    pb.TranslateOptions,
    max_output_tokens=st.integers(0, 40),
    attention=st.integers(0, 5),  # 4 and 5 are not modes
    return_pieces=st.booleans(),
    return_scores=st.booleans(),
    return_alignment=st.booleans(),
)
layers = st.one_of(st.none(), st.integers(-4, 4))


@pytest.fixture(scope="module")
def fuzz_stub(server: ServerThread):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.TranslatorStub(ch), health_pb2_grpc.HealthStub(ch)


def check_response(req: pb.TranslateRequest, resp: pb.TranslateResponse) -> None:
    assert len(resp.results) == len(req.sentences)
    for i, r in enumerate(resp.results):
        assert r.index == i
        assert r.finish_reason in {"eos", "length", "empty"}
        cap = req.options.max_output_tokens or 24
        assert len(r.token_ids) <= cap
        n = 1
        for d in r.attention.shape:
            n *= d
        assert len(r.attention.values) == (n if r.attention.shape else 0)
        assert bool(r.attention.shape) == (req.options.attention in (1, 2, 3))
        if req.options.return_alignment:
            assert len(r.alignment) == len(r.token_ids)
        if req.options.return_scores:
            assert len(r.token_log_probs) == len(r.token_ids)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(sentences=st.lists(texts, max_size=45), opts=options, layer=layers)
def test_any_request_gets_a_result_or_a_clear_error(fuzz_stub, sentences, opts, layer) -> None:
    stub, health = fuzz_stub
    if layer is not None:
        opts.attention_layer = layer
    req = pb.TranslateRequest(sentences=sentences, options=opts)
    try:
        resp = stub.Translate(req, timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        status = rpc_status.from_call(e)
        assert status is not None and status.details
        br = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(br)
        assert br.field_violations and all(v.description for v in br.field_violations)
    else:
        check_response(req, resp)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_lone_surrogates_never_reach_the_wire() -> None:
    with pytest.raises(ValueError):
        pb.TranslateRequest(sentences=["\ud800"]).SerializeToString()
