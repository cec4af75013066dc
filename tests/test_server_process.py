"""The server as users run it: `python -m service serve` in its own process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import client
from service.client import TranslatorClient
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, free_port

REPO = Path(__file__).resolve().parents[1]


_LOGS: dict[int, IO[str]] = {}


def output(proc: subprocess.Popen[str]) -> str:
    """Everything the server printed so far (a file, not a pipe: a busy server never blocks on
    a full pipe nobody reads)."""
    f = _LOGS[proc.pid]
    f.seek(0)
    return f.read()


def start(
    bundle: Path,
    *args: str,
    port: int = 0,
    step_s: float = 0.0,
    host: str = "127.0.0.1",
    wrap: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], int]:
    """`python -m service serve` on host (a loopback address); step_s > 0: every decoder step
    takes at least that long (tests.doubles.slow_server); wrap: a command that runs it
    (`taskset -c 0`)."""
    port = port or free_port()
    launcher = ("-m", "tests.doubles", str(step_s)) if step_s else ("-m", "service")
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(
        [
            *(*wrap, sys.executable, *launcher, "serve", "--bundle", str(bundle)),
            *("--host", host, "--port", str(port), *args),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _LOGS[proc.pid] = log
    return proc, port


def wait_serving(
    port: int, proc: subprocess.Popen[str], timeout: float = 60, host: str = "127.0.0.1"
) -> None:
    try:
        client.wait_serving(f"{host}:{port}", proc, timeout)
    except RuntimeError as e:
        raise AssertionError(f"{e}\n{output(proc)}") from e


class Load:
    """Client threads calling Translate in a loop through the project's client (round_robin,
    health-checked, UNAVAILABLE retried), each outcome read from the call's own response."""

    def __init__(self, target: str, threads: int, sentences: int = 8) -> None:
        self.outcomes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = TranslatorClient(target, timeout=30)
        self._sentences = ["four thousand and twelve"] * sentences
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self._client.translate(self._sentences)
                outcome = "ok" if len(r.results) == len(self._sentences) else "short"
            except grpc.RpcError as e:
                outcome = f"{e.code().name} ({e.details()})"
            with self._lock:
                self.outcomes.append(outcome)
            if outcome != "ok":
                time.sleep(0.05)  # a refused caller backs off a little

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self._client.close()
        return self.outcomes


