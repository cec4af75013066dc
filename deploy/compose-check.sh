#!/usr/bin/env bash
# Opt-in compose check (make compose-check, after make container-check): three replicas,
# Prometheus and the load-test job of deploy/docker-compose.yml, on this machine's Docker.
# Prints the load test's report and whether Prometheus scraped all three replicas.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-nmtserve-base:bookworm}
command -v docker-compose >/dev/null || apt-get install -y -qq docker-compose >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }
source deploy/docker-env.sh
ensure_dockerd
docker image inspect nmtserve:check >/dev/null 2>&1 || { echo "run make container-check first" >&2; exit 2; }
docker tag nmtserve:check nmtserve:0.1.0
[ -x .tools/root/usr/bin/prometheus ] || make tools >/dev/null
docker build -q -f deploy/prometheus/Dockerfile --build-arg BASE_IMAGE="$BASE" \
  -t nmtserve-prometheus:local . >/dev/null
export PROMETHEUS_IMAGE=nmtserve-prometheus:local
compose="docker-compose -p nmtserve -f deploy/docker-compose.yml"
trap '$compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT
$compose up -d nmtserve-1 nmtserve-2 nmtserve-3 prometheus
$compose up --no-deps --exit-code-from loadtest loadtest 2>&1 | sed -n '/Load test:/,$p'
code=${PIPESTATUS[0]}
echo "== Prometheus targets"
docker exec nmtserve_prometheus_1 sh -c true 2>/dev/null || true
up=$($compose exec -T nmtserve-1 python -c "
import json, urllib.request
d = json.load(urllib.request.urlopen('http://prometheus:9090/api/v1/targets'))
print(sum(t['health'] == 'up' for t in d['data']['activeTargets']))
")
echo "replicas scraped and up: $up of 3"
[ "$code" = 0 ] && [ "$up" = 3 ] && echo "COMPOSE CHECK PASSED"
