#!/usr/bin/env bash
# Podman 4.3 (Debian 12) with its Docker-compatible API socket, for easylaunch's tests.
#
#   bash scripts/services/podman.sh start|stop|status|restart
#
# start: installs what is missing (apt: podman, curl, and what images.sh needs), writes
#   /etc/containers/containers.conf (default rlimits fail here; no network namespace, cgroupfs,
#   events to a file), starts `podman system service --time=0 unix:///run/podman/podman.sock` in
#   the foreground of its own session (PID recorded), waits until the Docker-compatible API answers
#   on that socket (GET /_ping), loads the four test images of images.sh into podman's store from
#   their tar FILES, checks through the API that each resolves by the name tests use, runs each
#   once and writes $STATE/podman.env. On a running service, start only refreshes the images and
#   rewrites the env file.
# stop: stops the API service through its recorded PID (never by name). Podman has no daemon
#   owning the containers: containers still running keep running under their conmon.
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=podman
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR
source "$HERE/images.sh"

ENV_FILE=$STATE/podman.env
SOCK=/run/podman/podman.sock
HOST_URL=unix://$SOCK
CONF=/etc/containers/containers.conf
CONF_MARK="# written by easylaunch scripts/services/podman.sh (rewritten at every start)"
SERVICE_LOG=$LOGDIR/podman-service.log
ENGINE=(podman)

api() { # PATH: GET it from the Docker-compatible API on the socket
    curl -sf --max-time 10 --unix-socket "$SOCK" "http://d$1"
}
api_ready() { [[ $(api /_ping 2>/dev/null) == OK ]]; }

write_conf() {
    if [[ -e $CONF ]] && ! grep -qxF "$CONF_MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: move it away and start again \
(this script writes default_ulimits, netns = \"none\", cgroup_manager = \"cgroupfs\" and \
events_logger = \"file\" there: podman fails here without them)"
    fi
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF.tmp" <<EOF
$CONF_MARK
[containers]
# the default rlimits fail here ("error setting rlimit type 7": no CAP_SYS_RESOURCE)
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
# no network namespace setup (no netavark/CNI bridge); containers use --network none or host
netns = "none"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    mv -f "$CONF.tmp" "$CONF"
}

write_env() {
    cat >"$ENV_FILE" <<EOF
# written by scripts/services/podman.sh start
export EASYLAUNCH_TEST_PODMAN=1
export EASYLAUNCH_TEST_PODMAN_HOST=$HOST_URL
export EASYLAUNCH_TEST_PODMAN_IMAGE=${IMAGE_NAME[bookworm]}
export EASYLAUNCH_TEST_PODMAN_PYTHON_VERSION=${IMAGE_PYTHON[bookworm]}
export EASYLAUNCH_TEST_PODMAN_IMAGE_OTHER_PYTHON=${IMAGE_NAME[bullseye]}
export EASYLAUNCH_TEST_PODMAN_OTHER_PYTHON_VERSION=${IMAGE_PYTHON[bullseye]}
export EASYLAUNCH_TEST_PODMAN_IMAGE_NOPYTHON=${IMAGE_NAME[busybox]}
export EASYLAUNCH_TEST_PODMAN_IMAGE_NOSH=${IMAGE_NAME[nosh]}
EOF
}

fail() { # MSG: show the service's log, stop what we started, exit non-zero
    printf '[%s] ERROR: %s\n' "$SVC" "$1" >&2
    tail_logs "$SERVICE_LOG"
    do_stop || true
    exit 1
}

start_service() {
    if pid_alive podman-service; then
        if api_ready; then
            log "podman API service already running (pid $(pid_get podman-service))"
            return 0
        fi
        log "podman API service (pid $(pid_get podman-service)) does not answer: restarting it"
        do_stop
    fi
    if api_ready; then
        die "a service not recorded in $PIDDIR already answers on $HOST_URL (another \
EASYLAUNCH_SERVICES_DIR, or a state dir that was deleted): stop it first; refusing to start a second one"
    fi
    mkdir -p "$(dirname "$SOCK")"
    rm -f "$SOCK" # a stale socket file of a service that died
    [[ -f $SERVICE_LOG ]] && mv -f "$SERVICE_LOG" "$SERVICE_LOG.prev"
    local t0
    t0=$(now)
    daemon_start podman-service "$SERVICE_LOG" podman system service --time=0 "$HOST_URL"
    WAIT_ALIVE=podman-service wait_until 60 api_ready || fail "the podman API does not answer on $HOST_URL within 60 s"
    log "podman $(podman --version | awk '{ print $3 }') API ready on $HOST_URL in $(elapsed "$t0") ($(api /version | "${PYTHON:-python3}" -c 'import json, sys; v = json.load(sys.stdin); print("API", v["ApiVersion"])' 2>/dev/null || echo '?'))"
}

# Each image must resolve through the Docker-compatible API under the name tests give the SDK.
check_api_names() {
    local key name
    for key in "${IMAGE_KEYS[@]}"; do
        name=${IMAGE_NAME[$key]}
        api "/v1.41/images/$name/json" >/dev/null ||
            fail "image $name is in podman's store but GET /images/$name/json on $HOST_URL does not find it"
    done
}

do_start() {
    local t0
    t0=$(now)
    WANT_CP=$(wanted_cloudpickle)
    trap images_wait_quietly EXIT
    apt_ensure "${IMAGE_DEBOOTSTRAP_PACKAGES[@]}"
    images_build_background bookworm bullseye
    apt_ensure podman curl "${IMAGE_PACKAGES[@]}"
    command -v podman >/dev/null || die "podman not found after installing it"
    write_conf
    start_service
    image_build busybox
    image_build nosh
    images_wait
    images_load podman
    check_api_names
    images_check podman || fail "the test images do not run on podman"
    write_env
    log "ready in $(elapsed "$t0"); images: $(image_names); env: $ENV_FILE"
}

do_stop() {
    pid_stop podman-service 20
}

do_status() {
    if pid_alive podman-service; then
        echo "podman-service: running (pid $(pid_get podman-service))"
    else
        echo "podman-service: not running"
        return 1
    fi
    if ! api_ready; then
        echo "podman API: does not answer on $HOST_URL"
        return 1
    fi
    echo "podman API: answers on $HOST_URL"
    podman images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' | grep 'easylaunch' || true
}

case ${1:-} in
start) do_start ;;
stop) do_stop; log "stopped" ;;
restart) do_stop; do_start ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
