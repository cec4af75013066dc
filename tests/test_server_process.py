"""The server as users run it: `python -m service serve` in its own process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(bundle: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "service", "serve", "--bundle", str(bundle)),
            *("--host", "127.0.0.1", "--port", str(port), *args),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, port


def wait_serving(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                r = hs.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError("server never reported SERVING")


def test_sigterm_under_load_completes_every_accepted_request(tiny_bundle: Path) -> None:
    metrics_port = free_port()
    proc, port = start(tiny_bundle, "--metrics-port", str(metrics_port), "--grace-s", "20")
    try:
        wait_serving(port, proc)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert "nmtserve_queue_depth" in body and "nmtserve_decode_steps_total" in body
        assert 'nmtserve_encoder_positions_total{kind="token"}' in body  # the warm-up's

        results: list[str] = []
        lock = threading.Lock()
        stop_sending = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.TranslatorStub(ch)
                while not stop_sending.is_set():
                    try:
                        r = stub.Translate(
                            pb.TranslateRequest(sentences=["four thousand and twelve"] * 8),
                            timeout=30,
                        )
                        outcome = "ok" if len(r.results) == 8 else "short"
                    except grpc.RpcError as e:
                        outcome = e.code().name
                        if outcome != "UNAVAILABLE":
                            outcome += f" ({e.details()})"
                    with lock:
                        results.append(outcome)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        stop_sending.set()
        for t in threads:
            t.join(60)
        code = proc.wait(60)
        log = proc.stdout.read() if proc.stdout else ""
        assert code == 0, log
        assert "draining" in log and "drained, exiting" in log
        ok = results.count("ok")
        assert ok > 0
        # Every call is either completed in full or refused at the door (never cut off).
        # Every call the server accepted completed: none of its handlers saw a cancellation.
        # Calls racing the shutdown are refused at the door — UNAVAILABLE, or CANCELLED when
        # HTTP/2 resets a stream the server never started (the log proves it never started).
        assert "request cancelled" not in log, log
        refused = {r.split(" ")[0] for r in results if r != "ok"}
        assert refused <= {"UNAVAILABLE", "CANCELLED"}, results
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_refuses_a_corrupt_bundle_naming_the_file(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    with (bad / "encoder.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    proc, _ = start(bad)
    code = proc.wait(60)
    out = proc.stdout.read() if proc.stdout else ""
    assert code == 2
    assert "encoder.onnx: sha256 does not match manifest.json" in out


def test_refuses_a_missing_bundle(tmp_path: Path) -> None:
    proc, _ = start(tmp_path / "nowhere")
    assert proc.wait(60) == 2
    assert "the bundle directory does not exist" in (proc.stdout.read() if proc.stdout else "")


@pytest.mark.parametrize("precision", ["int8"])
def test_serves_int8_graphs(tiny_bundle: Path, precision: str) -> None:
    proc, port = start(tiny_bundle, "--precision", precision)
    try:
        wait_serving(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.TranslatorStub(ch)
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).precision == "int8"
            assert stub.Translate(pb.TranslateRequest(sentences=["twelve"])).results[0].token_ids
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_serves_with_io_binding_from_the_environment(tiny_bundle: Path) -> None:
    """NMTSERVE_IO_BINDING=on: the IO-binding path (what CUDA uses) serves the same tokens."""
    sentences = ["twelve", "three hundred and four", "ninety-nine thousand"]
    got = {}
    for mode in ("off", "on"):
        os.environ["NMTSERVE_IO_BINDING"] = mode
        os.environ["NMTSERVE_KV_CACHE"] = "concat"  # IO binding is for the concat decoder
        try:
            proc, port = start(tiny_bundle, "--provider", "cpu")
        finally:
            del os.environ["NMTSERVE_IO_BINDING"], os.environ["NMTSERVE_KV_CACHE"]
        try:
            wait_serving(port, proc)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.TranslatorStub(ch)
                resp = stub.Translate(pb.TranslateRequest(sentences=sentences))
                got[mode] = [list(r.token_ids) for r in resp.results]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        log = proc.stdout.read() if proc.stdout else ""
        assert ("(IO binding)" in log) == (mode == "on"), log
    assert got["on"] == got["off"] and all(got["on"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "tokenizer.model: missing"),
        ("version", "format_version 99 is not supported"),
        ("listed", "decoder.onnx: used but not listed in manifest.json"),
    ],
)
def test_refuses_a_missing_or_mismatched_file(
    tiny_bundle: Path, tmp_path: Path, damage: str, message: str
) -> None:
    import json

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if damage == "missing":
        (bad / "tokenizer.model").unlink()
    elif damage == "version":
        manifest["format_version"] = 99
    else:
        del manifest["files"]["decoder.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    proc, _ = start(bad)
    assert proc.wait(60) == 2
    assert message in (proc.stdout.read() if proc.stdout else "")
