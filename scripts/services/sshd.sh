#!/usr/bin/env bash
# An SSH host that shares no filesystem with the launcher, for easylaunch's mode 'ssh' tests.
#
#   bash scripts/services/sshd.sh start|stop|status|restart
#
# start: installs what is missing (apt: openssh-server, socat, and images.sh's debootstrap
#   packages), makes the remote's own root file system $ROOT (Debian bookworm with python3 3.11,
#   from images.sh's bookworm tar; Debian bullseye's python3.9 under /opt/py39 with a wrapper
#   /usr/local/bin/python3.9, from the bullseye tar), a user `elssh` (on this machine, for sshd,
#   and in $ROOT, with home /home/elssh there), keys (host key, a client key, a client key with a
#   passphrase, a client key that is not authorized) and an sshd_config: 127.0.0.1 on its own port
#   (EASYLAUNCH_TEST_SSH_PORT, default 2222), key-only, `ChrootDirectory $ROOT` and
#   `Subsystem sftp internal-sftp` for elssh, TCP forwarding allowed (ProxyJump tests). Mounts into
#   $ROOT: /proc (the remote side checks its processes' liveness), a 4 MiB tmpfs at /srv/full (the
#   "remote disk full" tests); /srv/readonly is a directory elssh cannot write. dockerd's socket is
#   relayed into $ROOT at /run/docker.sock by socat (one connection per request, so a dockerd
#   restart does not break it), mode 0600 for elssh: Docker "on the remote host" is the same
#   dockerd, which sees the remote's files under $ROOT (EASYLAUNCH_TEST_SSH_DOCKER_ROOT). Then it
#   starts `sshd -D -e -f CONF` in its own session (PID recorded), waits until it answers, writes
#   known_hosts with ssh-keyscan, checks a login lands inside $ROOT, and writes $STATE/sshd.env.
#   On a running sshd, start only rewrites the env file.
# stop: stops sshd and the socket relay through their recorded PIDs, ends the processes left
#   running inside $ROOT (detached remote runs of the tests: found by /proc/PID/root, started
#   through this sshd), unmounts what start mounted. $ROOT stays (cached) for the next start.
# restart: restarts the sshd daemon only, as `systemctl restart ssh` on a real host: every session
#   is dropped, detached remote processes, mounts and the relay go on (tests restart sshd in the
#   middle of a sweep).
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=sshd
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR
source "$HERE/images.sh"

ENV_FILE=$STATE/sshd.env
PORT=${EASYLAUNCH_TEST_SSH_PORT:-2222}
USER_NAME=elssh
ROOT=$CACHE/sshd-root
ROOT_VERSION=1 # bump to rebuild the root
CONF_DIR=$STATE/sshd
CONF=$CONF_DIR/sshd_config
SSHD_LOG=$LOGDIR/sshd.log
RELAY_LOG=$LOGDIR/sshd-docker-relay.log
DOCKER_SOCK=/var/run/docker.sock
PASSPHRASE=easylaunch-test-passphrase # a test key's; tests use it to load the key into an agent
FULL_SIZE=4m

ssh_ready() { timeout 5 ssh-keyscan -p "$PORT" -t ed25519 127.0.0.1 2>/dev/null | grep -q ssh-ed25519; }

fail() { # MSG: show sshd's log, stop what we started, exit non-zero
    printf '[%s] ERROR: %s\n' "$SVC" "$1" >&2
    tail_logs "$SSHD_LOG"
    pid_stop sshd 10 || true
    exit 1
}

ensure_user() {
    if ! getent passwd "$USER_NAME" >/dev/null; then
        log "creating user $USER_NAME"
        useradd --system --user-group --no-create-home --home-dir "/home/$USER_NAME" \
            --shell /bin/bash "$USER_NAME"
    fi
    # no password, but not locked ("!" locks the account for sshd without PAM)
    usermod -p '*' "$USER_NAME"
    if getent group docker >/dev/null; then
        usermod -aG docker "$USER_NAME"
    fi
    USER_UID=$(id -u "$USER_NAME")
    USER_GID=$(id -g "$USER_NAME")
}

# The remote's root: bookworm (python3 3.11) + bullseye's python3.9 under /opt/py39.
root_want() {
    echo "v$ROOT_VERSION uid=$USER_UID gid=$USER_GID bookworm=$(cat "$IMAGES/bookworm.tar.stamp") bullseye=$(cat "$IMAGES/bullseye.tar.stamp")"
}

