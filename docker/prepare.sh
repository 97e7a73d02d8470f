#!/usr/bin/env bash
# What the compose tests need, made if missing: a Docker engine (Debian's docker.io, started
# here), a base image (debootstrap: no registry is needed) and the Chorus image built from it.
# Run by `make test`; idempotent. Needs root and apt where no engine runs yet.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${CHORUS_BASE_IMAGE:-chorus-base:bookworm}
IMAGE=${CHORUS_IMAGE:-chorus:latest}
DOCKER=/usr/bin/docker   # Debian's client: BuildKit (build secrets) without the buildx plugin

if ! { [ -x "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; }; then
    if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ]; then
        echo "docker/prepare.sh: installing Debian's docker.io, docker-compose and debootstrap" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
    fi
    if ! "$DOCKER" info >/dev/null 2>&1; then
        (setsid /usr/sbin/dockerd >/tmp/chorus-dockerd.log 2>&1 &)
        for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
        "$DOCKER" info >/dev/null || { echo "dockerd did not start: /tmp/chorus-dockerd.log" >&2; exit 1; }
    fi
fi
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null

if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    echo "docker/prepare.sh: making the base image $BASE (debootstrap bookworm)" >&2
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    tar -C "$root" -c . | "$DOCKER" import - "$BASE" >/dev/null
    rm -rf "$root"
fi

# torch's CPU build where pip finds one on this machine (PyPI's own is a CUDA build)
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    cp -n "$dir"/torch-*+cpu-*.whl docker/wheels/ 2>/dev/null || true
done
secret=()
if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
    secret=(--secret "id=ca,src=$SSL_CERT_FILE")
fi
torch_index=()
if ls docker/wheels/torch-*.whl >/dev/null 2>&1; then torch_index=(--build-arg TORCH_INDEX=); fi
echo "docker/prepare.sh: building $IMAGE" >&2
DOCKER_BUILDKIT=1 "$DOCKER" build -q "${secret[@]}" "${torch_index[@]}" \
    --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" . >/dev/null
