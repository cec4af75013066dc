#!/usr/bin/env bash
# Opt-in container check (make container-check): build the Dockerfile unchanged on a locally
# built Debian base, with the default bundle baked in and without one; check that a corrupt
# mounted bundle is refused and a good one served; run the baked image, check health and a
# translation from the host, stop it with SIGTERM and check that it drained and exited 0; print
# the image sizes.
#
# Needs root, Debian's docker.io and debootstrap (apt-get install docker.io debootstrap), and the
# default bundle (make model). Uses the host network only: the daemon runs with
# --iptables=false --bridge=none, as this machine allows (deploy/docker-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${BUNDLE:-models/default}
BASE=${BASE:-nmtserve-base:bookworm}
PORT=${PORT:-50061}
METRICS=${METRICS:-9061}
source deploy/docker-env.sh

[ -f "$BUNDLE/manifest.json" ] || { echo "no bundle in $BUNDLE: run make model" >&2; exit 2; }
ensure_dockerd
base_image "$BASE" python3,python3-venv,ca-certificates

echo "== docker build (BASE_IMAGE=$BASE)"
docker build --network host --target runtime --build-arg BASE_IMAGE="$BASE" --build-arg BUNDLE="$BUNDLE" \
  -t nmtserve:check . >/tmp/nmtserve-build.log 2>&1 || { tail -30 /tmp/nmtserve-build.log; exit 1; }
docker build --network host --target runtime --build-arg BASE_IMAGE="$BASE" \
  --build-arg BUNDLE=deploy/empty-bundle -t nmtserve:check-empty . >>/tmp/nmtserve-build.log 2>&1 \
  || { tail -30 /tmp/nmtserve-build.log; exit 1; }
echo "onnxruntime in the image: $(docker run --rm --entrypoint python nmtserve:check -c \
  'import onnxruntime; print(onnxruntime.__version__)')"
if docker run --rm --entrypoint python nmtserve:check -c "import torch" 2>/dev/null; then
  echo "FAIL: torch is importable in the serving image" >&2; exit 1
fi
if docker run --rm --entrypoint sh nmtserve:check -c "command -v gcc cc" >/dev/null 2>&1; then
  echo "FAIL: a compiler is in the serving image" >&2; exit 1
fi

echo "== a mounted bundle: checksums verified at start"
# copies readable by the container's user (uid 10001), as a volume would be
good=$(mktemp -d); cp -R "$BUNDLE/." "$good/"; chmod -R a+rX "$good"
bad=$(mktemp -d); cp -R "$good/." "$bad/"; chmod a+rx "$bad"; printf 'x' >>"$bad/tokenizer.model"
set +e
docker run --rm --network host --read-only -v "$bad:/models/default:ro" \
  -e NMTSERVE_HOST=127.0.0.1 -e NMTSERVE_PORT="$PORT" -e NMTSERVE_METRICS_PORT=0 \
  nmtserve:check-empty >/tmp/nmtserve-corrupt.log 2>&1
code=$?
set -e
rm -rf "$bad"
grep -o '[^"]*sha256 does not match[^"]*' /tmp/nmtserve-corrupt.log | head -1
echo "a corrupt mounted bundle: exit code $code"
[ "$code" = 2 ] && grep -q "tokenizer.model: sha256 does not match" /tmp/nmtserve-corrupt.log
mounted=$(docker run -d --network host --read-only --tmpfs /tmp --cap-drop ALL \
  -v "$good:/models/default:ro" -e NMTSERVE_HOST=127.0.0.1 -e NMTSERVE_PORT="$PORT" \
  -e NMTSERVE_METRICS_PORT=0 nmtserve:check-empty)
for _ in $(seq 60); do
  "$PY" -m service health --target "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 1
done
echo "the image without a model, the bundle mounted: $("$PY" -m service health --target "127.0.0.1:$PORT")"
docker stop --time 30 "$mounted" >/dev/null && docker rm "$mounted" >/dev/null
rm -rf "$good"

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
echo "nmtserve:check-empty (no model, BUNDLE=deploy/empty-bundle): $(size nmtserve:check-empty)"
echo "nmtserve:check (default bundle baked in): $(size nmtserve:check)"
echo "base image $BASE: $(size "$BASE")"
echo "CONTAINER CHECK PASSED"
