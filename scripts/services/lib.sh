# shellcheck shell=bash
# Shared helpers for scripts/services/*.sh (sourced, not executed).
#
# Conventions:
#   STATE                 state dir (EASYLAUNCH_SERVICES_DIR, default /tmp/easylaunch-services)
#   STATE/pids/NAME.pid   "PID STARTTIME" of a daemon we started (STARTTIME = field 22 of
#                         /proc/PID/stat, so a recycled PID is never mistaken for our daemon)
#   STATE/log/NAME.log    daemon logs
#   STATE/NAME.env        what tests `source`
# Daemons are stopped only through the PIDs recorded here: never by process name.

STATE=${EASYLAUNCH_SERVICES_DIR:-/tmp/easylaunch-services}
PIDDIR=$STATE/pids
LOGDIR=$STATE/log
SVC=${SVC:-service}

mkdir -p "$STATE" "$PIDDIR" "$LOGDIR"
chmod 755 "$STATE" "$LOGDIR"

log() { printf '[%s] %s\n' "$SVC" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$SVC" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$SVC" "$*" >&2; exit 1; }

# Seconds since the epoch with sub-second precision, and elapsed time since such a stamp.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Print the last lines of each given log file (those that exist) to stderr.
tail_logs() {
    local f n=${TAIL_LINES:-40}
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- last %d lines of %s -----\n' "$n" "$f" >&2
            tail -n "$n" "$f" >&2
            printf -- '----- end of %s -----\n' "$f" >&2
        else
            printf -- '----- %s: missing or empty -----\n' "$f" >&2
        fi
    done
}

# wait_until TIMEOUT_SECONDS CMD [ARGS...]: run CMD (quietly) every 0.2 s until it succeeds.
# Returns 1 on timeout. If WAIT_ALIVE holds pid names, returns 2 as soon as one of them died.
wait_until() {
    local timeout=$1 deadline name
    shift
    deadline=$(awk -v t="$timeout" -v n="$(now)" 'BEGIN { printf "%.3f", n + t }')
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        for name in ${WAIT_ALIVE:-}; do
            if ! pid_alive "$name"; then
                warn "$name (pid $(pid_get "$name")) exited while waiting"
                return 2
            fi
        done
        if awk -v d="$deadline" -v n="$(now)" 'BEGIN { exit !(n > d) }'; then
            return 1
        fi
        sleep 0.2
    done
}

# ---- pid files -------------------------------------------------------------------------
_starttime() { # PID -> process start time (clock ticks since boot), empty if gone
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) } # drop "pid (comm) " (comm may contain spaces)
    # remaining fields start at field 3 (state); starttime is field 22
    awk '{ print $20 }' <<<"$stat"
}

pid_file() { echo "$PIDDIR/$1.pid"; }

pid_record() { # NAME PID
    local st
    st=$(_starttime "$2") || { warn "pid $2 for $1 already gone"; st=0; }
    echo "$2 $st" >"$(pid_file "$1")"
}

pid_get() { # NAME -> recorded pid (empty if none)
    local f
    f=$(pid_file "$1")
    [[ -f $f ]] && awk '{ print $1 }' "$f"
    return 0
}

pid_alive() { # NAME: true if the recorded process still runs (same start time) and isn't a zombie
    local f pid st cur state
    f=$(pid_file "$1")
    [[ -f $f ]] || return 1
    read -r pid st <"$f" || return 1
    [[ -n $pid ]] || return 1
    cur=$(_starttime "$pid") || return 1
    [[ $cur == "$st" ]] || return 1
    state=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]]
}

# pid_stop NAME [TIMEOUT] [SIGNAL]: send SIGNAL (default TERM) to the recorded pid, wait for it
# to exit, SIGKILL after TIMEOUT seconds (default 20). Removes the pid file.
pid_stop() {
    local name=$1 timeout=${2:-20} sig=${3:-TERM} pid
    if pid_alive "$name"; then
        pid=$(pid_get "$name")
        log "stopping $name (pid $pid)"
        kill -s "$sig" "$pid" 2>/dev/null || true
        if ! WAIT_ALIVE='' wait_until "$timeout" _pid_gone "$name"; then
            warn "$name (pid $pid) still alive after ${timeout}s: SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            WAIT_ALIVE='' wait_until 10 _pid_gone "$name" || warn "$name (pid $pid) did not die"
        fi
    fi
    rm -f "$(pid_file "$name")"
}
_pid_gone() { ! pid_alive "$1"; }

# daemon_start NAME LOGFILE CMD [ARGS...]: start CMD in the background, in its own session,
# detached from our stdin/stdout (so callers capturing our output never hang), and record its
# pid. CMD must stay in the foreground (no self-daemonizing), so $! is the daemon itself.
# (setsid does not fork here: a background job of a non-interactive shell is no group leader.)
# The daemon inherits no file descriptor but 0-2: a lock or a pipe our caller holds (flock, the
# pipe of a time limit or of `$(...)`) must not stay open for the daemon's lifetime.
daemon_start() {
    local name=$1 logfile=$2 pid
    shift 2
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
                eval "exec $fd>&-"
            fi
        done
        exec setsid "$@"
    ) </dev/null >>"$logfile" 2>&1 &
    pid=$!
    pid_record "$name" "$pid"
    log "started $name (pid $pid)"
}