def test_sigterm_under_load_completes_every_accepted_request(tiny_bundle: Path) -> None:
    """64 concurrent clients, SIGTERM: NOT_SERVING for the drain delay while calls are still
    served, then new calls are refused, every accepted call finishes, exit 0. Every call ends
    OK or UNAVAILABLE, none CANCELLED."""
    metrics_port = free_port()
    proc, port = start(
        tiny_bundle, "--metrics-port", str(metrics_port), "--drain-delay-s", "1", "--grace-s", "20"
    )
    try:
        wait_serving(port, proc)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert "nmtserve_queue_depth" in body and "nmtserve_decode_steps_total" in body
        assert 'nmtserve_encoder_positions_total{kind="token"}' in body  # the warm-up's
        load = Load(f"127.0.0.1:{port}", threads=64)
        time.sleep(2.0)
        before = load.count()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        time.sleep(0.5)  # and calls keep coming after the server is gone
        outcomes = load.stop()
        log = output(proc)
        assert code == 0, log
        assert "draining" in log and "drained, exiting" in log
        assert before > 0 and outcomes.count("ok") >= before
        assert {o.split(" ")[0] for o in outcomes} <= {"ok", "UNAVAILABLE"}, outcomes
        assert "request cancelled" not in log, log
        print(f"{len(outcomes)} calls: {outcomes.count('ok')} ok, the rest UNAVAILABLE")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def served(metrics_port: int) -> float:
    """Translate calls a replica answered OK, from its Prometheus endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("nmtserve_requests_total") and all(
            k in line for k in ('method="Translate"', 'code="OK"')
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rolling_restart_of_three_replicas_under_load_fails_no_call(tiny_bundle: Path) -> None:
    """Three replicas behind the client's round_robin; each in turn gets SIGTERM, drains,
    exits and starts again on its port while 16 clients keep calling: not one call fails."""
    ports = [free_port() for _ in range(3)]
    metrics = [free_port() for _ in range(3)]
    args = ("--drain-delay-s", "1", "--log-level", "warning")

    def launch(i: int) -> subprocess.Popen[str]:
        proc, _ = start(tiny_bundle, "--metrics-port", str(metrics[i]), *args, port=ports[i])
        return proc

    procs = [launch(i) for i in range(3)]
    load: Load | None = None
    try:
        for i, proc in enumerate(procs):
            wait_serving(ports[i], proc)
        load = Load(",".join(f"127.0.0.1:{p}" for p in ports), threads=16, sentences=4)
        for i in range(3):
            procs[i].send_signal(signal.SIGTERM)
            assert procs[i].wait(60) == 0, output(procs[i])
            procs[i] = launch(i)
            wait_serving(ports[i], procs[i])
            deadline = time.monotonic() + 30
            while served(metrics[i]) < 5:  # the clients found the new replica
                assert time.monotonic() < deadline, "the restarted replica gets no calls"
                time.sleep(0.1)
        outcomes = load.stop()
        load = None
        failed = [o for o in outcomes if o != "ok"]
        assert not failed, failed[:5]
        print(f"rolling restart: {len(outcomes)} calls, none failed")
    finally:
        if load is not None:
            load.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)


def test_refuses_a_corrupt_bundle_naming_the_file(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    with (bad / "encoder.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    proc, _ = start(bad)
    code = proc.wait(60)
    out = output(proc)
    assert code == 2
    assert "encoder.onnx: sha256 does not match manifest.json" in out


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-wait-ms", "nan"),  # never said SERVING, and ignored SIGINT
        ("--max-wait-ms", "inf"),  # the decode lanes died
        ("--port", "70000"),  # served on 70000 - 65536
        ("--drain-delay-s", "inf"),
        ("--max-message-bytes", str(2**40)),  # a traceback
    ],
)
def test_refuses_a_setting_out_of_range_naming_it(tiny_bundle: Path, flag: str, value: str) -> None:
    proc, _ = start(tiny_bundle, flag, value)
    assert proc.wait(60) == 2
    assert f"cannot start: {flag} {value}: must be from" in output(proc), output(proc)
    assert "Traceback" not in output(proc)


def test_refuses_a_missing_bundle(tmp_path: Path) -> None:
    proc, _ = start(tmp_path / "nowhere")
    assert proc.wait(60) == 2
    assert "the bundle directory does not exist" in (output(proc))


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


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "tokenizer.model: missing"),
        ("version", "format_version 99 is not supported"),
        ("listed", "decoder.onnx: used but not listed in manifest.json"),
        ("graphs", "manifest.json: onnx.graphs must map precisions to their graph files"),
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
    elif damage == "graphs":  # was a traceback
        manifest["onnx"]["graphs"] = []
    else:
        del manifest["files"]["decoder.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    proc, _ = start(bad)
    assert proc.wait(60) == 2
    assert message in (output(proc))
    assert "Traceback" not in output(proc)


def test_callers_that_keep_calling_do_not_hold_up_the_drain(tiny_bundle: Path) -> None:
    """Plain clients (no health checks, no retries) calling without pause through the whole
    drain: refused calls neither extend it to the grace period nor write a line each."""
    proc, port = start(tiny_bundle, "--drain-delay-s", "0", "--grace-s", "20")
    try:
        wait_serving(port, proc)
        stop = threading.Event()
        codes: list[str] = []

        def hammer() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.TranslatorStub(ch)
                while not stop.is_set():
                    try:
                        stub.Translate(pb.TranslateRequest(sentences=["seven"]), timeout=5)
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(30)
        log = output(proc)
        assert code == 0, log
        assert took < 5, f"drained in {took:.1f}s"
        assert log.count("request refused") == 0 and "call(s) while draining" in log, log
        assert "OK" in codes and "UNAVAILABLE" in codes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_open_health_watch_does_not_hold_up_the_exit(tiny_bundle: Path) -> None:
    """A client watching health (as grpc's client-side health checking does) is told
    NOT_SERVING, then its Watch ends with OK at the stop: it used to hold the exit for the
    whole 20 s grace period."""
    proc, port = start(tiny_bundle, "--drain-delay-s", "0.5", "--grace-s", "20")
    try:
        wait_serving(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            statuses = [next(watch).status]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            statuses += [r.status for r in watch]  # ends when the server closes it
            assert watch.code() == grpc.StatusCode.OK
            code = proc.wait(30)
            took = time.monotonic() - t0
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert statuses == [serving, not_serving], statuses
        assert code == 0, output(proc)
        assert took < 5, f"exited {took:.1f}s after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_provider_cuda_without_cuda_refuses_to_start(tiny_bundle: Path) -> None:
    """README: --provider cuda fails at start if onnxruntime cannot start CUDA — exit 2 and a
    line that says so, never a server that runs on the CPU while claiming CUDA."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    args = [
        "--bundle",
        str(tiny_bundle),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--provider",
        "cuda",
    ]
    proc = subprocess.run([sys.executable, "-m", "service", "serve", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--provider cuda: this onnxruntime has no CUDAExecutionProvider" in proc.stderr


def test_the_main_command_shows_translations_and_exits_0(
    tiny_bundle: Path, server: ServerThread
) -> None:
    """README's main command (`make run` ends in `python -m service demo`): with --once it
    starts a server, shows translations made through it (the ones another server of the same
    bundle gives), and exits 0."""
    with TranslatorClient(server.target) as c:
        seven, forty_two = (r.translation for r in c.translate(["seven", "forty-two"]).results)
    assert seven and forty_two
    port = free_port()
    args = ["demo", "--bundle", str(tiny_bundle), "--port", str(port), "--metrics-port", "0",
            "--once", "--sentence", "seven", "--sentence", "forty-two"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Translations made through the gRPC server:" in out
    assert f"  seven\n    → {seven}\n  forty-two\n    → {forty_two}\n" in out
    assert f"translate --target 127.0.0.1:{port} seven" in out


def _fake_cgroup(tmp: Path, name: str, files: dict[str, str]) -> list[str]:
    """A command prefix that runs its command in a mount namespace of its own where
    /sys/fs/cgroup is a directory holding these files (cgroup v2's cpu.max, or v1's
    cpu/cpu.cfs_quota_us and cpu/cpu.cfs_period_us): the quota the server must find."""
    root = tmp / name
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /sys/fs/cgroup && exec "$@"',
            str(root)]  # fmt: skip


def _can_fake_a_cgroup(tmp: Path) -> str:
    """Why a fake cgroup cannot be mounted here ('' if it can)."""
    if not all(shutil.which(c) for c in ("taskset", "unshare", "mount")):
        return "taskset, unshare or mount is missing"
    if not {0, 1} <= os.sched_getaffinity(0):
        return "needs CPUs 0 and 1"
    wrap = _fake_cgroup(tmp, "probe", {"cpu.max": "max 100000"})
    probe = subprocess.run([*wrap, "cat", "/sys/fs/cgroup/cpu.max"], capture_output=True, text=True)
    ok = probe.returncode == 0 and probe.stdout == "max 100000\n"
    return "" if ok else f"cannot mount a fake cgroup (needs root): {probe.stderr.strip()}"


def test_the_thread_budget_follows_affinity_and_the_cgroup_quota(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """README: --threads 0 means the cores this process may use — its CPU affinity, capped by
    the cgroup quota (v2 cpu.max, or v1's cfs quota) — and auto lanes are one per usable core.
    Real servers under taskset and over a fake /sys/fs/cgroup report what they chose in
    GetModelInfo: (decode lanes, intra-op threads of each)."""
    why = _can_fake_a_cgroup(tmp_path)
    if why:
        pytest.skip(why)
    half = {"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}  # cgroup v1
    cases = {  # name: CPUs, the fake cgroup's files (None: the real one), serve flags
        "CPU 0": ("0", None, ()),
        "CPUs 0,1": ("0,1", {"cpu.max": "max 100000"}, ()),
        "CPUs 0,1, 1 lane": ("0,1", {"cpu.max": "max 100000"}, ("--lanes", "1")),
        "CPUs 0,1, v2 quota 0.5, 1 lane": ("0,1", {"cpu.max": "50000 100000"}, ("--lanes", "1")),
        "CPUs 0,1, v1 quota 0.5, 1 lane": ("0,1", half, ("--lanes", "1")),
    }
    procs = {}
    for i, (name, (cpus, cgroup, flags)) in enumerate(cases.items()):
        wrap = _fake_cgroup(tmp_path, str(i), cgroup) if cgroup else []
        procs[name] = start(tiny_bundle, "--drain-delay-s", "0", *flags,
                            wrap=[*wrap, "taskset", "-c", cpus])  # fmt: skip
    chosen = {}
    try:
        for name, (proc, port) in procs.items():
            wait_serving(port, proc, timeout=120)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                info = pb_grpc.TranslatorStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            chosen[name] = (info.decode_lanes, info.threads_per_lane)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(60)
    assert chosen == {
        "CPU 0": (1, 1),
        "CPUs 0,1": (2, 1),
        "CPUs 0,1, 1 lane": (1, 2),
        "CPUs 0,1, v2 quota 0.5, 1 lane": (1, 1),
        "CPUs 0,1, v1 quota 0.5, 1 lane": (1, 1),
    }
