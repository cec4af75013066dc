"""Resident memory of `python -m service serve` per model size, for the pods' memory requests
and limits (README, "Resources per model size").

For each bundle: start the server with the Deployment's lane settings, read its RSS once it
says SERVING, drive it with `python -m service loadtest` (closed loop), then read its peak RSS
(VmHWM: the high-water mark over the whole run, start-up included) and its RSS after the load.

    python benchmarks/serve_rss.py default=models/default small=/tmp/b/small base=/tmp/b/base

Bundles of the small and base sizes with random weights: benchmarks.service_throughput's
``model_bundles``. Random weights rarely emit the end token, so their sentences run to the
length limit: the caches reach their largest, the worst case a limit must hold.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service import client  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(bundle: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """RSS when serving, peak RSS and RSS after the load, in MiB."""
    port = free_port()
    serve = [sys.executable, "-m", "service", "serve", "--bundle", bundle, "--port", str(port)]
    serve += ["--lanes", str(args.lanes), "--threads", "1"]
    proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client.wait_serving(f"127.0.0.1:{port}", proc, 300)
        ready = status_kib(proc.pid, "VmRSS") / 1024
        load = [sys.executable, "-m", "service", "loadtest", "--target", f"127.0.0.1:{port}"]
        load += ["--concurrency", str(args.concurrency), "--duration", str(args.duration)]
        load += ["--sentences-per-request", str(args.sentences), "--no-progress"]
        subprocess.run(load, check=True, stdout=subprocess.DEVNULL)
        return ready, status_kib(proc.pid, "VmHWM") / 1024, status_kib(proc.pid, "VmRSS") / 1024
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="+", help="name=bundle directory")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sentences", type=int, default=4, help="sentences per call")
    p.add_argument("--duration", type=float, default=20)
    args = p.parse_args()
    print(
        "| model | RSS serving, idle (MiB) | peak RSS under load (MiB) | RSS after the load (MiB) |"
    )
    print("|---|---:|---:|---:|")
    for item in args.bundles:
        name, _, bundle = item.partition("=")
        ready, peak, after = measure(bundle, args)
        print(f"| {name} | {ready:.0f} | {peak:.0f} | {after:.0f} |", flush=True)


if __name__ == "__main__":
    main()