# safe_rm_tree DIR: remove a directory tree under $CACHE (the caller's cache dir) that debootstrap
# may have left with mounts inside (proc, sys...): unmount those first, never cross into another
# file system.
safe_rm_tree() {
    local dir=$1 m
    [[ -e $dir ]] || return 0
    [[ -n ${CACHE:-} && $dir == "$CACHE"/* ]] || die "refusing to remove $dir"
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    if awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        die "mounts remain under $dir"
    fi
    rm -rf --one-file-system "$dir"
}

# The cloudpickle version test images must hold: EASYLAUNCH_TEST_CLOUDPICKLE_VERSION, else what
# $PYTHON (default python3) imports, else empty.
wanted_cloudpickle() {
    local v=${EASYLAUNCH_TEST_CLOUDPICKLE_VERSION:-}
    if [[ -z $v ]]; then
        v=$("${PYTHON:-python3}" -c 'import cloudpickle; print(cloudpickle.__version__)' 2>/dev/null) || v=
    fi
    echo "$v"
}

# root_cloudpickle ROOT: the cloudpickle version ROOT's python3 imports (empty if none).
root_cloudpickle() {
    chroot "$1" /usr/bin/python3 -c 'import cloudpickle; print(cloudpickle.__version__)' 2>/dev/null || true
}

# root_install_cloudpickle ROOT [VERSION]: pip-install cloudpickle (VERSION, else the latest) into
# the Debian root ROOT (for its python3); the log goes to $LOGDIR/pip-<basename of ROOT>.log.
root_install_cloudpickle() {
    local root=$1 want=${2:-} pyver site spec t0 py=${PYTHON:-python3} plog
    plog=$LOGDIR/pip-$(basename "$root").log
    t0=$(now)
    pyver=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    site=$root/usr/local/lib/python$pyver/dist-packages
    spec=cloudpickle${want:+==$want}
    log "installing $spec into $root (python $pyver)"
    rm -rf "$site"/cloudpickle "$site"/cloudpickle-*.dist-info
    mkdir -p "$site"
    # cloudpickle is pure Python without dependencies: the host's pip (with its index settings)
    # can put it there directly; else the root's own pip fetches it.
    if "$py" -m pip --version >/dev/null 2>&1 &&
        "$py" -m pip install -q --no-deps --no-warn-conflicts --target "$site" "$spec" \
            >"$plog" 2>&1; then
        :
    else
        warn "host pip could not install $spec: trying the pip of $root"
        cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
        chroot "$root" /usr/bin/python3 -m pip install -q --no-deps --break-system-packages \
            --root-user-action=ignore "$spec" >>"$plog" 2>&1 ||
            { tail_logs "$plog"; die "could not install $spec into $root"; }
    fi
    log "cloudpickle $(root_cloudpickle "$root") installed in $(elapsed "$t0")"
}

# ---- packages --------------------------------------------------------------------------
_APT_UPDATED=0
pkg_missing() { # prints the given packages that are not installed
    local p
    for p in "$@"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
            echo "$p"
        fi
    done
}

# apt_ensure PKG...: install the missing ones (one `apt-get update` per run, only if needed).
# Daemons in those packages are not started by their maintainer scripts (policy-rc.d).
apt_ensure() {
    local missing t0 created_policy=0 rc=0
    missing=$(pkg_missing "$@")
    [[ -z $missing ]] && return 0
    t0=$(now)
    log "installing packages: ${missing//$'\n'/ }"
    export DEBIAN_FRONTEND=noninteractive
    local aptopts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 -q)
    if [[ $_APT_UPDATED == 0 ]]; then
        apt-get "${aptopts[@]}" update >"$LOGDIR/apt-update.$SVC.log" 2>&1 ||
            { tail_logs "$LOGDIR/apt-update.$SVC.log"; die "apt-get update failed"; }
        _APT_UPDATED=1
    fi
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# easylaunch scripts/services: no daemon starts during apt installs\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    # shellcheck disable=SC2086
    apt-get "${aptopts[@]}" install -y --no-install-recommends $missing \
        >"$LOGDIR/apt-install.$SVC.log" 2>&1 || rc=$?
    [[ $created_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc != 0 ]]; then
        tail_logs "$LOGDIR/apt-install.$SVC.log"
        die "apt-get install failed (rc=$rc)"
    fi
    log "packages installed in $(elapsed "$t0")"
}

# The Debian mirror this machine's apt uses (for debootstrap); EASYLAUNCH_DEBIAN_MIRROR wins.
debian_mirror() {
    local m=${EASYLAUNCH_DEBIAN_MIRROR:-}
    if [[ -z $m ]]; then
        m=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    fi
    if [[ -z $m ]]; then
        m=$(awk '/^deb / && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
            /etc/apt/sources.list 2>/dev/null || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
