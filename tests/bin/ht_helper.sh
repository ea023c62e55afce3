#!/bin/bash
# Test stand-in for BRC's ht_helper.sh (a site script that is not published): easylaunch's htp
# tests put this directory on PATH. It takes the flags the generated job uses,
#
#   ht_helper.sh -m MODULES -t TASKFILE [-n SLOTS_PER_TASK] [-p PARALLEL]
#
# and runs each non-empty line of TASKFILE with bash, in the current directory, in parallel:
# at most PARALLEL (default: $SLURM_NTASKS / SLOTS_PER_TASK) at once, inside the Slurm allocation
# it is started in. MODULES are loaded when a `module` command exists. Exits 1 if any line
# failed. USR2 (the job forwards Slurm's time-limit warning to its process group) is left to the
# tasks. Needs bash >= 5.1 (wait -n -p).
set -u
modules="" taskfile="" slots=1 parallel=""
while getopts "m:t:n:p:" opt; do
    case $opt in
    m) modules=$OPTARG ;;
    t) taskfile=$OPTARG ;;
    n) slots=$OPTARG ;;
    p) parallel=$OPTARG ;;
    *)
        echo "usage: ht_helper.sh -m MODULES -t TASKFILE [-n SLOTS_PER_TASK] [-p PARALLEL]" >&2
        exit 2
        ;;
    esac
done
if [ -z "$taskfile" ] || [ ! -r "$taskfile" ]; then
    echo "ht_helper.sh: cannot read the taskfile '$taskfile' (-t)" >&2
    exit 2
fi
if [ -n "$modules" ] && command -v module >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    module load $modules
fi
parallel=${parallel:-$((${SLURM_NTASKS:-1} / slots))}
[ "$parallel" -ge 1 ] || parallel=1
trap ':' USR2

running=0 failed=0 total=0
reap() { # wait for one task to end and count a failure
    local pid rc
    while :; do
        pid=""
        wait -n -p pid
        rc=$?
        [ -n "${pid:-}" ] && break
        [ -n "$(jobs -rp)" ] || return 0 # nothing left to wait for
    done
    running=$((running - 1))
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        echo "ht_helper.sh: a task (pid $pid) failed with exit status $rc" >&2
    fi
}

while IFS= read -r line || [ -n "$line" ]; do
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    while [ "$running" -ge "$parallel" ]; do reap; done
    bash -c "$line" </dev/null &
    running=$((running + 1))
    total=$((total + 1))
done <"$taskfile"
while [ "$running" -gt 0 ]; do reap; done
echo "ht_helper.sh (test stand-in): $total task(s), $parallel at once, $failed failed (modules: $modules)" >&2
[ "$failed" -eq 0 ]
