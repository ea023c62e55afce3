#!/usr/bin/env bash
# Real single-node Slurm 22.05 with accounting, for easylaunch's tests.
#
#   bash scripts/services/slurm.sh start|stop|status
#
# start: installs what is missing (apt: slurm-wlm slurmdbd munge mariadb-server), then starts
#   munged -> MariaDB (mysqld_safe, 127.0.0.1) -> slurmdbd -> slurmctld -> slurmd -N localhost,
#   each in the foreground of its own session with its PID recorded in $STATE/pids/, and waits
#   until the node is idle, sacct answers and a trivial batch job COMPLETED and shows in sacct.
#   A fresh start wipes slurmctld's StateSaveLocation AND the accounting database together,
#   so job ids restart at 1 without duplicate sacct rows. If everything already runs, start
#   only rewrites $STATE/slurm.env.
# stop: cancels remaining jobs, then stops the daemons through their recorded PIDs (never by
#   name), in reverse order, waiting for each to exit.
# Config: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (rewritten at every fresh start;
#   clients read /etc/slurm/slurm.conf by default). Logs: $STATE/log/.
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=slurm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server mariadb-client)
ENV_FILE=$STATE/slurm.env
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
STATE_SAVE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CLUSTER=ci
NODE_CPUS=8
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=easylaunch-test
MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_PIDFILE=/run/mysqld/mysqld.pid
DAEMONS=(munged mysqld_safe mysqld slurmdbd slurmctld slurmd) # start order

all_alive() {
    local d
    for d in "${DAEMONS[@]}"; do pid_alive "$d" || return 1; done
}
any_alive() {
    local d
    for d in "${DAEMONS[@]}"; do pid_alive "$d" && return 0; done
    return 1
}

write_env() {
    cat >"$ENV_FILE" <<EOF
# written by scripts/services/slurm.sh start
export EASYLAUNCH_TEST_SLURM=1
export SLURM_CONF=$SLURM_CONF_FILE
export EASYLAUNCH_TEST_SLURM_PARTITION=debug
export EASYLAUNCH_TEST_SLURM_OTHER_PARTITION=short
export EASYLAUNCH_TEST_SLURM_CPUS=$NODE_CPUS
export EASYLAUNCH_TEST_SLURM_LOG_DIR=$LOGDIR
EOF
}

# Fail a start: show the daemon logs, stop whatever we started, exit non-zero.
fail() {
    local msg=$1
    shift
    printf '[%s] ERROR: %s\n' "$SVC" "$msg" >&2
    tail_logs "$@"
    do_stop || true
    exit 1
}

write_configs() {
    local mem
    mem=$(awk '/^MemTotal:/ { m = int($2 / 1024) - 512; if (m < 1024) m = 1024; print m }' /proc/meminfo)
    mkdir -p "$CONF_DIR"
    cat >"$SLURM_CONF_FILE" <<EOF
# written by easylaunch scripts/services/slurm.sh (rewritten at every start)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
PreemptType=preempt/none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE_SAVE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
MinJobAge=300
KillWait=5
InactiveLimit=0
# CPUs=$NODE_CPUS (more than the machine has, thanks to config_overrides): 8 one-CPU jobs at once.
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost MaxTime=60 State=UP
EOF
    chmod 644 "$SLURM_CONF_FILE"
    (
        umask 077
        cat >"$DBD_CONF_FILE" <<EOF
# written by easylaunch scripts/services/slurm.sh (rewritten at every start)
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    )
    chmod 600 "$DBD_CONF_FILE"
}

start_munge() {
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    chmod 700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    # setpriv execs (no fork), so the recorded pid is munged's own.
    daemon_start munged "$LOGDIR/munged.log" \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    WAIT_ALIVE=munged wait_until 15 sh -c 'munge -n | unmunge' ||
        fail "munged not ready" "$LOGDIR/munged.log" /var/log/munge/munged.log
}

