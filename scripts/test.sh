#!/usr/bin/env bash
# The whole test suite on a fresh machine, unattended:
#   bash scripts/test.sh [pytest args...]
# 1. creates a virtual environment and installs easylaunch (non-editable) with its test extras;
# 2. starts every service listed in scripts/services/ENABLED (real Slurm, Apptainer, ...), each
#    of which installs what it needs, and stops them by PID on exit;
# 3. runs pytest.
# EASYLAUNCH_TEST_SERVICES="slurm" limits the services; EASYLAUNCH_TEST_SERVICES=none starts none
# (tests needing a service then skip locally, and fail under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${EASYLAUNCH_VENV:-$ROOT/.venv-test}
export EASYLAUNCH_SERVICES_DIR=${EASYLAUNCH_SERVICES_DIR:-/tmp/easylaunch-services}
PYTHON=${PYTHON:-python3}

log() { printf '[test.sh] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
log "installing easylaunch[test] into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$ROOT"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$ROOT[test]"
export PATH="$VENV/bin:$PATH"
# the services (e.g. the Apptainer image) must match this environment's cloudpickle
EASYLAUNCH_TEST_CLOUDPICKLE_VERSION=$("$VENV/bin/python" -c 'import cloudpickle; print(cloudpickle.__version__)')
export EASYLAUNCH_TEST_CLOUDPICKLE_VERSION

if [ "${EASYLAUNCH_TEST_SERVICES:-all}" = all ]; then
    # the services the suite needs, in start order: one name a line in scripts/services/ENABLED
    SERVICES=$(grep -v '^[[:space:]]*#' scripts/services/ENABLED | xargs)
elif [ "${EASYLAUNCH_TEST_SERVICES}" = none ]; then
    SERVICES=""
else
    SERVICES=$EASYLAUNCH_TEST_SERVICES
fi

STARTED=()
stop_services() {
    for svc in "${STARTED[@]}"; do
        bash "$ROOT/scripts/services/$svc.sh" stop || log "stopping $svc failed"
    done
}
trap stop_services EXIT

for svc in $SERVICES; do
    log "starting service $svc"
    STARTED+=("$svc")
    bash "$ROOT/scripts/services/$svc.sh" start
    # shellcheck disable=SC1090
    source "$EASYLAUNCH_SERVICES_DIR/$svc.env"
done
export EASYLAUNCH_TEST_SERVICES_STARTED="${SERVICES//$'\n'/ }"

log "running pytest"
cd "$ROOT/tests"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
status=$?
set -e
exit $status
