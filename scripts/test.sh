#!/usr/bin/env bash
# The whole test suite on a fresh machine, unattended:
#   bash scripts/test.sh [pytest args...]
# 1. creates a virtual environment and installs easylaunch (non-editable) with its test extras;
# 2. starts every service listed in scripts/services/ENABLED (real Slurm, Apptainer, ...), each
#    of which installs what it needs, and stops them by PID on exit;
# 3. runs pytest, with line coverage of every Python process it starts (report at the end;
#    EASYLAUNCH_TEST_COVERAGE=0 turns it off).
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

# The fast offline part of the suite and the quickstart on every other supported CPython minor
# this machine has under pyenv (scripts/pythons.sh), each in its own venv (.venv-test-3.N), within
# a time budget (EASYLAUNCH_TEST_PYTHONS_BUDGET seconds a minor, default 240);
# EASYLAUNCH_TEST_PYTHONS=0 skips it (it is skipped too when pytest arguments are given, unless
# EASYLAUNCH_TEST_PYTHONS=1). Any failure fails the test command (after the main suite).
OFFLINE_TESTS="test_api.py test_config_sweep.py test_slurm_config.py test_slurm_offline.py test_shell_quoting.py test_supported_pythons.py"
MAIN_MINOR=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
other_pythons_status=0
if [ "${EASYLAUNCH_TEST_PYTHONS:-$([ $# = 0 ] && echo 1 || echo 0)}" != 0 ]; then
    while read -r minor exe; do
        [ -n "$minor" ] && [ "$minor" != "$MAIN_MINOR" ] || continue
        venv="$ROOT/.venv-test-$minor"
        log "Python $minor ($exe): offline tests and the quickstart in $venv"
        start=$SECONDS
        set +e  # (errexit is ignored in a condition: the subshell's status is read below)
        (
            set -e
            [ -x "$venv/bin/python" ] || "$exe" -m venv "$venv"
            "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$ROOT"
            "$venv/bin/python" -m pip install -q --disable-pip-version-check "$ROOT" "pytest>=7" "pytest-timeout>=2.1"
            quick=$(mktemp -d "${TMPDIR:-/tmp}/easylaunch-quickstart.XXXXXX")
            trap 'rm -rf "$quick"' EXIT
            cd "$ROOT/tests"
            budget=${EASYLAUNCH_TEST_PYTHONS_BUDGET:-240}
            EASYLAUNCH_LOG_DIR="$quick/logs" timeout "$budget" "$venv/bin/python" "$ROOT/examples/local_sweep.py" >"$quick/out.txt"
            grep -q "12 runs: " "$quick/out.txt"
            # shellcheck disable=SC2086
            timeout "$budget" "$venv/bin/python" -m pytest -p no:cacheprovider -q -x $OFFLINE_TESTS
        ) </dev/null
        rc=$?
        set -e
        if [ "$rc" != 0 ]; then
            log "Python $minor: FAILED (exit $rc; 124: over the budget)"
            other_pythons_status=1
        else
            log "Python $minor: passed in $((SECONDS - start)) s"
        fi
    done < <(bash "$ROOT/scripts/pythons.sh")
fi

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

# Line coverage of every Python process the suite starts (pytest, runners, task runners,
# dispatchers, the CLI, Slurm jobs), unless EASYLAUNCH_TEST_COVERAGE=0: a .pth in the test venv
# imports scripts/easylaunch_coverage_start.py, which starts coverage with the config named by
# EASYLAUNCH_COVERAGE_START (scripts/coverage.ini, written into the data dir) in every process
# that imports easylaunch; each writes its own data file there (Slurm jobs inherit the
# environment and see the same /tmp); the files are combined and reported after pytest.
COVERAGE=${EASYLAUNCH_TEST_COVERAGE:-1}
if [ "$COVERAGE" = 1 ]; then
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp scripts/easylaunch_coverage_start.py "$SITE/"
    echo "import easylaunch_coverage_start" >"$SITE/easylaunch-coverage.pth"
    EASYLAUNCH_COVERAGE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/easylaunch-coverage.XXXXXX")
    chmod 755 "$EASYLAUNCH_COVERAGE_DIR"
    sed "s#\${EASYLAUNCH_COVERAGE_DIR}#$EASYLAUNCH_COVERAGE_DIR#" scripts/coverage.ini >"$EASYLAUNCH_COVERAGE_DIR/coverage.ini"
    export EASYLAUNCH_COVERAGE_START="$EASYLAUNCH_COVERAGE_DIR/coverage.ini"
fi
report_coverage() {
    # never changes the tests' outcome: any failure here is only logged
    local dir=$EASYLAUNCH_COVERAGE_DIR cov=("$VENV/bin/python" -m coverage) pid files
    unset EASYLAUNCH_COVERAGE_START
    cd "$ROOT"
    pid=$(cat "$dir/pytest.pid" 2>/dev/null || true)
    files=$(find "$dir" -maxdepth 1 -name '.coverage.*' | wc -l)
    log "coverage: combining $files data files (pytest and every process it started)"
    if [ -n "$pid" ] && ls "$dir"/.coverage.*.pid"$pid".* >/dev/null 2>&1; then
        "${cov[@]}" combine --keep -q --rcfile="$dir/coverage.ini" --data-file="$dir/pytest-only" \
            "$dir"/.coverage.*.pid"$pid".* &&
            log "coverage: $("${cov[@]}" report --rcfile="$dir/coverage.ini" --data-file="$dir/pytest-only" --format=total)% in the pytest process alone"
    fi
    "${cov[@]}" combine -q --rcfile="$dir/coverage.ini" --data-file="$ROOT/.coverage" "$dir" &&
        "${cov[@]}" report --rcfile="$dir/coverage.ini" --data-file="$ROOT/.coverage" &&
        log "coverage: data in $ROOT/.coverage (\`$VENV/bin/python -m coverage html\` for a browsable report)"
    rm -rf "$dir"
}
log "running pytest"
cd "$ROOT/tests"
set +e
# the subshell becomes pytest (exec): its pid names pytest's own coverage data file
(
    [ "$COVERAGE" != 1 ] || echo "$BASHPID" >"$EASYLAUNCH_COVERAGE_DIR/pytest.pid"
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
)
status=$?
if [ "$COVERAGE" = 1 ]; then
    report_coverage || log "coverage: report failed (the tests' outcome is unchanged)"
fi
set -e
if [ "$status" = 0 ] && [ "$other_pythons_status" != 0 ]; then
    log "the main suite passed, but the offline tests failed on another supported Python (above)"
    status=1
fi
exit $status
