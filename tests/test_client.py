"""service.client and service.client_cli against a fake in-process Translator server (no model,
no onnxruntime).

The fake echoes sentences upper-cased, so every test can check order and alignment exactly;
the end-to-end tests against the real server live with the server's tests.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.client import (
    SERVICE_CONFIG,
    TranslatorClient,
    attention_array,
    attention_matrix,
    resolve_target,
)
from service.client_cli import add_translate_args, run_translate
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

# A 2×3 [target, source] matrix whose rows sum to 1, like real cross-attention.
ATTENTION = [0.7, 0.2, 0.1, 0.1, 0.3, 0.6]


class FakeTranslator(pb_grpc.TranslatorServicer):
    """Echoes sentences upper-cased and records what each call carried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[pb.TranslateRequest] = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request: pb.TranslateRequest, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.requests.append(request)
            self.metadata.append({k: v for k, v in context.invocation_metadata()})
        for i, sentence in enumerate(request.sentences):
            if sentence == "BAD":
                violation = error_details_pb2.BadRequest.FieldViolation(
                    field=f"sentences[{i}]", description="over the source limit"
                )
                detail = any_pb2.Any()
                detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
                status = status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT,
                    message="a sentence is too long",
                    details=[detail],
                )
                context.abort_with_status(rpc_status.to_status(status))

    @staticmethod
    def _result(index: int, sentence: str, options: pb.TranslateOptions) -> pb.TranslationResult:
        result = pb.TranslationResult(
            index=index,
            translation=sentence.upper(),
            token_ids=[ord(c) for c in sentence.upper()],
            finish_reason="eos",
        )
        if options.return_pieces:
            result.source_pieces.extend(["▁a", "b", "</s>"])
            result.target_pieces.extend(["▁A", "B"])
        if options.attention != pb.ATTENTION_NONE:
            result.attention.shape.extend([2, 3])
            result.attention.values.extend(ATTENTION)
        if options.return_scores:
            result.sequence_log_prob = -1.5
        if options.return_alignment:
            result.alignment.extend([0, 2])
            result.alignment_pharaoh = "0-0 2-1"
        return result

    def Translate(
        self, request: pb.TranslateRequest, context: grpc.ServicerContext
    ) -> pb.TranslateResponse:
        self._record(request, context)
        return pb.TranslateResponse(
            results=[self._result(i, s, request.options) for i, s in enumerate(request.sentences)],
            request_id=request.request_id or "fake-id",
        )

    def TranslateStream(
        self, request: pb.TranslateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TranslationResult]:
        self._record(request, context)
        # Last sentence first: the client must rely on `index`, not arrival order.
        for i in reversed(range(len(request.sentences))):
            yield self._result(i, request.sentences[i], request.options)

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        self._record(pb.TranslateRequest(), context)
        return pb.ModelInfo(vocab_size=200, decoder_layers=2, max_sentences_per_request=64)


@dataclass
class Fake:
    port: int
    servicer: FakeTranslator
    target: str = field(init=False)

    def __post_init__(self) -> None:
        self.target = f"127.0.0.1:{self.port}"

    def batch_sizes(self) -> list[int]:
        return [len(r.sentences) for r in self.servicer.requests]


def start_fake() -> tuple[grpc.Server, Fake]:
    servicer = FakeTranslator()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_TranslatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, Fake(port, servicer)


@pytest.fixture
def fake() -> Iterator[Fake]:
    server, handle = start_fake()
    try:
        yield handle
    finally:
        server.stop(None)


