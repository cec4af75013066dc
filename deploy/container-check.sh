#!/usr/bin/env bash
# Opt-in container check (make container-check): build the Dockerfile unchanged on a locally
# built Debian base, run it, check health and a translation from the host, stop it with SIGTERM
# and check that it drained and exited 0; print the image sizes.
#
# Needs root, Debian's docker.io and debootstrap (apt-get install docker.io debootstrap), and the
# default bundle (make model). Uses the host network only: the daemon runs with
# --iptables=false --bridge=none, as this machine allows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${BUNDLE:-models/default}
BASE=${BASE:-nmtserve-base:bookworm}
PORT=${PORT:-50061}
METRICS=${METRICS:-9061}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}

[ -f "$BUNDLE/manifest.json" ] || { echo "no bundle in $BUNDLE: run make model" >&2; exit 2; }

if ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd (--iptables=false --bridge=none)"
  (dockerd --iptables=false --bridge=none >/tmp/nmtserve-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "== building the base image $BASE with debootstrap"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >/tmp/nmtserve-debootstrap.log
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # This machine reaches the package registries through its own CA: the local base trusts
  # what the host trusts, so pip inside the build can verify the registry.
  cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root" -c . | docker import \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" - "$BASE" >/dev/null
  rm -rf "$root"
fi

echo "== docker build (BASE_IMAGE=$BASE)"
docker build --network host --target runtime --build-arg BASE_IMAGE="$BASE" -t nmtserve:check-empty . >/tmp/nmtserve-build.log 2>&1 \
  || { tail -30 /tmp/nmtserve-build.log; exit 1; }
docker build --network host --target runtime --build-arg BASE_IMAGE="$BASE" --build-arg BUNDLE="$BUNDLE" \
  -t nmtserve:check . >>/tmp/nmtserve-build.log 2>&1 || { tail -30 /tmp/nmtserve-build.log; exit 1; }
if docker run --rm --entrypoint python nmtserve:check -c "import torch" 2>/dev/null; then
  echo "FAIL: torch is importable in the serving image" >&2; exit 1
fi
if docker run --rm --entrypoint sh nmtserve:check -c "command -v gcc cc" >/dev/null 2>&1; then
  echo "FAIL: a compiler is in the serving image" >&2; exit 1
fi

echo "== docker run (host network, port $PORT)"
cid=$(docker run -d --network host --read-only --tmpfs /tmp --cap-drop ALL \
  -e NMTSERVE_HOST=127.0.0.1 -e NMTSERVE_PORT="$PORT" -e NMTSERVE_METRICS_HOST=127.0.0.1 \
  -e NMTSERVE_METRICS_PORT="$METRICS" nmtserve:check)
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 60); do
  "$PY" -m service health --target "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 1
done
"$PY" -m service health --target "127.0.0.1:$PORT"
echo "== a translation from the host"
"$PY" -m service translate --target "127.0.0.1:$PORT" "three hundred and twenty-one" "seven"
for _ in $(seq 40); do
  state=$(docker inspect --format '{{.State.Health.Status}}' "$cid")
  [ "$state" = healthy ] && break; sleep 1
done
echo "docker HEALTHCHECK: $state"
[ "$state" = healthy ]
echo "user in the container: $(docker exec "$cid" id -u)"

echo "== docker stop (SIGTERM)"
docker stop --time 30 "$cid" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$cid")
docker logs "$cid" 2>&1 | grep -E "draining|drained" || true
echo "exit code: $code"
[ "$code" = 0 ]
docker logs "$cid" 2>&1 | grep -q "drained, exiting"

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
echo "== image sizes"
echo "nmtserve:check-empty (no model): $(size nmtserve:check-empty)"
echo "nmtserve:check (default bundle baked in): $(size nmtserve:check)"
echo "base image $BASE: $(size "$BASE")"
echo "CONTAINER CHECK PASSED"
