"""Every deployment artefact checked by a real tool: hadolint, kubernetes-validate (strict),
promtool, and the project's own consistency checks; plus three replicas behind round_robin."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service import client
from service.client import TranslatorClient
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from tests.test_server_process import free_port, served, start, wait_serving

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "deploy" / "k8s" / "base"
OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "cuda"
PROM = REPO / "deploy" / "prometheus"
K8S_VERSION = "1.33.0"


def tool(name: str) -> str:
    """A tool from PATH, the venv, or .tools/ (where `make tools` unpacks promtool)."""
    for candidate in (
        shutil.which(name),
        str(Path(sys.executable).parent / name),
        str(REPO / ".tools" / "root" / "usr" / "bin" / name),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"{name} is not installed: run `make tools`")


def manifests(directory: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/prometheus/Dockerfile"])
def test_hadolint_clean(dockerfile: str) -> None:
    res = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_manifests_validate_strictly() -> None:
    import kubernetes_validate

    for d in manifests(BASE):
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def merged_overlay() -> dict[str, Any]:
    """The CUDA overlay's patch applied to the base Deployment (strategic merge, by name)."""
    base = by_kind(manifests(BASE))["Deployment"][0]
    patch = yaml.safe_load((OVERLAY / "deployment-cuda.yaml").read_text())

    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), b[k]) if k in a else b[k] for k in b} | {
                k: v for k, v in a.items() if k not in b
            }
        if isinstance(a, list) and isinstance(b, list) and all("name" in x for x in a + b):
            names = {x["name"]: x for x in a}
            for x in b:
                names[x["name"]] = merge(names.get(x["name"], {}), x)
            return list(names.values())
        return b

    return merge(base, patch)


def test_cuda_overlay_validates() -> None:
    import kubernetes_validate

    dep = merged_overlay()
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "NMTSERVE_PROVIDER", "value": "cuda"} in c["env"]
    assert any(e["name"] == "NMTSERVE_GRACE_S" for e in c["env"])  # base env kept


