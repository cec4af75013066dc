# Sourced by the container checks: a Docker daemon and Debian base images built locally, for a
# machine that reaches Debian's mirror and PyPI but no image registry (no Docker Hub).
#   ensure_dockerd                    start dockerd (host network only) unless one answers
#   base_image NAME PACKAGES          debootstrap bookworm (minbase + PACKAGES, comma-separated)
#                                     and import it as NAME, unless NAME exists
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}

ensure_dockerd() {
  docker info >/dev/null 2>&1 && return 0
  echo "== starting dockerd (--iptables=false --bridge=none)"
  (dockerd --iptables=false --bridge=none >/tmp/nmtserve-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
}

base_image() {
  local name=$1 packages=$2 root
  docker image inspect "$name" >/dev/null 2>&1 && return 0
  echo "== building the base image $name with debootstrap ($packages)"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$MIRROR" \
    >"/tmp/nmtserve-debootstrap-${name//[:\/]/_}.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # This machine reaches the package registries through its own CA: the local base trusts
  # what the host trusts, so pip (and apt) inside a build can verify the registry.
  cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root" -c . | docker import \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" - "$name" >/dev/null
  rm -rf "$root"
}