start_mariadb() {
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising MariaDB data dir"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGDIR/mariadb-install.log" 2>&1 ||
            fail "mariadb-install-db failed" "$LOGDIR/mariadb-install.log"
    fi
    : >"$LOGDIR/mariadb.log"
    chown mysql:mysql "$LOGDIR/mariadb.log"
    # A test database: durability traded for speed (slurmdbd creates ~30 tables per start).
    daemon_start mysqld_safe "$LOGDIR/mysqld_safe.log" \
        mysqld_safe --skip-syslog --log-error="$LOGDIR/mariadb.log" --user=mysql \
        --bind-address=127.0.0.1 --port=3306 --socket="$MYSQL_SOCK" --pid-file="$MYSQL_PIDFILE" \
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --sync-binlog=0 \
        --innodb-lock-wait-timeout=900
    WAIT_ALIVE=mysqld_safe wait_until 60 mysqladmin --socket="$MYSQL_SOCK" ping ||
        fail "MariaDB not ready" "$LOGDIR/mysqld_safe.log" "$LOGDIR/mariadb.log"
    wait_until 10 test -s "$MYSQL_PIDFILE" || fail "no $MYSQL_PIDFILE" "$LOGDIR/mariadb.log"
    pid_record mysqld "$(cat "$MYSQL_PIDFILE")"
    # Wiped together with slurmctld's state (see wipe_state): both or neither.
    mysql --socket="$MYSQL_SOCK" -u root >"$LOGDIR/mariadb-setup.log" 2>&1 <<EOF ||
DROP DATABASE IF EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
        fail "MariaDB setup (user, grants) failed" "$LOGDIR/mariadb-setup.log" "$LOGDIR/mariadb.log"
}

wipe_state() {
    # Job ids come from slurmctld's state; sacct rows from the database: wipe both together
    # (the database is dropped in start_mariadb, which always runs right after this).
    rm -rf "$STATE_SAVE" "$SLURMD_SPOOL"
    mkdir -p "$STATE_SAVE" "$SLURMD_SPOOL"
    chmod 755 "$STATE_SAVE" "$SLURMD_SPOOL"
    rm -f "$LOGDIR/jobcomp.log"
}

sacctmgr_clusters() { timeout 10 sacctmgr -n -P list cluster format=cluster 2>&1; }

start_slurmdbd() {
    daemon_start slurmdbd "$LOGDIR/slurmdbd.out" slurmdbd -D
    WAIT_ALIVE=slurmdbd wait_until 90 sacctmgr_clusters ||
        fail "slurmdbd not ready: sacctmgr says: $(sacctmgr_clusters | tail -n 3 || true)" "$LOGDIR/slurmdbd.out" "$LOGDIR/slurmdbd.log" "$LOGDIR/mariadb.log"
    if ! sacctmgr_clusters | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER (sacctmgr -i add cluster $CLUSTER)"
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >"$LOGDIR/sacctmgr.log" 2>&1 ||
            fail "sacctmgr add cluster failed" "$LOGDIR/sacctmgr.log" "$LOGDIR/slurmdbd.log"
    fi
}

node_idle() { [[ $(timeout 10 sinfo -h -n localhost -o %T 2>/dev/null | sort -u) == idle ]]; }

sacct_works() {
    local out
    out=$(timeout 10 sacct -n -X -S now-1hour 2>&1) || return 1
    ! grep -qiE 'disabled|error|connection' <<<"$out"
}

start_slurm_daemons() {
    daemon_start slurmctld "$LOGDIR/slurmctld.out" slurmctld -D
    WAIT_ALIVE="slurmctld slurmdbd" wait_until 30 sh -c 'timeout 5 scontrol ping | grep -q UP' ||
        fail "slurmctld not ready" "$LOGDIR/slurmctld.out" "$LOGDIR/slurmctld.log"
    daemon_start slurmd "$LOGDIR/slurmd.out" slurmd -D -N localhost
    WAIT_ALIVE="slurmd slurmctld" wait_until 60 node_idle ||
        fail "node localhost not idle: $(sinfo -h -N -o '%N %T %E' 2>&1 || true)" \
            "$LOGDIR/slurmd.out" "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.log"
    WAIT_ALIVE="slurmctld slurmdbd" wait_until 30 sacct_works ||
        fail "sacct does not answer: $(timeout 10 sacct -n -X -S now-1hour 2>&1 | head -3 || true)" \
            "$LOGDIR/slurmctld.log" "$LOGDIR/slurmdbd.log"
}

