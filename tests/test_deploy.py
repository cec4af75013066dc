"""Every deployment artefact checked by a real tool: hadolint, kubectl kustomize and
kubernetes-validate (strict) on every rendered overlay, promtool on the alerts and the metrics
adapter's query, and the project's own invariants (no replicas under an HPA, the pod outlives
the server's longest drain, memory limits per model size against measured RSS, the autoscaling
metric exported by the server); plus replicas behind round_robin, and a replica added behind
one DNS name reached within the connection age."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service import client
from service.client import TranslatorClient
from service.metrics import Metrics
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb
from service.proto_gen.nmtserve.v1 import translation_pb2_grpc as pb_grpc
from service.server import ServerConfig
from service.settings import env_name, flag
from tests.test_server_process import free_port, output, served, start, wait_serving

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
VARIANTS = ["base", *sorted(p.name for p in OVERLAYS.iterdir())]
PROM = REPO / "deploy" / "prometheus"
ADAPTER = REPO / "deploy" / "prometheus-adapter" / "rules.yaml"
K8S_VERSION = "1.33.0"
METRIC = "nmtserve_queue_wait_seconds"  # the HPA's
RECORDED_WAIT = "nmtserve:queue_wait_seconds:mean2m"  # the alerts'


def tool(name: str) -> str:
    """A tool from the venv, .tools/ (where `make tools` unpacks promtool), or PATH."""
    for candidate in (
        str(Path(sys.executable).parent / name),
        str(REPO / ".tools" / "root" / "usr" / "bin" / name),
        shutil.which(name),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"{name} is not installed: run `make install tools`")


def kustomization(variant: str) -> Path:
    return BASE if variant == "base" else OVERLAYS / variant


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(variant: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of the base or an overlay: what `kubectl apply -k` would send."""
    if variant not in _RENDERED:
        out = subprocess.run(
            [tool("kubectl"), "kustomize", str(kustomization(variant))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        _RENDERED[variant] = [d for d in yaml.safe_load_all(out) if d]
    return _RENDERED[variant]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


HEALTH_COMMAND = ["python", "-m", "service", "health"]


def health_timeout(command: list[str]) -> float:
    """The seconds a health command waits for its answer (--timeout, else its default)."""
    from service.healthcheck import add_health_args

    parser = argparse.ArgumentParser()
    add_health_args(parser)
    return float(parser.parse_args(command[4:]).timeout)


def server_config(env: dict[str, str]) -> ServerConfig:
    """The ServerConfig a pod's environment gives: its variables over the defaults."""
    values: dict[str, Any] = {}
    for f in fields(ServerConfig):
        if env_name(f.name) in env:
            kind: Any = type(f.default)  # the flag's type, as the command line converts it
            values[f.name] = kind(env[env_name(f.name)])
    return ServerConfig(**values)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/prometheus/Dockerfile"])
def test_hadolint_clean(dockerfile: str) -> None:
    res = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_validate_strictly(variant: str) -> None:
    import kubernetes_validate

    docs = rendered(variant)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def evictable_pods(pdb: dict[str, Any], pods: int) -> int:
    """How many of `pods` healthy pods a PodDisruptionBudget's spec lets evictions take at once
    (Kubernetes rounds a percentage of maxUnavailable or minAvailable up)."""

    def count(value: int | str) -> int:
        if isinstance(value, str):
            return -(-pods * int(value.removesuffix("%")) // 100)
        return value

    if "maxUnavailable" in pdb:
        return count(pdb["maxUnavailable"])
    return max(0, pods - count(pdb["minAvailable"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_project_consistency(variant: str) -> None:
    docs = rendered(variant)
    dep = one(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    c = server(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(c)
    assert ports["grpc"] == int(env["NMTSERVE_PORT"])
    assert ports["metrics"] == int(env["NMTSERVE_METRICS_PORT"])
    for probe in (c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")):
        if "exec" in probe:  # with TLS on: the health command, within the probe's timeout
            assert probe["exec"]["command"][:4] == HEALTH_COMMAND, probe
            assert health_timeout(probe["exec"]["command"]) < probe["timeoutSeconds"], probe
        else:
            assert probe["grpc"]["port"] == ports["grpc"], probe
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        # a versioned image: IfNotPresent never pulls a newer one under a tag it already has
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and tag != "latest", container["image"]
        assert container["imagePullPolicy"] == "IfNotPresent"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for svc in of_kind(docs, "Service"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports
    assert any(s["spec"].get("clusterIP") == "None" for s in of_kind(docs, "Service"))  # headless
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # a voluntary eviction (a node drain) takes at most a quarter of the pods, or one, at every
    # count the HPA may have set: a fixed minAvailable let a drain take all pods but that many
    for pods in range(hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"] + 1):
        evictable = evictable_pods(pdb["spec"], pods)
        assert 1 <= evictable <= max(1, pods // 4), (pdb["spec"], pods, evictable)
    # the HPA owns the count: a replicas field would reset it on every apply
    assert "replicas" not in dep["spec"]
    # the image's own defaults agree with the manifests
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "NMTSERVE_PORT=50051" in dockerfile and "EXPOSE 50051 9090" in dockerfile
    assert "USER 10001" in dockerfile and pod["securityContext"]["runAsUser"] == 10001


def healthchecks() -> list[tuple[int, list[str]]]:
    """(--timeout seconds, command) of every HEALTHCHECK in the Dockerfile (one a stage)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(r"^HEALTHCHECK .*--timeout=(\d+)s .* CMD (\[.*\])$", text, re.M)
    return [(int(timeout), json.loads(cmd)) for timeout, cmd in found]


def test_the_health_checks_reach_a_tls_server(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: with TLS on, overlays/tls's exec probes and the container's HEALTHCHECK pass,
    given the health variables. The commands, read from the rendered overlay and the
    Dockerfile, run with the overlay's environment (its certificate paths moved here) against
    `python -m service serve` started with the same environment; without the health variables
    the image's command fails, and each probe allows more than the command's own timeout."""
    import argparse

    from cryptography.hazmat.primitives.asymmetric import ec

    from service.healthcheck import add_health_args
    from tests.test_security import cert_pem, certificate, key_pem

    c = server(rendered("tls"))
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls")
    env = {k: v.replace(mount, str(tmp_path)) for k, v in env_of(c).items()}
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, None, ca=True)
    name = env["NMTSERVE_HEALTH_TLS_SERVER_NAME"]
    Path(env["NMTSERVE_HEALTH_TLS_CA"]).write_bytes(cert_pem(ca))
    crt = certificate(name, key, (ca.subject, ca_key), server=True, names=(name,))
    Path(env["NMTSERVE_TLS_CERT"]).write_bytes(cert_pem(crt))
    Path(env["NMTSERVE_TLS_KEY"]).write_bytes(key_pem(key))
    for var in ("NMTSERVE_TLS_CERT", "NMTSERVE_TLS_KEY"):
        monkeypatch.setenv(var, env[var])
    proc, port = start(tiny_bundle)
    health = {k: v for k, v in env.items() if k.startswith("NMTSERVE_HEALTH_")}

    def check(command: list[str], variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
        assert command[0] == "python"
        variables = {**os.environ, **variables, "NMTSERVE_PORT": str(port)}
        return subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=variables,
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    parser = argparse.ArgumentParser()
    add_health_args(parser)
    own_timeout = parser.parse_args([]).timeout
    try:
        deadline = time.monotonic() + 60  # as the kubelet runs the startup probe
        while check(c["startupProbe"]["exec"]["command"], health).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, output(proc)
            time.sleep(0.5)
        assert "TLS" in output(proc)
        for probe in ("readinessProbe", "livenessProbe"):
            res = check(c[probe]["exec"]["command"], health)
            assert res.returncode == 0 and res.stdout == f"127.0.0.1:{port}: SERVING\n", probe
            assert c[probe]["timeoutSeconds"] > own_timeout, probe
        assert len(healthchecks()) == 2  # the CPU and the CUDA image
        for timeout, command in healthchecks():
            assert timeout > own_timeout
            assert check(command, health).returncode == 0
            assert check(command, {}).returncode == 1  # plaintext: the server refuses it
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pod_outlives_the_longest_drain(variant: str) -> None:
    """terminationGracePeriodSeconds covers the preStop sleep and the server's longest drain
    (drain delay + grace + the floors of gRPC's and the decode lanes' stop), read from the
    pod's environment over the server's defaults."""
    docs = rendered(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server(docs)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = server_config(env_of(c)).longest_drain_s()
    assert drain == 5 + 20 + 2  # the manifests' delay and grace, and the two 1 s floors
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_cuda_overlay() -> None:
    docs = rendered("cuda")
    c = server(docs)
    env = env_of(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env["NMTSERVE_PROVIDER"] == "cuda" and env["NMTSERVE_PRECISION"] == "fp32"
    assert "NMTSERVE_GRACE_S" in env  # base env kept
    # its own lane settings, not the CPU pods'
    cpu = env_of(server(rendered("base")))
    assert (env["NMTSERVE_LANES"], env["NMTSERVE_THREADS"]) != (
        cpu["NMTSERVE_LANES"],
        cpu["NMTSERVE_THREADS"],
    )
    assert c["image"].endswith("-cuda")


def selectors(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = [d["spec"]["selector"] for d in of_kind(docs, "Service")]
    out += [
        d["spec"]["selector"]["matchLabels"]
        for d in docs
        if d["kind"] in ("Deployment", "PodDisruptionBudget")
    ]
    return out


@pytest.mark.parametrize("variant", ["cuda", "base-model"])
def test_variants_deployed_together_select_only_their_own_pods(variant: str) -> None:
    """An overlay meant to run beside the base (another provider, another model): no Service,
    PDB or Deployment of either selects the other's pods, and no two objects share a name."""
    mine, base = rendered(variant), rendered("base")
    for a, b in ((mine, base), (base, mine)):
        pod_labels = one(b, "Deployment")["spec"]["template"]["metadata"]["labels"]
        for sel in selectors(a):
            assert not sel.items() <= pod_labels.items(), sel
    names = {(d["kind"], d["metadata"]["name"]) for d in base}
    assert not names & {(d["kind"], d["metadata"]["name"]) for d in mine}
    hpa = one(mine, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(mine, "Deployment")["metadata"]["name"]


def test_autoscaling_on_the_queue_wait_through_the_adapter() -> None:
    """The HPA scales on the mean queue wait per pod (a custom metric), which the adapter's
    rule serves under that name from the two counters the server exports; CPU only in the
    fallback overlay."""
    hpa = one(rendered("base"), "HorizontalPodAutoscaler")
    assert [(m["type"], m["pods"]["metric"]["name"]) for m in hpa["spec"]["metrics"]] == [
        ("Pods", METRIC)
    ]
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]
    assert [r["name"]["as"] for r in rules] == [METRIC]
    read = re.findall(r"nmtserve_\w+", rules[0]["metricsQuery"] + rules[0]["seriesQuery"])
    assert read and set(read) <= exported_series(), read
    fallback = one(rendered("cpu-autoscaling"), "HorizontalPodAutoscaler")
    assert [m["resource"]["name"] for m in fallback["spec"]["metrics"]] == ["cpu"]


def exported_series() -> set[str]:
    """Every series name the server's metrics give, labelled ones before their first sample."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_alert_rules_read_only_series_the_server_exports() -> None:
    exprs = " ".join(
        str(r["expr"])
        for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    )
    read = set(re.findall(r"\bnmtserve_\w+", exprs))
    assert read and read <= exported_series(), read - exported_series()


def adapter_query() -> str:
    """The adapter's query, its templates filled as the adapter fills them for one pod."""
    query = yaml.safe_load(ADAPTER.read_text())["rules"][0]["metricsQuery"]
    query = query.replace("<<.GroupBy>>", "namespace, pod")
    return query.replace("<<.LabelMatchers>>", 'namespace="default",pod=~"nmtserve-.*"')


def recording_rule(name: str) -> str:
    for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == name:
                return str(rule["expr"])
    raise AssertionError(f"no recording rule {name}")


def promtool_value(
    tmp_path: Path, expr: str, series: dict[str, str], scrape: str, evaluation: str, at: str
) -> None:
    """promtool evaluates `expr` as a recording rule every `evaluation` over `series` scraped
    every `scrape`, and finds 5 (s of mean wait) at time `at`."""
    rule = {"groups": [{"name": "case", "rules": [{"record": "case:wait", "expr": expr}]}]}
    (tmp_path / "rule.yml").write_text(yaml.safe_dump(rule))
    labels = 'namespace="default",pod="nmtserve-abc"'
    case = {
        "rule_files": ["rule.yml"],
        "evaluation_interval": evaluation,
        "tests": [
            {
                "interval": scrape,
                "input_series": [
                    {"series": f"{n}{{{labels}}}", "values": v} for n, v in series.items()
                ],
                "promql_expr_test": [
                    {
                        "expr": "case:wait",
                        "eval_time": at,
                        "exp_samples": [{"labels": f"case:wait{{{labels}}}", "value": 5}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "case_test.yml").write_text(yaml.safe_dump(case))
    res = subprocess.run(
        [tool("promtool"), "test", "rules", "case_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "SUCCESS" in res.stdout + res.stderr, res.stdout + res.stderr


def test_adapter_query_evaluates_to_the_mean_wait(tmp_path: Path) -> None:
    """The adapter's query evaluated by promtool: 5 s of waiting per second over 1 sentence
    leaving per second."""
    series = {
        "nmtserve_queue_wait_seconds_total": "0+300x10",
        "nmtserve_queue_exits_total": "0+60x10",
    }
    promtool_value(tmp_path, adapter_query(), series, "1m", "1m", "5m")


@pytest.mark.parametrize("query", ["adapter", "recording rule"])
def test_the_mean_wait_survives_a_failed_scrape(tmp_path: Path, query: str) -> None:
    """Scraped every 30 s, one scrape failed, evaluated between scrapes (as Prometheus and the
    adapter evaluate, never in step with the scrapes): the HPA's metric and the alert's
    recording rule still have a value. Over a one-minute window one sample was left, no rate,
    and the HPA had no metric for the pod (the alert's 10 minutes started again)."""
    expr = adapter_query() if query == "adapter" else recording_rule(RECORDED_WAIT)
    series = {  # samples every 30 s to 240 s, none at 270 s, on from 300 s
        "nmtserve_queue_wait_seconds_total": "0+150x8 _ 1350+150x4",
        "nmtserve_queue_exits_total": "0+30x8 _ 270+30x4",
    }
    promtool_value(tmp_path, expr, series, "30s", "20s", "280s")


def readme_resources() -> list[dict[str, str]]:
    """The README's table of measured RSS and the manifests' memory per model size."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| model | bundle | RSS serving") :].split("\n\n")[0].splitlines()
    head = [h.strip() for h in table[0].strip("|").split("|")]
    return [
        dict(zip(head, (c.strip(" `") for c in row.strip("|").split("|")), strict=True))
        for row in table[2:]
    ]


def test_memory_per_model_size_against_measured_rss() -> None:
    """Each model size's manifests ask for at least its measured peak RSS and are limited to
    a quarter more than that peak plus the result buffer the pod allows."""
    rows = readme_resources()
    assert {r["model"].split()[0] for r in rows} == {"default", "small", "base"}
    for row in rows:
        variant = row["manifests"].removeprefix("deploy/k8s/").removeprefix("overlays/")
        c = server(rendered(variant))
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert (requests["memory"], limits["memory"]) == (
            row["memory request"],
            row["memory limit"],
        )
        peak = float(row["peak RSS under load (MiB)"])
        buffer = server_config(env_of(c)).result_buffer_bytes / 2**20
        assert mib(requests["memory"]) >= peak, row
        assert mib(limits["memory"]) >= 1.25 * (peak + buffer), row


def test_kustomizations_list_existing_files() -> None:
    for variant in VARIANTS:
        k = kustomization(variant)
        spec = yaml.safe_load((k / "kustomization.yaml").read_text())
        for res in spec.get("resources", []):
            assert (k / res).exists(), f"{k}: {res}"
        for patch in spec.get("patches", []):
            assert "patch" in patch or (k / patch["path"]).is_file()


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
    # a test case for each alert
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    tested = {
        a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a["exp_alerts"]
    }
    assert alerts == tested
    assert {"NmtserveTargetDown", "NmtserveMetricsAbsent", "NmtserveQueueSaturated"} <= alerts


def test_compose_file_is_consistent() -> None:
    spec = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    replicas = [n for n in spec["services"] if n.startswith("nmtserve-")]
    assert len(replicas) == 3
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    static = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(static) == sorted(f"{r}:9090" for r in replicas)
    for name in replicas:
        r = spec["services"][name]
        env = r["environment"]
        # a CPU limit, and lanes × threads to match it (not every host core per replica)
        assert int(env["NMTSERVE_LANES"]) * int(env["NMTSERVE_THREADS"]) == r["cpus"]
        assert r["mem_limit"] and not r["image"].endswith(":latest")
        # the server exits 1 to be restarted (a lane failing batch after batch), 0 once drained
        assert r["restart"] == "on-failure"
        grace = float(r["stop_grace_period"].removesuffix("s"))
        assert grace > server_config({k: str(v) for k, v in env.items()}).longest_drain_s()


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


# A server started in-process, whose event loop's self-pipe is filled the way a dropped
# connection fills it (every cancelled sentence's future schedules a wake-up on the loop with
# call_soon_threadsafe, one byte each: 40 calls of 256 sentences cancelled at once did it),
# and then SIGTERM, as the kubelet sends it.
_SIGTERM_ON_A_FULL_SELF_PIPE = """
import asyncio, signal, sys
from service.server import Server, ServerConfig

async def main() -> None:
    server = Server(ServerConfig(bundle=sys.argv[1], port=0, drain_delay_s=0, grace_s=1))
    run = asyncio.ensure_future(server.run())
    while not server.serving:
        assert not run.done(), run.result()
        await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    for _ in range(20_000):
        loop.call_soon_threadsafe(int)
    signal.raise_signal(signal.SIGTERM)
    await asyncio.wait_for(run, 10)
    print("drained")

asyncio.run(main())
"""


def test_sigterm_is_not_lost_while_the_loop_is_flooded(tiny_bundle: Path) -> None:
    """SIGTERM starts the drain even when it arrives while the event loop's self-pipe is full.
    asyncio's own signal handling learns of a signal from a byte in that pipe, and a signal
    that found it full was dropped: the server kept serving until the kubelet killed it at
    the end of terminationGracePeriodSeconds, cutting every call under way."""
    res = subprocess.run(
        [sys.executable, "-c", _SIGTERM_ON_A_FULL_SELF_PIPE, str(tiny_bundle)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout == "drained\n", res.stdout + res.stderr


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("max_connection_age_s", "0.0004", "must be 0 (never) or at least 1"),
        ("max_connection_age_s", "0.5", "must be 0 (never) or at least 1"),
        ("max_connection_age_grace_s", "0.0", "must be at least 1 with a connection age"),
    ],
)
def test_a_connection_age_or_grace_under_a_second_is_refused(
    tiny_bundle: Path, setting: str, value: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a pod's environment as from the flag. gRPC takes the age in whole milliseconds:
    0.0004 s became 0 ms and ended every connection as it opened (calls hung until their
    deadline: 3 of 20 in a measured run), where 0 means never. A grace of 0 cut calls under
    way whenever a connection ended (55 of 1099 calls of a few ms, age 1 s)."""
    monkeypatch.setenv(env_name(setting), value)
    proc, _ = start(tiny_bundle)
    try:
        assert proc.wait(30) == 2
    finally:
        proc.kill()  # one that started anyway
    assert f"cannot start: {flag(setting)} {value}: {problem}" in output(proc), output(proc)


def test_the_health_check_in_a_container_environment(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The image's HEALTHCHECK has a fixed command line and takes its TLS settings from
    NMTSERVE_HEALTH_TLS_*. A variable set to nothing (a template's empty value) is unset: it
    turned TLS on, with the system's CAs, against a plaintext server, and the container went
    unhealthy. A failed check says why: gRPC gives every failed connection UNAVAILABLE, a
    server down and a certificate from another CA alike."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from service.healthcheck import main as health
    from tests.conftest import ServerThread
    from tests.test_security import _write, certificate

    issuers = []
    for name in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(name, key, None, ca=True)
        _write(tmp_path / name, cert, key)
        issuers.append((cert.subject, key))
    key = ec.generate_private_key(ec.SECP256R1())
    _write(tmp_path / "server", certificate("server", key, issuers[0], server=True), key)
    tls = {"tls_cert": str(tmp_path / "server.crt"), "tls_key": str(tmp_path / "server.key")}
    plain, secure = (
        ServerThread(tiny_bundle, drain_delay_s=0),
        ServerThread(tiny_bundle, drain_delay_s=0, **tls),
    )
    try:
        plain.wait_serving()
        secure.wait_serving()
        monkeypatch.setenv("NMTSERVE_HEALTH_TLS_CA", "")
        assert health(["--target", plain.target]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == f"{plain.target}: SERVING\n"
        monkeypatch.setenv("NMTSERVE_HEALTH_TLS_CA", str(tmp_path / "ca.crt"))
        assert health(["--target", secure.target]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == f"{secure.target}: SERVING\n"
        monkeypatch.setenv("NMTSERVE_HEALTH_TLS_CA", str(tmp_path / "other-ca.crt"))
        assert health(["--target", secure.target]) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"{secure.target}: UNAVAILABLE: "), err
        assert "CERTIFICATE_VERIFY_FAILED" in err, err
    finally:
        plain.stop()
        secure.stop()


CUDA_IMAGE = "nmtserve:check-cuda"  # what `make cuda-image-check` builds from the cuda target


def dockerfile_arg(name: str) -> str:
    found = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert found, name
    return found.group(1)


def test_the_default_cuda_base_has_the_cuda_that_onnxruntime_gpu_links() -> None:
    """onnxruntime-gpu's CUDA provider links one CUDA major version (libcudart.so.N); on a
    CUDA_BASE_IMAGE of another it cannot load, and a pod with --provider cuda exits 2 on every
    GPU node. Read from the image `make cuda-image-check` built (onnxruntime-gpu installed as
    the cuda target installs it); skipped where there is no such image."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "image", "inspect", CUDA_IMAGE], capture_output=True).returncode
    ):
        pytest.skip(f"no {CUDA_IMAGE} image: make cuda-image-check builds it")
    script = (
        "python -c 'import importlib.metadata as m; print(m.version(\"onnxruntime-gpu\"))' && "
        "ldd /opt/nmtserve/lib/python3*/site-packages/onnxruntime/capi/"
        "libonnxruntime_providers_cuda.so"
    )
    out = subprocess.run(
        [docker, "run", "--rm", "--entrypoint", "sh", CUDA_IMAGE, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    version = out.splitlines()[0]
    if version != dockerfile_arg("ORT_VERSION"):
        pytest.skip(f"{CUDA_IMAGE} has onnxruntime-gpu {version}: rebuild it")
    linked = re.findall(r"^\s*libcudart\.so\.(\d+) ", out, re.M)
    base = re.fullmatch(
        r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-\S+", dockerfile_arg("CUDA_BASE_IMAGE")
    )
    assert base, dockerfile_arg("CUDA_BASE_IMAGE")
    assert linked == [base.group(1)], (linked, dockerfile_arg("CUDA_BASE_IMAGE"))
