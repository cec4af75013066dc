"""TLS, mutual TLS and bearer tokens, against real servers with certificates made here."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import TranslatorClient
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from service.security import load_tokens, token_ok
from tests.conftest import ServerThread
from tests.test_server_process import output, start

TOKEN = "s3cret-token-0123456789"


Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issuer | None,
    ca: bool = False,
    server: bool = False,
    names: tuple[str, ...] = ("localhost",),
) -> x509.Certificate:
    """A certificate for `name`, signed by `issuer` (else self-signed); a server's carries
    `names` and 127.0.0.1."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        san = [*(x509.DNSName(n) for n in names), ip]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert_pem(cert))
    path.with_suffix(".key").write_bytes(key_pem(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, None, ca=True)
    _write(d / "ca", ca, ca_key)
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, certificate(name, key, (ca.subject, ca_key), server=server), key)
    other_key = ec.generate_private_key(ec.SECP256R1())  # a client the CA never signed
    _write(d / "stranger", certificate("stranger", other_key, None), other_key)
    return d


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle: Path, pki: Path) -> Iterator[ServerThread]:
    tokens = pki / "tokens.txt"
    tokens.write_text(f"# one per line\n{TOKEN}\n")
    srv = ServerThread(
        tiny_bundle,
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"),
        auth_tokens_file=str(tokens),
    )
    srv.wait_serving()
    yield srv
    srv.stop()


def test_mutual_tls_and_token_accepts_the_right_client(mtls_server, pki) -> None:
    with TranslatorClient(
        mtls_server.target,
        tls_ca=str(pki / "ca.crt"),
        tls_cert=str(pki / "client.crt"),
        tls_key=str(pki / "client.key"),
        token=TOKEN,
    ) as c:
        assert c.translate(["twelve"]).results[0].token_ids


@pytest.mark.parametrize(
    ("cert", "token", "code"),
    [
        ("client", None, grpc.StatusCode.UNAUTHENTICATED),  # no token
        ("client", "wrong-token-0123456789", grpc.StatusCode.UNAUTHENTICATED),
        (None, TOKEN, grpc.StatusCode.UNAVAILABLE),  # no client certificate: handshake fails
        ("stranger", TOKEN, grpc.StatusCode.UNAVAILABLE),  # certificate from another CA
    ],
)
def test_refused_clients(mtls_server, pki, cert, token, code) -> None:
    crt = str(pki / f"{cert}.crt") if cert else None
    key = str(pki / f"{cert}.key") if cert else None
    with (
        TranslatorClient(
            mtls_server.target, tls_ca=str(pki / "ca.crt"), token=token, tls_cert=crt, tls_key=key
        ) as c,
        pytest.raises(grpc.RpcError) as e,
    ):
        c.translate(["twelve"])
    assert e.value.code() == code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        assert "bearer token" in e.value.details()
    # the server keeps serving the right client
    with TranslatorClient(
        mtls_server.target,
        tls_ca=str(pki / "ca.crt"),
        tls_cert=str(pki / "client.crt"),
        tls_key=str(pki / "client.key"),
        token=TOKEN,
    ) as c:
        assert c.model_info().decoder_layers == 2


def test_plaintext_client_is_refused(mtls_server) -> None:
    with TranslatorClient(mtls_server.target, token=TOKEN) as c, pytest.raises(grpc.RpcError) as e:
        c.translate(["twelve"])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def token_server(tiny_bundle: Path) -> Iterator[ServerThread]:
    srv = ServerThread(tiny_bundle, auth_tokens=f"{TOKEN},another-token-0123456789")
    srv.wait_serving()
    yield srv
    srv.stop()