smoke_test() {
    # `sbatch --wait` polls with a growing interval (2 s, then more): submitting and polling
    # sacct every 0.2 s checks the same (COMPLETED implies exit code 0) in a fraction of it.
    local t0 id state
    t0=$(now)
    mkdir -p "$STATE/slurm-smoke"
    id=$(cd "$STATE/slurm-smoke" && timeout 30 sbatch --parsable -J easylaunch-smoke \
        -o "$STATE/slurm-smoke/%j.out" --wrap true 2>"$LOGDIR/smoke.err") ||
        fail "sbatch --wrap true failed: $(cat "$LOGDIR/smoke.err")" "$LOGDIR/slurmctld.log"
    id=${id%%;*}
    if ! WAIT_ALIVE="slurmctld slurmd slurmdbd" wait_until 60 \
        sh -c "sacct -n -X -P -j $id -o State | grep -qx COMPLETED"; then
        state=$(sacct -n -X -P -j "$id" -o JobID,State,ExitCode 2>&1 || true)
        fail "smoke job $id not COMPLETED in sacct within 60s: '${state}' (squeue: $(squeue -h -j "$id" -o %T 2>&1 || true))" \
            "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmdbd.log"
    fi
    log "smoke job $id (sbatch --wrap true) COMPLETED and in sacct in $(elapsed "$t0")"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A fresh start rewrites /etc/slurm and wipes the state and the database: never do that under
# daemons this state dir did not start (another EASYLAUNCH_SERVICES_DIR, a deleted state dir).
check_nothing_running() {
    local p busy=''
    for p in 6817 6818 6819 3306; do
        port_open "$p" && busy+=" 127.0.0.1:$p"
    done
    [[ -S /run/munge/munge.socket.2 ]] && timeout 5 munge -n >/dev/null 2>&1 && busy+=" munged"
    [[ -S $MYSQL_SOCK ]] && timeout 5 mysqladmin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1 &&
        busy+=" mysqld"
    [[ -z $busy ]] && return 0
    die "already in use, but not by daemons recorded in $PIDDIR:$busy. Another Slurm/MariaDB \
runs on this machine (another EASYLAUNCH_SERVICES_DIR, or a state dir that was deleted): stop it \
first (with the state dir that started it); refusing to wipe its state and database."
}

do_start() {
    local t0 t1
    t0=$(now)
    if all_alive; then
        write_env
        log "already running (pids in $PIDDIR); env rewritten: $ENV_FILE"
        return 0
    fi
    if any_alive; then
        log "partially running: stopping the rest before a fresh start"
        do_stop
    fi
    apt_ensure "${PACKAGES[@]}"
    for b in munged mysqld_safe slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
        command -v "$b" >/dev/null || die "$b not found after install"
    done
    check_nothing_running
    t1=$(now)
    log "starting daemons (logs: $LOGDIR)"
    write_configs
    wipe_state
    # Each fresh start gets fresh logs (the previous ones are kept as *.prev).
    local f
    for f in munged mysqld_safe mariadb slurmdbd slurmdbd.out slurmctld slurmctld.out slurmd slurmd.out; do
        [[ $f == *.out ]] || f=$f.log
        [[ -f $LOGDIR/$f ]] && mv -f "$LOGDIR/$f" "$LOGDIR/$f.prev"
    done
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm_daemons
    log "daemons ready in $(elapsed "$t1") ($(sinfo -V), partitions: $(sinfo -h -o %P | tr '\n' ' '))"
    log "$(scontrol show config | awk '$1 == "MaxArraySize" { print "MaxArraySize=" $3 }')"
    smoke_test
    write_env
    log "ready in $(elapsed "$t0"); env: $ENV_FILE"
}

cancel_jobs() {
    pid_alive slurmctld || return 0
    local ids
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
    [[ -z ${ids// /} ]] && return 0
    log "cancelling remaining jobs: $ids"
    # shellcheck disable=SC2086
    timeout 10 scancel $ids 2>/dev/null || true
    # shellcheck disable=SC2016 # expanded by sh
    wait_until 20 sh -c '[ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ]' ||
        warn "jobs still in squeue: $(squeue -h -o '%A %T' 2>&1 | tr '\n' ' ')"
}

do_stop() {
    cancel_jobs
    pid_stop slurmd 20
    pid_stop slurmctld 20
    pid_stop slurmdbd 20
    # mysqld_safe ignores SIGTERM and exits by itself once mysqld shut down cleanly.
    pid_stop mysqld 60
    pid_stop mysqld_safe 10
    pid_stop munged 10
}

do_status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if pid_alive "$d"; then
            echo "$d: running (pid $(pid_get "$d"))"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    return $rc
}

case ${1:-} in
start) do_start ;;
stop) do_stop; log "stopped" ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