def test_project_consistency() -> None:
    kinds = by_kind(manifests(BASE))
    dep = kinds["Deployment"][0]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert ports["grpc"] == int(env["NMTSERVE_PORT"])
    assert ports["metrics"] == int(env["NMTSERVE_METRICS_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
    # the pod outlives the preStop sleep and the server's whole drain
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["NMTSERVE_DRAIN_DELAY_S"]) + float(env["NMTSERVE_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    for svc in kinds["Service"]:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports
    assert any(s["spec"].get("clusterIP") == "None" for s in kinds["Service"])  # headless
    pdb = kinds["PodDisruptionBudget"][0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = kinds["HorizontalPodAutoscaler"][0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    # the image's own defaults agree with the manifests
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "NMTSERVE_PORT=50051" in dockerfile and "EXPOSE 50051 9090" in dockerfile
    assert "USER 10001" in dockerfile and pod["securityContext"]["runAsUser"] == 10001


def test_kustomizations_list_existing_files() -> None:
    for k in (BASE, OVERLAY):
        spec = yaml.safe_load((k / "kustomization.yaml").read_text())
        for res in spec.get("resources", []):
            assert (k / res).exists(), f"{k}: {res}"
        for patch in spec.get("patches", []):
            assert (k / patch["path"]).is_file()


def test_promtool_config_and_rules() -> None:
    promtool = tool("promtool")
    res = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROM / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_compose_file_is_consistent() -> None:
    spec = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    replicas = [n for n in spec["services"] if n.startswith("nmtserve-")]
    assert len(replicas) == 3
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    static = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(static) == sorted(f"{r}:9090" for r in replicas)


def test_three_replicas_round_robin_and_failover(tiny_bundle: Path) -> None:
    metrics = [free_port() for _ in range(3)]
    procs = [start(tiny_bundle, "--metrics-port", str(m)) for m in metrics]
    try:
        for proc, port in procs:
            wait_serving(port, proc)
        target = ",".join(f"127.0.0.1:{port}" for _, port in procs)
        with TranslatorClient(target, timeout=10) as client:
            for _ in range(30):
                assert client.translate(["twelve"]).results[0].token_ids
            counts = [served(m) for m in metrics]
            assert sum(counts) == 30 and all(n >= 5 for n in counts), counts  # spread over all
            procs[0][0].send_signal(signal.SIGTERM)
            assert procs[0][0].wait(30) == 0
            deadline = time.monotonic() + 10
            ok = 0
            while ok < 20:  # the channel drops the stopped replica and keeps serving
                try:
                    client.translate(["twelve"])
                    ok += 1
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "calls kept failing after failover"
            assert served(metrics[1]) + served(metrics[2]) >= sum(counts[1:]) + 20
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


class Dns:
    """A DNS server on 127.0.0.1 that answers every A query with `addresses` (what a headless
    Service's name resolves to: the ready pods), and other queries with no record."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        end = 12  # the question's name: length-prefixed labels up to a zero byte
        while query[end]:
            end += query[end] + 1
        qtype = struct.unpack(">H", query[end + 1 : end + 3])[0]
        ips = self.addresses if qtype == 1 else []  # 1: A
        header = struct.pack(
            ">HHHHHH", struct.unpack(">H", query[:2])[0], 0x8180, 1, len(ips), 0, 0
        )
        # each answer points back at the question's name (offset 12), class IN, TTL 0
        answers = [struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(ip) for ip in ips]
        return header + query[12 : end + 5] + b"".join(answers)

    def close(self) -> None:
        self.closed = True


AGE_S, AGE_GRACE_S = 2.0, 1.0


def test_a_replica_added_gets_calls_within_the_connection_age(tiny_bundle: Path) -> None:
    """Three replicas behind one DNS name (as a headless Service gives), a round_robin client
    with the project's service config, then a fourth replica added to the name: the server
    ends every connection after --max-connection-age-s, the client resolves the name again and
    the fourth replica gets calls. Without a connection age the client never asks DNS again
    while its connections live, and the fourth replica stays idle."""
    dns, port = Dns(), free_port()
    hosts = [f"127.0.0.{i}" for i in (2, 3, 4, 5)]
    metrics = [free_port() for _ in hosts]
    age = ("--max-connection-age-s", str(AGE_S), "--max-connection-age-grace-s", str(AGE_GRACE_S))

    def replica(i: int) -> subprocess.Popen[str]:
        proc, _ = start(
            tiny_bundle, "--metrics-port", str(metrics[i]), *age, port=port, host=hosts[i]
        )
        return proc

    procs = [replica(i) for i in range(3)]
    options = [
        ("grpc.service_config", client.SERVICE_CONFIG),
        # gRPC's DNS resolver asks again at most every 30 s by default; a test cannot wait that
        ("grpc.dns_min_time_between_resolutions_ms", 200),
    ]
    target = f"dns://127.0.0.1:{dns.port}/nmtserve.test:{port}"
    request = pb.TranslateRequest(sentences=["twelve"])
    try:
        for proc, host in zip(procs, hosts, strict=False):
            wait_serving(port, proc, host=host)
        dns.addresses = hosts[:3]
        with grpc.insecure_channel(target, options) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            for _ in range(30):
                assert stub.Translate(request, timeout=10).results[0].token_ids
            assert all(served(m) > 0 for m in metrics[:3]), [served(m) for m in metrics]
            procs.append(replica(3))
            wait_serving(port, procs[3], host=hosts[3])
            dns.addresses = hosts
            added = time.monotonic()
            # a connection lives AGE_S ± 10%, then AGE_GRACE_S at most for calls under way
            bound = AGE_S * 1.1 + AGE_GRACE_S + 2.0
            while served(metrics[3]) == 0:
                assert time.monotonic() - added < bound, (
                    f"no call reached the fourth replica in {bound} s"
                )
                stub.Translate(request, timeout=10)  # every call succeeds meanwhile
                time.sleep(0.02)
            print(f"the fourth replica's first call after {time.monotonic() - added:.1f} s")
    finally:
        dns.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def test_health_command_is_light(tiny_bundle: Path) -> None:
    """The container's HEALTHCHECK (`python -m service health`, every 10 s) loads gRPC and the
    health messages, not the server, onnxruntime or numpy."""
    proc, port = start(tiny_bundle)
    command = [sys.executable, "-X", "importtime", "-m", "service", "health"]
    try:
        wait_serving(port, proc)
        res = subprocess.run(
            [*command, "--target", f"127.0.0.1:{port}"], capture_output=True, text=True, cwd=REPO
        )
        assert res.returncode == 0 and res.stdout == f"127.0.0.1:{port}: SERVING\n", res
        imported = {
            line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines() if "|" in line
        }
        assert "grpc_health.v1.health_pb2" in imported
        assert not imported & {"service.server", "service.cli", "onnxruntime", "numpy"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    res = subprocess.run(
        [*command, "--target", f"127.0.0.1:{port}"], capture_output=True, text=True
    )
    assert res.returncode == 1 and "UNAVAILABLE" in res.stderr
