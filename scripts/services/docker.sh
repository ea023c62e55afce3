#!/usr/bin/env bash
# A real Docker engine (dockerd 20.10 of Debian 12) for easylaunch's tests, with local images.
#
#   bash scripts/services/docker.sh start|stop|status|restart
#
# start: installs what is missing (apt: docker.io, busybox-static, tini, debootstrap), starts
#   `dockerd --bridge=none --iptables=false --ip6tables=false` (no bridge, no NAT rules: containers
#   use --network none or host) on unix:///var/run/docker.sock in the foreground of its own session,
#   PID recorded (and that of the containerd it starts), waits until `docker info` answers, then
#   makes sure the four test images of images.sh are in its store (built from cached root file
#   system tars, no registry), runs each once and writes $STATE/docker.env. On a running dockerd,
#   start only refreshes the images (when their tars changed) and rewrites the env file.
# stop: stops dockerd through its recorded PID (dockerd first stops its running containers,
#   SIGKILL after their stop timeout, 10 s by default, and its containerd), then that containerd
#   if it outlived dockerd. Never by name.
# restart: stop, then start (tests restart dockerd in the middle of a sweep).
# The env file does not set DOCKER_HOST: tests pass EASYLAUNCH_TEST_DOCKER_HOST where they mean it.
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=docker
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR
source "$HERE/images.sh"

ENV_FILE=$STATE/docker.env
SOCK=/var/run/docker.sock
HOST_URL=unix://$SOCK
DOCKERD_PIDFILE=/var/run/docker.pid
EXEC_ROOT=/var/run/docker
CONTAINERD_PIDFILE=$EXEC_ROOT/containerd/containerd.pid
DOCKERD_LOG=$LOGDIR/dockerd.log
DOCKERD_ARGS=(--bridge=none --iptables=false --ip6tables=false --userland-proxy=false
    --host="$HOST_URL" --pidfile="$DOCKERD_PIDFILE" --exec-root="$EXEC_ROOT"
    --data-root=/var/lib/docker)
ENGINE=(docker -H "$HOST_URL")

docker_ready() { timeout 10 "${ENGINE[@]}" info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

write_env() {
    cat >"$ENV_FILE" <<EOF
# written by scripts/services/docker.sh start
export EASYLAUNCH_TEST_DOCKER=1
export EASYLAUNCH_TEST_DOCKER_HOST=$HOST_URL
export EASYLAUNCH_TEST_DOCKER_IMAGE=${IMAGE_NAME[bookworm]}
export EASYLAUNCH_TEST_DOCKER_PYTHON_VERSION=${IMAGE_PYTHON[bookworm]}
export EASYLAUNCH_TEST_DOCKER_IMAGE_OTHER_PYTHON=${IMAGE_NAME[bullseye]}
export EASYLAUNCH_TEST_DOCKER_OTHER_PYTHON_VERSION=${IMAGE_PYTHON[bullseye]}
export EASYLAUNCH_TEST_DOCKER_IMAGE_NOPYTHON=${IMAGE_NAME[busybox]}
export EASYLAUNCH_TEST_DOCKER_IMAGE_NOSH=${IMAGE_NAME[nosh]}
EOF
}

fail() { # MSG: show dockerd's log, stop what we started, exit non-zero
    printf '[%s] ERROR: %s\n' "$SVC" "$1" >&2
    tail_logs "$DOCKERD_LOG"
    do_stop || true
    exit 1
}

start_dockerd() {
    if pid_alive dockerd; then
        if docker_ready; then
            log "dockerd already running (pid $(pid_get dockerd))"
            return 0
        fi
        log "dockerd (pid $(pid_get dockerd)) does not answer: restarting it"
        do_stop
    fi
    if docker_ready; then
        die "a dockerd not recorded in $PIDDIR already answers on $HOST_URL (another \
EASYLAUNCH_SERVICES_DIR, or a state dir that was deleted): stop it first; refusing to start a second one"
    fi
    pid_stop docker-containerd 15 # a containerd left by a dockerd that died
    [[ -f $DOCKERD_LOG ]] && mv -f "$DOCKERD_LOG" "$DOCKERD_LOG.prev"
    local t0
    t0=$(now)
    daemon_start dockerd "$DOCKERD_LOG" dockerd "${DOCKERD_ARGS[@]}"
    WAIT_ALIVE=dockerd wait_until 60 docker_ready || fail "dockerd not ready within 60 s"
    # dockerd starts (and normally stops) its own containerd: record it too, to stop it by PID
    # if it outlives dockerd.
    if wait_until 10 test -s "$CONTAINERD_PIDFILE"; then
        pid_record docker-containerd "$(cat "$CONTAINERD_PIDFILE")"
    else
        warn "no $CONTAINERD_PIDFILE: dockerd uses a containerd it did not start"
    fi
    log "dockerd $("${ENGINE[@]}" info --format '{{.ServerVersion}} (storage {{.Driver}}, cgroup {{.CgroupDriver}})') ready in $(elapsed "$t0")"
}

do_start() {
    local t0
    t0=$(now)
    WANT_CP=$(wanted_cloudpickle)
    trap images_wait_quietly EXIT
    # The two debootstraps (bullseye; bookworm unless apptainer.sh's root is reused) need only
    # debootstrap: they run in the background while docker.io installs and dockerd starts.
    apt_ensure "${IMAGE_DEBOOTSTRAP_PACKAGES[@]}"
    images_build_background bookworm bullseye
    apt_ensure docker.io "${IMAGE_PACKAGES[@]}"
    command -v dockerd >/dev/null || die "dockerd not found after installing docker.io"
    start_dockerd
    image_build busybox
    image_build nosh
    images_wait
    images_load docker
    images_check docker || fail "the test images do not run on dockerd"
    local mine
    mine=$("${PYTHON:-python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    [[ ${IMAGE_PYTHON[bookworm]} == "$mine" ]] ||
        warn "${IMAGE_NAME[bookworm]} has python ${IMAGE_PYTHON[bookworm]}, ${PYTHON:-python3} here is $mine"
    write_env
    log "ready in $(elapsed "$t0"); images: $(image_names); env: $ENV_FILE"
}

do_stop() {
    # dockerd stops its running containers (SIGTERM, then SIGKILL after each container's stop
    # timeout: 10 s unless it was created with another) and its containerd before it exits.
    pid_stop dockerd 40
    pid_stop docker-containerd 15
}

do_status() {
    local rc=0
    if pid_alive dockerd; then
        echo "dockerd: running (pid $(pid_get dockerd))"
        if docker_ready; then
            echo "dockerd: answers on $HOST_URL"
        else
            echo "dockerd: does not answer"
            rc=1
        fi
    else
        echo "dockerd: not running"
        rc=1
    fi
    if [[ $rc == 0 ]]; then
        "${ENGINE[@]}" images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' | grep '^local/easylaunch' || true
    fi
    return $rc
}

case ${1:-} in
start) do_start ;;
stop) do_stop; log "stopped" ;;
restart) do_stop; do_start ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