unmount_root() {
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || warn "could not unmount $m"
    done < <(awk -v d="$ROOT/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
}

build_root() {
    local t0 partial=$ROOT.partial ld
    t0=$(now)
    log "building the remote root $ROOT"
    safe_rm_tree "$partial"
    mkdir -p "$partial"
    tar --numeric-owner -C "$partial" -xf "$IMAGES/bookworm.tar"
    mkdir -p "$partial/opt/py39"
    tar --numeric-owner -C "$partial/opt/py39" -xf "$IMAGES/bullseye.tar"
    # bullseye's python3.9 with bullseye's own dynamic loader and libraries (never the root's)
    ld=$(cd "$partial/opt/py39" && ls usr/lib/x86_64-linux-gnu/ld-2.*.so lib/x86_64-linux-gnu/ld-2.*.so 2>/dev/null | head -1)
    [[ -n $ld ]] || die "no dynamic loader in the bullseye root"
    cat >"$partial/usr/local/bin/python3.9" <<EOF
#!/bin/sh
# Python 3.9 of Debian bullseye (easylaunch test harness: a remote Python of another minor)
export PYTHONHOME=/opt/py39/usr
exec /opt/py39/$ld --library-path /opt/py39/usr/lib/x86_64-linux-gnu:/opt/py39/lib/x86_64-linux-gnu /opt/py39/usr/bin/python3.9 "\$@"
EOF
    chmod 755 "$partial/usr/local/bin/python3.9"
    grep -v "^$USER_NAME:" "$partial/etc/passwd" >"$partial/etc/passwd.new" || true
    echo "$USER_NAME:x:$USER_UID:$USER_GID:easylaunch ssh tests:/home/$USER_NAME:/bin/bash" >>"$partial/etc/passwd.new"
    mv "$partial/etc/passwd.new" "$partial/etc/passwd"
    grep -v "^$USER_NAME:" "$partial/etc/group" >"$partial/etc/group.new" || true
    echo "$USER_NAME:x:$USER_GID:" >>"$partial/etc/group.new"
    mv "$partial/etc/group.new" "$partial/etc/group"
    mkdir -p "$partial/home/$USER_NAME" "$partial/srv/full" "$partial/srv/readonly" "$partial/proc"
    chown "$USER_UID:$USER_GID" "$partial/home/$USER_NAME"
    chmod 755 "$partial/home/$USER_NAME" "$partial/srv/readonly"
    # a marker only the remote has (tests: what they see is the remote's root, not ours)
    echo "easylaunch sshd test root" >"$partial/etc/easylaunch-remote-root"
    chown root:root "$partial"
    chmod 755 "$partial"
    chroot "$partial" /usr/bin/python3 -c 'import json, sys; assert sys.version_info[:2] >= (3, 8)' ||
        die "python3 does not run in $partial"
    PYTHONHOME= chroot "$partial" /usr/local/bin/python3.9 -c 'import json, zipfile, sys; assert sys.version_info[:2] == (3, 9)' ||
        die "python3.9 (bullseye) does not run in $partial"
    unmount_root
    safe_rm_tree "$ROOT"
    mv "$partial" "$ROOT"
    root_want >"$ROOT.stamp"
    log "remote root built in $(elapsed "$t0")"
}

ensure_root() {
    image_build bookworm
    image_build bullseye
    if [[ -x $ROOT/usr/bin/python3 && $(cat "$ROOT.stamp" 2>/dev/null) == "$(root_want)" ]]; then
        return 0
    fi
    build_root
}

mount_root() {
    if ! awk -v d="$ROOT/proc" '$2 == d { found = 1 } END { exit !found }' /proc/self/mounts; then
        mount -t proc proc "$ROOT/proc" || die "cannot mount /proc into $ROOT"
    fi
    if ! awk -v d="$ROOT/srv/full" '$2 == d { found = 1 } END { exit !found }' /proc/self/mounts; then
        mount -t tmpfs -o "size=$FULL_SIZE,mode=0755,uid=$USER_UID,gid=$USER_GID" tmpfs "$ROOT/srv/full" ||
            die "cannot mount a tmpfs at $ROOT/srv/full"
    fi
    # each start begins with an empty disk-full dir (tests fill it)
    find "$ROOT/srv/full" -mindepth 1 -delete 2>/dev/null || true
}

ensure_keys() {
    mkdir -p "$CONF_DIR"
    chmod 700 "$CONF_DIR"
    [[ -f $CONF_DIR/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C easylaunch-test-host -f "$CONF_DIR/host_ed25519"
    [[ -f $CONF_DIR/client_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C easylaunch-test-client -f "$CONF_DIR/client_ed25519"
    [[ -f $CONF_DIR/client_encrypted ]] ||
        ssh-keygen -q -t ed25519 -N "$PASSPHRASE" -C easylaunch-test-encrypted -f "$CONF_DIR/client_encrypted"
    [[ -f $CONF_DIR/client_unauthorized ]] ||
        ssh-keygen -q -t ed25519 -N '' -C easylaunch-test-unauthorized -f "$CONF_DIR/client_unauthorized"
    mkdir -p "$CONF_DIR/authorized_keys"
    chmod 755 "$CONF_DIR/authorized_keys"
    cat "$CONF_DIR/client_ed25519.pub" "$CONF_DIR/client_encrypted.pub" >"$CONF_DIR/authorized_keys/$USER_NAME"
    chmod 644 "$CONF_DIR/authorized_keys/$USER_NAME"
    chmod 600 "$CONF_DIR"/client_ed25519 "$CONF_DIR"/client_encrypted "$CONF_DIR"/client_unauthorized
    chmod 644 "$CONF_DIR"/*.pub
    chmod 711 "$CONF_DIR" # sshd reads authorized_keys/ as the user
}

write_conf() {
    cat >"$CONF" <<EOF
# written by scripts/services/sshd.sh (easylaunch tests)
Port $PORT
ListenAddress 127.0.0.1
HostKey $CONF_DIR/host_ed25519
PidFile none
PermitRootLogin no
AllowUsers $USER_NAME
PubkeyAuthentication yes
AuthorizedKeysFile $CONF_DIR/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
ClientAliveInterval 0
MaxStartups 100:30:200
MaxSessions 50
LogLevel INFO
Subsystem sftp internal-sftp
Match User $USER_NAME
    ChrootDirectory $ROOT
EOF
    mkdir -p /run/sshd
    chmod 755 /run/sshd
    /usr/sbin/sshd -t -f "$CONF" || die "sshd -t rejects $CONF"
}

start_relay() {
    [[ -S $DOCKER_SOCK ]] || { warn "no $DOCKER_SOCK (docker.sh not started): no Docker on the SSH host"; return 0; }
    pid_alive sshd-docker-relay && return 0
    rm -f "$ROOT/run/docker.sock"
    daemon_start sshd-docker-relay "$RELAY_LOG" socat \
        "UNIX-LISTEN:$ROOT/run/docker.sock,fork,unlink-early,mode=0600,user=$USER_UID,group=$USER_GID" \
        "UNIX-CONNECT:$DOCKER_SOCK"
    WAIT_ALIVE=sshd-docker-relay wait_until 10 test -S "$ROOT/run/docker.sock" ||
        die "the docker socket relay did not start (log: $RELAY_LOG)"
}

start_sshd() {
    if pid_alive sshd && ssh_ready; then
        log "sshd already running (pid $(pid_get sshd))"
        return 0
    fi
    pid_stop sshd 10
    if ssh_ready; then
        die "something not recorded in $PIDDIR already answers on 127.0.0.1:$PORT: stop it first, or set EASYLAUNCH_TEST_SSH_PORT"
    fi
    mkdir -p /run/sshd
    chmod 755 /run/sshd
    [[ -f $SSHD_LOG ]] && mv -f "$SSHD_LOG" "$SSHD_LOG.prev"
    daemon_start sshd "$SSHD_LOG" /usr/sbin/sshd -D -e -f "$CONF"
    WAIT_ALIVE=sshd wait_until 20 ssh_ready || fail "sshd not answering on 127.0.0.1:$PORT within 20 s"
}

check_login() {
    local out
    out=$(ssh -F /dev/null -p "$PORT" -i "$CONF_DIR/client_ed25519" -o BatchMode=yes -o IdentitiesOnly=yes \
        -o UserKnownHostsFile="$CONF_DIR/known_hosts" -o StrictHostKeyChecking=yes \
        "$USER_NAME@127.0.0.1" 'cat /etc/easylaunch-remote-root; python3 -c "import sys; print(sys.version.split()[0])"; python3.9 -c "import sys; print(sys.version.split()[0])"; test ! -e '"$STATE"' && echo isolated' 2>&1) ||
        fail "login as $USER_NAME failed: $out"
    grep -q 'easylaunch sshd test root' <<<"$out" && grep -q isolated <<<"$out" ||
        fail "a login does not land inside $ROOT: $out"
    REMOTE_PY=$(sed -n 2p <<<"$out")
    REMOTE_PY39=$(sed -n 3p <<<"$out")
}

write_env() {
    local docker_lines=''
    if [[ -S $ROOT/run/docker.sock ]]; then
        docker_lines="export EASYLAUNCH_TEST_SSH_DOCKER=1
export EASYLAUNCH_TEST_SSH_DOCKER_HOST=unix:///run/docker.sock
export EASYLAUNCH_TEST_SSH_DOCKER_ROOT=$ROOT
export EASYLAUNCH_TEST_SSH_DOCKER_IMAGE=${IMAGE_NAME[bookworm]}"
    fi
    cat >"$ENV_FILE" <<EOF
# written by scripts/services/sshd.sh start
export EASYLAUNCH_TEST_SSH=1
export EASYLAUNCH_TEST_SSH_HOST=127.0.0.1
export EASYLAUNCH_TEST_SSH_PORT=$PORT
export EASYLAUNCH_TEST_SSH_USER=$USER_NAME
export EASYLAUNCH_TEST_SSH_KEY=$CONF_DIR/client_ed25519
export EASYLAUNCH_TEST_SSH_KEY_ENCRYPTED=$CONF_DIR/client_encrypted
export EASYLAUNCH_TEST_SSH_KEY_PASSPHRASE=$PASSPHRASE
export EASYLAUNCH_TEST_SSH_KEY_UNAUTHORIZED=$CONF_DIR/client_unauthorized
export EASYLAUNCH_TEST_SSH_KNOWN_HOSTS=$CONF_DIR/known_hosts
export EASYLAUNCH_TEST_SSH_HOME=/home/$USER_NAME
export EASYLAUNCH_TEST_SSH_FULL_DIR=/srv/full
export EASYLAUNCH_TEST_SSH_READONLY_DIR=/srv/readonly
export EASYLAUNCH_TEST_SSH_PYTHON_VERSION=${REMOTE_PY%.*}
export EASYLAUNCH_TEST_SSH_OTHER_PYTHON=/usr/local/bin/python3.9
export EASYLAUNCH_TEST_SSH_OTHER_PYTHON_VERSION=${REMOTE_PY39%.*}
export EASYLAUNCH_TEST_SSH_SERVICE=$HERE/sshd.sh
$docker_lines
EOF
}

do_start() {
    local t0
    t0=$(now)
    WANT_CP=$(wanted_cloudpickle)
    apt_ensure openssh-server openssh-client socat "${IMAGE_DEBOOTSTRAP_PACKAGES[@]}"
    ensure_user
    ensure_root
    mount_root
    ensure_keys
    write_conf
    start_relay
    start_sshd
    ssh-keyscan -p "$PORT" -t ed25519 127.0.0.1 2>/dev/null >"$CONF_DIR/known_hosts.new"
    grep -q ssh-ed25519 "$CONF_DIR/known_hosts.new" || fail "ssh-keyscan found no host key"
    mv "$CONF_DIR/known_hosts.new" "$CONF_DIR/known_hosts"
    chmod 644 "$CONF_DIR/known_hosts"
    check_login
    write_env
    log "ready in $(elapsed "$t0"): $USER_NAME@127.0.0.1:$PORT chrooted in $ROOT (python $REMOTE_PY, $REMOTE_PY39)$([[ -S $ROOT/run/docker.sock ]] && echo ', docker socket relayed'); env: $ENV_FILE"
}

stop_remote_processes() { # processes whose root is $ROOT: started through our sshd
    local p pid pids=()
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $(readlink "$p/root" 2>/dev/null) == "$ROOT" ]] && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    log "ending ${#pids[@]} process(es) left running inside $ROOT"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    sleep 1
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
}

do_stop() {
    pid_stop sshd 10
    pid_stop sshd-docker-relay 10
    if [[ -d $ROOT ]]; then
        stop_remote_processes
        unmount_root
    fi
}

do_status() {
    if pid_alive sshd && ssh_ready; then
        echo "sshd: running (pid $(pid_get sshd)) on 127.0.0.1:$PORT, root $ROOT"
    else
        echo "sshd: not running"
        return 1
    fi
    if pid_alive sshd-docker-relay; then
        echo "docker socket relay: running (pid $(pid_get sshd-docker-relay))"
    else
        echo "docker socket relay: not running"
    fi
}

case ${1:-} in
start) do_start ;;
stop) do_stop; log "stopped" ;;
restart)
    pid_stop sshd 10
    do_start
    ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