def test_health_needs_no_token_but_everything_else_does(token_server) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(token_server.target) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        assert hs.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
        stub = pb_grpc.TranslatorStub(ch)
        for call in (
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest()),
            lambda: list(stub.TranslateStream(pb.TranslateRequest(sentences=["one"]))),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            ProtoReflectionDescriptorDatabase(ch).get_services()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", "Bearer another-token-0123456789"),)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md).heads == 4
        md = (("authorization", "bEaReR another-token-0123456789"),)  # RFC 7235: any case
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md).heads == 4
    # refused calls count in the request metrics (the servicer never sees them)
    registry = token_server.server.metrics.registry
    for method in ("GetModelInfo", "TranslateStream"):
        labels = {"method": method, "code": "UNAUTHENTICATED"}
        assert registry.get_sample_value("nmtserve_requests_total", labels) == 1


def test_token_helpers(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nfirst-token-0123456789\n")
    tokens = load_tokens(str(f), "second-token-0123456789, ")
    assert tokens == [b"first-token-0123456789", b"second-token-0123456789"]
    assert token_ok("Bearer second-token-0123456789", tokens)
    assert token_ok("bearer second-token-0123456789", tokens)  # the scheme is case-insensitive
    assert not token_ok("Basic second-token-0123456789", tokens)
    assert not token_ok("Bearer second-token-012345678", tokens)
    assert not token_ok("", tokens)
    with pytest.raises(ValueError, match="at least 16"):
        load_tokens("", "short")
    f.write_bytes("\ufefffirst-token-0123456789\n".encode())  # a byte-order mark is no token
    assert load_tokens(str(f)) == [b"first-token-0123456789"]
    f.write_bytes(b"first-token-\xff\xfe0123456789\n")  # not UTF-8: named, never quoted
    with pytest.raises(ValueError, match=f"auth tokens file {f} is not UTF-8") as err:
        load_tokens(str(f))
    assert "first-token" not in str(err.value) and "xff" not in str(err.value)
    for bad in ("token-with-umlaut-ü-0123", "token with spaces 0123456789"):
        with pytest.raises(ValueError, match="printable ASCII without spaces"):
            load_tokens("", bad)
    f.write_text("first-token-0123456789  # the CI's\n")  # text after it: no part of a token
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        load_tokens(str(f))


def test_message_size_limit(server) -> None:
    """gRPC itself refuses a request over --max-message-bytes, RESOURCE_EXHAUSTED, once it has
    handed the call to the server but before the server can read the request: to the server
    it looks like a call its client cancelled then, and it is counted CANCELLED (README,
    "Metrics")."""
    registry = server.server.metrics.registry
    labels = {"method": "Translate", "code": "CANCELLED"}

    def counted() -> float:
        return registry.get_sample_value("nmtserve_requests_total", labels) or 0

    before = counted()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.TranslatorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Translate(pb.TranslateRequest(sentences=["x" * (5 * 1024 * 1024)]), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Translate(pb.TranslateRequest(sentences=["one"]), timeout=30).results
    deadline = time.monotonic() + 10  # counted when the handler has ended, after the answer
    while counted() == before:
        assert time.monotonic() < deadline, "the refused call was not counted"
        time.sleep(0.01)
    assert counted() == before + 1


def test_service_loads_no_pickle_and_no_code() -> None:
    """Only ONNX, JSON and the SentencePiece model are read from a bundle."""
    import ast

    banned = {"pickle", "marshal", "dill", "joblib", "torch", "cloudpickle"}
    calls = {"eval", "exec", "__import__"}
    root = Path(__file__).resolve().parents[1] / "service"
    found = []
    for path in root.rglob("*.py"):
        if "proto_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.append(node.module)
                found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in calls:
                found.append(f"{path.name}: {node.func.id}()")  # type: ignore[attr-defined]
    assert found == []


@pytest.mark.parametrize("text", ["", "# only comments\n\n   \n# and blanks\n"])
def test_a_token_file_without_tokens_refuses_to_start(
    tiny_bundle: Path, tmp_path: Path, text: str
) -> None:
    f = tmp_path / "tokens"
    f.write_text(text)
    with pytest.raises(ValueError, match="has no tokens"):
        load_tokens(str(f))
    with pytest.raises(ValueError, match="lists no token"):
        load_tokens("", " , ")
    proc, _ = start(tiny_bundle, "--auth-tokens-file", str(f))
    assert proc.wait(60) == 2
    log = output(proc)
    assert f"auth tokens file {f} has no tokens" in log and "refusing to start" in log


def test_no_secret_in_help_or_logs(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {**os.environ, "NMTSERVE_AUTH_TOKENS": TOKEN}
    res = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "--auth-tokens" in res.stdout
    assert TOKEN not in res.stdout + res.stderr
    caplog.set_level(logging.INFO)
    srv = ServerThread(tiny_bundle, auth_tokens=TOKEN)
    srv.wait_serving()
    srv.stop()
    open_srv = ServerThread(tiny_bundle)
    open_srv.wait_serving()
    open_srv.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert "authentication: on, 1 bearer token(s) accepted" in lines
    assert "authentication: off (no tokens)" in lines
    assert not [line for line in lines if TOKEN in line]


def test_health_and_loadtest_reach_a_tls_server_with_a_token(mtls_server, pki, capsys) -> None:
    """Every client command has the TLS options (and loadtest the token): the container's
    health check and the load tester can reach a server with mutual TLS and tokens on. The
    health check takes them from the environment too (its command line is fixed in images)."""
    from service.cli import main as service_main
    from service.healthcheck import main as health_main

    tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
           "--tls-key", str(pki / "client.key")]  # fmt: skip
    assert health_main(["--target", mtls_server.target]) == 1  # plaintext: refused
    assert health_main(["--target", mtls_server.target, *tls]) == 0
    assert f"{mtls_server.target}: SERVING" in capsys.readouterr().out
    args = ["loadtest", "--target", mtls_server.target, "--concurrency", "2", "--requests", "6",
            "--warmup", "0", "--no-progress", *tls, "--token", TOKEN]  # fmt: skip
    assert service_main(args) == 0
    out = capsys.readouterr().out
    assert "| 6 |" in out and "| none |" in out, out
    no_token = [a for a in args if a not in ("--token", TOKEN)]
    assert service_main(no_token) == 0  # the run completes; its calls are refused and counted
    assert "UNAUTHENTICATED 6" in capsys.readouterr().out


def test_health_takes_its_tls_settings_from_the_environment(mtls_server, pki, monkeypatch) -> None:
    from service.healthcheck import main as health_main

    monkeypatch.setenv("NMTSERVE_HEALTH_TLS_CA", str(pki / "ca.crt"))
    monkeypatch.setenv("NMTSERVE_HEALTH_TLS_CERT", str(pki / "client.crt"))
    monkeypatch.setenv("NMTSERVE_HEALTH_TLS_KEY", str(pki / "client.key"))
    assert health_main(["--target", mtls_server.target]) == 0


def wait_healthy(proc: subprocess.Popen[str], target: str, *tls: str) -> None:
    """Until `python -m service health` with these TLS flags says SERVING (the server started by
    tests.test_server_process.start, which must keep running)."""
    import time

    from service.healthcheck import main as health_main

    deadline = time.monotonic() + 60
    while health_main(["--target", target, *tls]) != 0:
        assert proc.poll() is None, output(proc)
        assert time.monotonic() < deadline, output(proc)
        time.sleep(0.2)


def test_tls_and_tokens_from_the_environment_through_the_real_command_line(
    tiny_bundle: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: every serve setting is also an environment variable and the flag wins. Through
    `python -m service serve` itself: TLS from NMTSERVE_TLS_CERT / _KEY, tokens from
    NMTSERVE_AUTH_TOKENS overridden by --auth-tokens."""
    flag_token, env_token = "flag-token-0123456789", "env-token-0123456789"
    monkeypatch.setenv("NMTSERVE_TLS_CERT", str(pki / "server.crt"))
    monkeypatch.setenv("NMTSERVE_TLS_KEY", str(pki / "server.key"))
    monkeypatch.setenv("NMTSERVE_AUTH_TOKENS", env_token)
    proc, port = start(tiny_bundle, "--auth-tokens", flag_token, "--drain-delay-s", "0")
    try:
        target = f"127.0.0.1:{port}"
        wait_healthy(proc, target, "--tls-ca", str(pki / "ca.crt"))  # plaintext cannot reach it
        assert "TLS" in output(proc) and "1 bearer token(s) accepted" in output(proc)
        with TranslatorClient(target, tls_ca=str(pki / "ca.crt"), token=flag_token) as c:
            assert c.translate(["seven"]).results[0].translation
        with TranslatorClient(target, tls_ca=str(pki / "ca.crt"), token=env_token) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.translate(["seven"])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TranslatorClient(target, token=flag_token) as c, pytest.raises(grpc.RpcError):
            c.translate(["seven"])  # plaintext against the TLS port
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("given", ["flags", "environment"])
def test_mutual_tls_and_a_token_file_through_the_real_command_line(
    tiny_bundle: Path, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """README's TLS section through `python -m service serve` itself: mutual TLS and a token
    file given as flags, or as NMTSERVE_TLS_CERT / _KEY / _CLIENT_CA and
    NMTSERVE_AUTH_TOKENS_FILE. With flags, each variable is set too, to a value that would
    refuse the right client (a server certificate no client trusts, a client CA that signed
    no client, another token): the flags win."""
    tokens, others = tmp_path / "tokens", tmp_path / "other-tokens"
    tokens.write_text(f"{TOKEN}\n")
    others.write_text("another-token-0123456789\n")
    settings = {  # the right file, and the wrong one
        "tls-cert": (pki / "server.crt", pki / "stranger.crt"),
        "tls-key": (pki / "server.key", pki / "stranger.key"),
        "tls-client-ca": (pki / "ca.crt", pki / "stranger.crt"),
        "auth-tokens-file": (tokens, others),
    }
    right = {name: files[0] for name, files in settings.items()}
    env = right if given == "environment" else {n: f[1] for n, f in settings.items()}
    for name, path in env.items():
        monkeypatch.setenv("NMTSERVE_" + name.upper().replace("-", "_"), str(path))
    flags = [] if given == "environment" else [f"--{n}={p}" for n, p in right.items()]
    proc, port = start(tiny_bundle, "--drain-delay-s", "0", *flags)
    target = f"127.0.0.1:{port}"
    ca, cert, key = (str(pki / f) for f in ("ca.crt", "client.crt", "client.key"))
    try:
        wait_healthy(proc, target, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)
        assert "(mutual TLS; NOT_SERVING while loading)" in output(proc)
        assert "authentication: on, 1 bearer token(s) accepted" in output(proc)
        with TranslatorClient(target, tls_ca=ca, tls_cert=cert, tls_key=key, token=TOKEN) as c:
            assert c.translate(["seven"]).results[0].translation
        refused = {  # the client's token, certificate, and what it gets
            ("another-token-0123456789", "client"): grpc.StatusCode.UNAUTHENTICATED,
            (None, "client"): grpc.StatusCode.UNAUTHENTICATED,
            (TOKEN, None): grpc.StatusCode.UNAVAILABLE,  # no client certificate
            (TOKEN, "stranger"): grpc.StatusCode.UNAVAILABLE,  # one the CA did not sign
        }
        got = {}
        for token, who in refused:
            crt, k = (str(pki / f"{who}.crt"), str(pki / f"{who}.key")) if who else (None, None)
            with TranslatorClient(target, tls_ca=ca, tls_cert=crt, tls_key=k, token=token) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.translate(["seven"])
                got[token, who] = e.value.code()
        assert got == refused
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, output(proc)