def run(fake: Fake, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_translate_args(parser)
    return run_translate(parser.parse_args(["--target", fake.target, "--timeout", "10", *argv]))


def test_positional_sentences_print_in_order(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "one", "two", "three") == 0
    assert capsys.readouterr().out.splitlines() == ["ONE", "TWO", "THREE"]
    assert fake.batch_sizes() == [3]


def test_file_keeps_empty_lines(
    fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.txt"
    path.write_text("first\n\nthird\n", encoding="utf-8")
    assert run(fake, "--file", str(path)) == 0
    assert capsys.readouterr().out.split("\n") == ["FIRST", "", "THIRD", ""]
    assert list(fake.servicer.requests[0].sentences) == ["first", "", "third"]


def test_stdin_is_read_when_no_sentences(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a\r\nb\n"))
    assert run(fake) == 0
    assert capsys.readouterr().out.splitlines() == ["A", "B"]


def test_batches_chunk_the_input_and_keep_order(
    fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.txt"
    path.write_text("".join(f"s{i}\n" for i in range(5)), encoding="utf-8")
    assert run(fake, "--file", str(path), "--batch", "2") == 0
    assert capsys.readouterr().out.splitlines() == [f"S{i}" for i in range(5)]
    assert fake.batch_sizes() == [2, 2, 1]


def test_stream_prints_global_indices(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "--stream", "--batch", "2", "a", "b", "c") == 0
    lines = capsys.readouterr().out.splitlines()
    # Arrival order within a request is the server's (reversed here); indices are global.
    assert lines == ["1\tB", "0\tA", "2\tC"]


def test_json_output_parses(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "--json", "--scores", "x", "y") == 0
    response = json.loads(capsys.readouterr().out)
    assert [r["translation"] for r in response["results"]] == ["X", "Y"]
    assert [r["index"] for r in response["results"]] == [0, 1]  # zero is printed too
    assert response["results"][0]["sequence_log_prob"] == -1.5
    assert response["request_id"] == "fake-id"
    # Only what the response holds: no empty attention, pieces or alignment nobody asked for
    assert set(response["results"][1]) == {
        "index", "translation", "token_ids", "sequence_log_prob", "finish_reason"
    }  # fmt: skip

    assert run(fake, "--json", "--batch", "1", "x", "y") == 0
    chunks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["results"][0]["translation"] for c in chunks] == ["X", "Y"]


def test_text_extras_are_tab_separated(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "--scores", "--alignment", "--pieces", "ab") == 0
    assert capsys.readouterr().out == "AB\t-1.5000\t0-0 2-1\t▁a b </s>\t▁A B\n"


def test_info_prints_json(fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "--info") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 200
    assert info["max_sentences_per_request"] == 64


def test_attention_png(fake: Fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "attention.png"
    assert run(fake, "--attention-png", str(png), "ab", "cd") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["AB", "CD"]
    assert str(png) in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    options = fake.servicer.requests[0].options
    assert options.attention == pb.ATTENTION_LAYER_AVERAGE
    assert options.return_pieces


def test_bad_request_prints_field_violations(
    fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "fine", "BAD") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: INVALID_ARGUMENT: a sentence is too long" in captured.err
    assert "sentences[1]: over the source limit" in captured.err


def test_unavailable_names_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    server, dead = start_fake()
    server.stop(None)  # nothing listens on the port any more
    assert run(dead, "x") == 1
    err = capsys.readouterr().err
    assert "error: UNAVAILABLE" in err
    assert dead.target in err


def test_token_is_sent_as_bearer_metadata(
    fake: Fake, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NMTSERVE_TOKEN", raising=False)
    assert run(fake, "--token", "s3cret", "x") == 0
    assert fake.servicer.metadata[-1]["authorization"] == "Bearer s3cret"

    monkeypatch.setenv("NMTSERVE_TOKEN", "from-env")
    assert run(fake, "x") == 0
    assert fake.servicer.metadata[-1]["authorization"] == "Bearer from-env"
    assert run(fake, "--token", "s3cret", "x") == 0  # the flag wins over the variable
    assert fake.servicer.metadata[-1]["authorization"] == "Bearer s3cret"

    monkeypatch.delenv("NMTSERVE_TOKEN")
    assert run(fake, "x") == 0
    assert "authorization" not in fake.servicer.metadata[-1]
    capsys.readouterr()


def test_resolve_target() -> None:
    assert resolve_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert resolve_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target("localhost:1, localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert resolve_target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    for bad in ("127.0.0.1,127.0.0.1:2", "127.0.0.1:x,127.0.0.1:2", "127.0.0.1:1,[::1]:2"):
        with pytest.raises(ValueError):
            resolve_target(bad)


def test_comma_target_round_robins_over_replicas() -> None:
    servers = [start_fake() for _ in range(2)]
    try:
        target = ",".join(f"127.0.0.1:{fake.port}" for _, fake in servers)
        with TranslatorClient(target, timeout=10) as client:
            assert client.channel_target.startswith("ipv4:127.0.0.1:")
            assert ("grpc.service_config", SERVICE_CONFIG) in client.options
            for _ in range(20):
                assert client.translate(["x"]).results[0].translation == "X"
        assert all(fake.batch_sizes() for _, fake in servers), "a replica got no call"
    finally:
        for server, _ in servers:
            server.stop(None)


def test_library_calls(fake: Fake) -> None:
    with TranslatorClient(fake.target, timeout=10) as client:
        response = client.translate(
            ["ab"], attention="layer-heads", attention_layer=-1, request_id="r1"
        )
        assert response.request_id == "r1"
        sent = fake.servicer.requests[-1].options
        assert sent.attention == pb.ATTENTION_LAYER_HEADS
        assert sent.HasField("attention_layer") and sent.attention_layer == -1
        matrix = attention_array(response.results[0])
        assert matrix.shape == (2, 3)
        np.testing.assert_allclose(matrix.sum(axis=1), [1.0, 1.0], rtol=1e-6)

        client.translate(["ab"])
        assert not fake.servicer.requests[-1].options.HasField("attention_layer")

        streamed = sorted(client.translate_stream(["a", "b"]), key=lambda r: r.index)
        assert [r.translation for r in streamed] == ["A", "B"]
        assert client.model_info().decoder_layers == 2
        with pytest.raises(ValueError):
            client.translate(["a"], attention="sideways")  # type: ignore[arg-type]


def test_attention_matrix_reduces_heads_and_layers() -> None:
    result = pb.TranslationResult()
    values = np.arange(2 * 2 * 2 * 3, dtype=np.float32)
    result.attention.shape.extend([2, 2, 2, 3])
    result.attention.values.extend(values.tolist())
    expected = values.reshape(2, 2, 2, 3)
    np.testing.assert_allclose(attention_matrix(result), expected[-1].mean(axis=0))
    np.testing.assert_allclose(attention_matrix(result, layer=0), expected[0].mean(axis=0))
    assert attention_array(pb.TranslationResult()).size == 0


def test_attention_png_without_matplotlib(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    assert run(fake, "--attention-png", str(tmp_path / "a.png"), "x") == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert fake.servicer.requests == []  # checked before any work is sent
