"""Shared fixtures: one tiny run trained through the real CLI, and its exported bundle."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from service.scheduler import Scheduler

TINY_TRAIN = [
    "--train-size", "3000", "--dev-per-digits", "5", "--test-per-digits", "12",
    "--max-digits", "4", "--vocab-size", "200",
    "--d-model", "32", "--heads", "4", "--d-ff", "64",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--max-steps", "120", "--eval-every", "60", "--time-budget", "0",
    "--warmup-steps", "20", "--lr", "3e-3",
    "--target-exact-match", "0", "--batch-tokens", "2000",
    "--max-source-tokens", "24", "--max-target-tokens", "24", "--max-positions", "32",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--run", str(run), *TINY_TRAIN]) == 0
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.cli import main

    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["export", "--run", str(tiny_run), "--out", str(out), "--int8"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(metrics_port: int) -> dict[str, float]:
    """Every sample of a server's Prometheus endpoint, by its name and labels as the text
    format writes them (`nmtserve_requests_total{code="OK",method="Translate"}`), labels in
    name order."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class ServerThread:
    """A real server (service.server.Server) on a free 127.0.0.1 port, in its own thread."""

    def __init__(self, bundle: Path, **overrides: object) -> None:
        import asyncio
        import threading

        from service.server import Server, ServerConfig

        self.cfg = ServerConfig.from_settings(
            bundle=str(bundle), host="127.0.0.1", port=0, **overrides
        )
        self.server = Server(self.cfg)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.run(handle_signals=False))
            except BaseException as e:  # reported by wait_serving / stop
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def scheduler(self) -> Scheduler:
        """The server's scheduler, for tests that stall or fail steps."""
        tr = self.server.translator
        assert tr is not None
        return tr.scheduler

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def scrape(self) -> dict[str, float]:
        """Its metrics endpoint (started with metrics_port=free_port())."""
        assert self.cfg.metrics_port, "this server has no metrics endpoint"
        return scrape(self.cfg.metrics_port)

    def wait_serving(self, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            sv = self.server.servicer
            if self.server.port and sv is not None and sv._tr is not None:
                return
            time.sleep(0.02)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "server did not drain"


@pytest.fixture(scope="session")
def server(tiny_bundle: Path) -> object:
    """One server for the end-to-end tests; small limits so the limit errors are cheap. Tests
    can stall or fail its decoder steps (tests.doubles.before_each_step). Two
    decode lanes (the default on two cores), whatever this machine's core count; metrics on a
    free port (``srv.scrape()``)."""
    srv = ServerThread(tiny_bundle, max_sentences=40, metrics_port=free_port(), lanes=2)
    srv.wait_serving()
    yield srv
    srv.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long opt-in checks")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long check: make test-slow (pytest --run-slow -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
