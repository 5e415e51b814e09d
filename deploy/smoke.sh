#!/usr/bin/env bash
# The container smoke test (`make container-smoke`; .ci/run runs it after the tests): builds the image and runs
# compose.yaml with podman-compose, then sends the castle through nginx -> web -> Redis -> 2 workers (random
# weights) and checks the answers. Needs no container registry:
#   1. podman, buildah, debootstrap, runc from apt-get (when missing, as root); podman-compose from PyPI into
#      its own venv (SMOKE_VENV);
#   2. a Debian bookworm base image from debootstrap --variant=minbase and `podman import` (once; kept);
#   3. the project image FROM it (Dockerfile; pip's CA bundle passed as the build secret pip_cert);
#   4. `podman-compose up` with nginx published on a free port of 127.0.0.1, requests, `podman-compose down`.
# Every step has a hard timeout; the stack is taken down on any exit (images stay, so a rerun builds only
# what changed). podman runs with deploy/containers.conf: runc, with explicit ulimits (crun fails where
# cgroups are in hybrid mode).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CONTAINERS_CONF="$ROOT/deploy/containers.conf"
BASE_IMAGE=${BASE_IMAGE:-localhost/imgserve-base:bookworm}
IMAGE=${IMAGE:-localhost/imgserve:latest}
PROJECT=imgserve-smoke
SMOKE_VENV=${SMOKE_VENV:-$HOME/.cache/imgserve-podman-compose}
PODMAN_COMPOSE_VERSION=1.6.0
REQUESTS=${SMOKE_REQUESTS:-8}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
CASTLE="$ROOT/../shared/images/castle_image.jpg"
[ -f "$CASTLE" ] || CASTLE="$ROOT/examples/sample.jpg"
START=$(date +%s)

say() { echo "== smoke [$(($(date +%s) - START))s] $*"; }

install_tools() {
    local missing=()
    for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        timeout 300 apt-get update -qq
        timeout 600 apt-get install -y -qq podman buildah debootstrap runc
    fi
    if [ ! -x "$SMOKE_VENV/bin/podman-compose" ]; then
        say "installing podman-compose $PODMAN_COMPOSE_VERSION into $SMOKE_VENV"
        timeout 60 python3 -m venv "$SMOKE_VENV"
        timeout 300 "$SMOKE_VENV/bin/pip" install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
    say "$(podman --version); $(runc --version | head -1); $("$SMOKE_VENV/bin/podman-compose" --version 2>/dev/null | head -1)"
}

# The Debian mirror this machine's apt already uses (DEBIAN_MIRROR overrides it): the base image comes from the
# same place as every other package here.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list \
        | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb +(\[[^]]*\] +)?//; s/ .*//')
    [ -n "$uri" ] || { echo "no Debian mirror in /etc/apt; set DEBIAN_MIRROR" >&2; return 1; }
    echo "$uri"
}

build_base() {
    if podman image exists "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE is there"
        return
    fi
    local rootfs
    rootfs=$(mktemp -d /tmp/imgserve-rootfs.XXXXXX)
    say "debootstrap --variant=minbase bookworm into $rootfs"
    timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$(debian_mirror)" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    timeout 300 bash -c "tar -C '$rootfs' -c . | podman import - '$BASE_IMAGE'" >/dev/null
    rm -rf "$rootfs"
    say "imported $BASE_IMAGE"
}

build_image() {
    local began=$SECONDS
    say "building $IMAGE FROM $BASE_IMAGE (Dockerfile)"
    timeout 2400 podman build --format docker --network host --layers --build-arg "BASE=$BASE_IMAGE" \
        --secret "id=pip_cert,src=$CA_BUNDLE" -t "$IMAGE" . >/tmp/imgserve-smoke-build.log 2>&1 || {
        tail -40 /tmp/imgserve-smoke-build.log
        return 1
    }
    say "built $IMAGE in $((SECONDS - began)) s; size $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
}

compose() {
    timeout "${COMPOSE_TIMEOUT:-300}" "$SMOKE_VENV/bin/podman-compose" -p "$PROJECT" -f "$ROOT/compose.yaml" "$@"
}

down() {
    say "podman-compose down"
    COMPOSE_TIMEOUT=180 compose down -t 20 >/dev/null 2>&1 || echo "smoke: podman-compose down failed" >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {
    local url=$1 deadline=$((SECONDS + 300)) body=""
    while [ $SECONDS -lt $deadline ]; do
        body=$(curl -s --max-time 5 "$url/readyz" || true)
        if python3 -c 'import json, sys; b = json.loads(sys.argv[1]); sys.exit(0 if b.get("workers", 0) >= 2 else 1)' \
            "$body" 2>/dev/null; then
            say "ready: $body"
            return 0
        fi
        sleep 3
    done
    echo "smoke: the stack was not ready with 2 workers within 300 s; last /readyz: $body" >&2
    compose logs --tail 30 >&2 || true
    return 1
}

# Posts the castle REQUESTS times, 4 at a time; every answer must be a success with 5 predictions.
predict() {
    local url=$1 out
    out=$(mktemp -d /tmp/imgserve-smoke.XXXXXX)
    say "POST $REQUESTS x $(basename "$CASTLE") to $url/predict (4 at a time)"
    seq "$REQUESTS" | xargs -P 4 -I{} curl -s --max-time 60 -o "$out/{}.json" -w '%{http_code} %{time_total}s\n' \
        -F "image=@$CASTLE" "$url/predict"
    python3 - "$out" <<'EOF'
import json, pathlib, sys
answers = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
good = [a for a in answers if a.get("success") and len(a.get("predictions", [])) == 5]
top = good[0]["predictions"][0] if good else None
print(f"== smoke: {len(good)} of {len(answers)} answers succeeded; first top prediction: {top}")
sys.exit(0 if answers and len(good) == len(answers) else 1)
EOF
    rm -rf "$out"
}

# Each worker's finished jobs and queue waits, from its own /metrics inside its container (nothing published).
per_worker() {
    local name
    for name in $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' | grep worker); do
        say "$name: $(timeout 30 podman exec "$name" python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9100/metrics").read().decode())' \
            | grep -E '^(worker_jobs_total\{outcome="done"\}|worker_queue_wait_seconds_(count|sum))' | tr '\n' ' ' || echo 'no jobs')"
    done
}

main() {
    install_tools
    build_base
    build_image
    local port
    port=$(free_port)
    export IMGSERVE_IMAGE="$IMAGE" REDIS_IMAGE="$IMAGE" MODEL_WEIGHTS=none WORKERS=2 HTTP_PORT="$port" HTTP_BIND=127.0.0.1
    export API_KEYS="" QUEUE_SHARDS=1 WEB_PROCESSES=1
    trap down EXIT
    say "podman-compose up (nginx on 127.0.0.1:$port)"
    compose up -d >/tmp/imgserve-smoke-up.log 2>&1 || {
        tail -30 /tmp/imgserve-smoke-up.log
        return 1
    }
    podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '   {{.Names}}  {{.Status}}'
    wait_ready "http://127.0.0.1:$port"
    predict "http://127.0.0.1:$port"
    per_worker
    say "passed in $(($(date +%s) - START)) s"
}

main "$@"
