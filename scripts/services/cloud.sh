#!/usr/bin/env bash
# Cloud emulators for easylaunch's modes 'ec2' and 'gcp' (no cloud account exists here).
#
#   bash scripts/services/cloud.sh start|stop|status|restart
#
# start: makes a venv of its own ($CACHE/cloud-venv: moto[server], gcp-storage-emulator, boto3,
#   google-cloud-compute, google-cloud-storage, cloudpickle, jinja2; pip installs from PyPI, kept
#   between runs), then starts, each in its own session with its PID recorded:
#     moto   EC2 + S3 + IAM on 127.0.0.1:$MOTO_PORT (EASYLAUNCH_TEST_MOTO_PORT, default 5000)
#     gcs    gcp-storage-emulator on 127.0.0.1:$GCS_PORT (default 9023), in memory
#   and writes $STATE/cloud.env (EASYLAUNCH_TEST_CLOUD_VENV and the emulators' URLs).
#   The test suite starts emulators and `python -m easylaunch.cloudsim` players of its own
#   (tests/cloudsim_fixtures.py, fresh state per test session) from this venv; the shared ones
#   are there to rehearse by hand (README "Rehearsing a cloud launch").
# stop: stops what start started, by the recorded PIDs.
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=cloud
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"

CACHE=/var/cache/easylaunch-test
VENV=$CACHE/cloud-venv
VENV_VERSION=1 # bump to rebuild the venv
ENV_FILE=$STATE/cloud.env
MOTO_PORT=${EASYLAUNCH_TEST_MOTO_PORT:-5000}
GCS_PORT=${EASYLAUNCH_TEST_GCS_PORT:-9023}
PACKAGES=("moto[server]>=5" "gcp-storage-emulator" "boto3>=1.26" "google-cloud-compute>=1.10"
    "google-cloud-storage>=2.7" "cloudpickle>=2.0" "jinja2>=3.0")

ensure_venv() {
    local want t0
    want="v$VENV_VERSION ${PACKAGES[*]}"
    if [[ -x $VENV/bin/python && $(cat "$VENV/.stamp" 2>/dev/null) == "$want" ]]; then
        return 0
    fi
    t0=$(now)
    log "making $VENV (${PACKAGES[*]})"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${PACKAGES[@]}" >"$LOGDIR/cloud-pip.log" 2>&1 ||
        { tail_logs "$LOGDIR/cloud-pip.log"; die "pip install into $VENV failed"; }
    echo "$want" >"$VENV/.stamp"
    log "venv ready in $(elapsed "$t0")"
}

http_ok() { "$VENV/bin/python" - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read()
except urllib.error.HTTPError:
    pass  # an answer, even an error one, means it listens
EOF
}

start_one() { # NAME URL CMD...: start unless running, wait until URL answers
    local name=$1 url=$2
    shift 2
    if pid_alive "$name"; then
        log "$name already running (pid $(pid_get "$name"))"
        return 0
    fi
    daemon_start "$name" "$LOGDIR/$name.log" "$@"
    if ! WAIT_ALIVE=$name wait_until 30 http_ok "$url"; then
        tail_logs "$LOGDIR/$name.log"
        die "$name did not answer at $url"
    fi
}

do_start() {
    local t0
    t0=$(now)
    ensure_venv
    start_one moto "http://127.0.0.1:$MOTO_PORT/moto-api/" \
        "$VENV/bin/python" -m moto.server -H 127.0.0.1 -p "$MOTO_PORT"
    start_one gcs "http://127.0.0.1:$GCS_PORT/storage/v1/b" \
        "$VENV/bin/gcp-storage-emulator" start --host 127.0.0.1 --port "$GCS_PORT" --in-memory
    cat >"$ENV_FILE" <<EOF
# written by scripts/services/cloud.sh: the cloud emulators (source this file)
export EASYLAUNCH_TEST_CLOUD_VENV=$VENV
export EASYLAUNCH_TEST_MOTO_URL=http://127.0.0.1:$MOTO_PORT
export EASYLAUNCH_TEST_GCS_URL=http://127.0.0.1:$GCS_PORT
EOF
    log "cloud emulators up in $(elapsed "$t0") (moto :$MOTO_PORT, gcs :$GCS_PORT)"
}

do_stop() {
    pid_stop moto 10
    pid_stop gcs 10
    rm -f "$ENV_FILE"
}

do_status() {
    local name rc=0
    for name in moto gcs; do
        if pid_alive "$name"; then
            echo "$name: running (pid $(pid_get "$name"))"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    return $rc
}

case ${1:-} in
start) do_start ;;
stop) do_stop; log "stopped" ;;
restart) do_stop; do_start ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
