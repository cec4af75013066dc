#!/usr/bin/env bash
# Opt-in (make cuda-image-check): build the Dockerfile's cuda target, without running it.
#
# No CUDA image is reachable here, so a locally built Debian base WITHOUT Python stands in for
# CUDA_BASE_IMAGE (like the CUDA runtime images, which carry none): the build then has to
# install python3 itself, which is the step the CUDA base needs. What this proves: every
# Dockerfile step of the cuda target runs, onnxruntime-gpu installs at the CPU image's pinned
# version and offers the CUDA provider, and that its CUDA provider links the CUDA major version
# of the default CUDA_BASE_IMAGE (tests/test_deploy.py reads it from the built image). What it
# cannot prove: CUDA itself (no GPU, no CUDA libraries in the stand-in base).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=${BUNDLE:-models/default}
STANDIN=${STANDIN:-nmtserve-base:bookworm-nopython}
# Docker's classic builder runs every stage before the target, the CPU ones too: their base
BASE=${BASE:-nmtserve-base:bookworm}
source deploy/docker-env.sh

[ -f "$BUNDLE/manifest.json" ] || { echo "no bundle in $BUNDLE: run make model" >&2; exit 2; }
ensure_dockerd
base_image "$STANDIN" ca-certificates
base_image "$BASE" python3,python3-venv,ca-certificates
if docker run --rm --entrypoint sh "$STANDIN" -c "command -v python3" >/dev/null 2>&1; then
  echo "FAIL: the stand-in base $STANDIN has python3" >&2; exit 1
fi

echo "== docker build --target cuda (CUDA_BASE_IMAGE=$STANDIN)"
docker build --network host --target cuda --build-arg CUDA_BASE_IMAGE="$STANDIN" \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg BUNDLE="$BUNDLE" -t nmtserve:check-cuda . >/tmp/nmtserve-build-cuda.log 2>&1 \
  || { tail -30 /tmp/nmtserve-build-cuda.log; exit 1; }
docker run --rm --entrypoint python nmtserve:check-cuda -c "
import importlib.metadata as md, onnxruntime as ort
from service.devicecache import DeviceCacheOps  # onnx is there, and this onnxruntime loads
DeviceCacheOps(['CPUExecutionProvider'], 'cpu')  # the copy graphs (on its CPU provider: no GPU)
print('python', __import__('sys').version.split()[0])
print('onnxruntime-gpu', md.version('onnxruntime-gpu'), 'providers:', ort.get_available_providers())
assert 'CUDAExecutionProvider' in ort.get_available_providers()
try:
    md.version('onnxruntime')
    raise SystemExit('FAIL: the CPU onnxruntime package is installed beside onnxruntime-gpu')
except md.PackageNotFoundError:
    pass
"
docker run --rm --entrypoint sh nmtserve:check-cuda -c "ls /models/default/manifest.json; id -u"
grep "links CUDA" /tmp/nmtserve-build-cuda.log | tail -1 || true
"$PY" -m pytest -q -p no:cacheprovider tests/test_deploy.py -k default_cuda_base_has_the_cuda
echo "nmtserve:check-cuda: $(docker image inspect --format '{{.Size}}' nmtserve:check-cuda | awk '{printf "%.0f MB", $1/1e6}')"
echo "CUDA IMAGE BUILT (not run: no GPU here)"
