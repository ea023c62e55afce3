#!/usr/bin/env bash
# Checks that the services started by slurm.sh and apptainer.sh work together, for real:
#   bash scripts/services/selftest.sh        (both services must be started first)
# - a Slurm batch job (--export=NONE, so only /usr/local/bin finds it) runs
#   `singularity exec -B /tmp IMAGE python3 ...` and writes a file under /tmp;
# - `sbatch --array=0-3` shows per-task states and exit codes in
#   `sacct -X -n -P -o JobID,State,ExitCode -S <start>`;
# - `--signal=B:USR2@N` reaches the batch script; `scontrol requeue` runs a job again;
# - if docker.sh started dockerd: `docker.sh restart` with a container running ends that container
#   (it does not survive a restart) and dockerd answers again, within seconds.
# Not part of the test-suite: a diagnostic for the harness itself (a few tens of seconds).
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=selftest
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
# shellcheck disable=SC1091
source "$STATE/slurm.env"
# shellcheck disable=SC1091
source "$STATE/apptainer.env"

WORK=$(mktemp -d /tmp/easylaunch-selftest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
START=$(date +%Y-%m-%dT%H:%M:%S)
IMAGE=$EASYLAUNCH_TEST_SINGULARITY_IMAGE
rc=0
ok() { log "OK   $*"; }
bad() { log "FAIL $*"; rc=1; }

# 1. Slurm job -> singularity -> python in the image, writing under /tmp.
t0=$(now)
cat >job-sing.sh <<EOF
#!/bin/bash
singularity exec -B /tmp $IMAGE python3 -c 'import cloudpickle, json, sys; json.dump({"cloudpickle": cloudpickle.__version__, "python": sys.version.split()[0]}, open(sys.argv[1], "w"))' $WORK/sing.json
EOF
if sbatch --wait --export=NONE -o "$WORK/sing.out" job-sing.sh >/dev/null &&
    grep -q "\"cloudpickle\": \"$EASYLAUNCH_TEST_IMAGE_CLOUDPICKLE_VERSION\"" sing.json; then
    ok "sbatch -> singularity exec $IMAGE -> $(cat sing.json) in $(elapsed "$t0")"
else
    bad "singularity job: $(cat sing.out sing.json 2>&1)"
fi

# 2. Job array with per-task exit codes.
t0=$(now)
# shellcheck disable=SC2016 # expanded in the job
id=$(sbatch --parsable --wait --array=0-3 -o /dev/null --wrap 'exit $((SLURM_ARRAY_TASK_ID % 2))' 2>/dev/null || true)
id=${id%%;*}
wait_until 20 sh -c "[ \$(sacct -X -n -P -o JobID -S $START -j $id | wc -l) -eq 4 ]" || true
rows=$(sacct -X -n -P -o JobID,State,ExitCode -S "$START" -j "$id" | sort)
expected=$(printf '%s\n' "${id}_0|COMPLETED|0:0" "${id}_1|FAILED|1:0" "${id}_2|COMPLETED|0:0" "${id}_3|FAILED|1:0")
if [[ $rows == "$expected" ]]; then
    ok "array $id: $(tr '\n' ' ' <<<"$rows")in $(elapsed "$t0")"
else
    bad "array $id: got '$(tr '\n' ' ' <<<"$rows")'"
fi

# 3. --signal=B:USR2@N reaches the batch shell before the time limit.
t0=$(now)
cat >job-sig.sh <<EOF
#!/bin/bash
trap 'echo got-usr2 > $WORK/sig.txt; exit 0' USR2
for i in \$(seq 600); do sleep 0.1; done
EOF
id=$(sbatch --parsable --time=1 --signal=B:USR2@55 -o /dev/null job-sig.sh)
if wait_until 60 test -s sig.txt; then
    ok "--signal=B:USR2@55 with --time=1: signal after $(elapsed "$t0")"
else
    bad "--signal: no USR2 within 60s (job $id: $(squeue -h -j "$id" -o %T 2>&1))"
fi
scancel "$id" 2>/dev/null || true

# 4. scontrol requeue runs a running job again.
t0=$(now)
cat >job-rq.sh <<EOF
#!/bin/bash
echo "\${SLURM_RESTART_COUNT:-0}" >> $WORK/rq.txt
sleep 300
EOF
id=$(sbatch --parsable -o /dev/null job-rq.sh)
if wait_until 30 test -s rq.txt && scontrol requeue "$id" &&
    wait_until 180 sh -c "grep -qx 1 $WORK/rq.txt"; then
    ok "scontrol requeue $id: ran again (SLURM_RESTART_COUNT=1) after $(elapsed "$t0")"
else
    bad "requeue of $id: rq.txt='$(cat rq.txt 2>&1)' state=$(squeue -h -j "$id" -o '%T %r' 2>&1)"
fi
scancel "$id" 2>/dev/null || true

# 5. docker.sh restart while a container runs (only when docker.sh started dockerd).
if [[ -f $STATE/docker.env ]]; then
    # shellcheck disable=SC1091
    source "$STATE/docker.env"
    t0=$(now)
    cid=$(docker -H "$EASYLAUNCH_TEST_DOCKER_HOST" run -d --stop-timeout 1 --network none \
        --label io.easylaunch.selftest=1 "$EASYLAUNCH_TEST_DOCKER_IMAGE_NOPYTHON" sleep 300 2>&1) || cid=''
    if [[ -n $cid ]] && bash "$HERE/docker.sh" restart >"$WORK/restart.log" 2>&1 &&
        [[ $(docker -H "$EASYLAUNCH_TEST_DOCKER_HOST" inspect -f '{{.State.Status}}' "$cid") == exited ]]; then
        ok "docker.sh restart with a container running: it exited, dockerd answers again after $(elapsed "$t0")"
    else
        bad "docker.sh restart: container '$cid' $(docker -H "$EASYLAUNCH_TEST_DOCKER_HOST" inspect -f '{{.State.Status}}' "$cid" 2>&1); $(tail -n 5 "$WORK/restart.log" 2>&1)"
    fi
    [[ -n $cid ]] && docker -H "$EASYLAUNCH_TEST_DOCKER_HOST" rm -f "$cid" >/dev/null 2>&1
fi

if [[ $rc == 0 ]]; then log "all checks passed"; else log "some checks FAILED"; fi
exit $rc
