#!/usr/bin/env bash
# Apptainer (Singularity) for easylaunch's tests, plus a Python test image.
#
#   bash scripts/services/apptainer.sh start|stop|status
#
# Debian 12 has no apptainer package and unstable's binary needs a newer glibc, so apptainer
# runs from a Debian sid minbase root (debootstrap --include=apptainer,squashfs-tools,e2fsprogs)
# entered through bubblewrap. Cached at /var/cache/easylaunch-test/apptainer-root: reused when
# it works, rebuilt when it does not.
# Wrappers named apptainer and singularity go to $STATE/bin AND /usr/local/bin (Slurm jobs may
# not inherit the PATH that $STATE/apptainer.env sets).
# Test image: a Debian bookworm minbase root with python3 (3.11, the host's minor) and the
# caller's cloudpickle version (EASYLAUNCH_TEST_CLOUDPICKLE_VERSION, default: what the host's
# python3 imports), kept as a sandbox directory at /var/cache/easylaunch-test/python-image, and
# squashed into python-image.sif when that works. Rebuilt when the cloudpickle version changes.
# There is no daemon: stop does nothing.
set -euo pipefail

# shellcheck disable=SC2034 # used by lib.sh
SVC=apptainer
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/lib.sh"

CACHE=/var/cache/easylaunch-test
AROOT=$CACHE/apptainer-root
IMG=$CACHE/python-image
IMG_STAMP=$CACHE/python-image.stamp
SIF=$CACHE/python-image.sif
SIF_STAMP=$CACHE/python-image.sif.stamp
BIN=$STATE/bin
ENV_FILE=$STATE/apptainer.env
SUITE=${EASYLAUNCH_APPTAINER_SUITE:-sid}
IMG_SUITE=bookworm
IMG_BASE="debootstrap minbase $IMG_SUITE python3 python3-pip v1"
BUILD_SIF=${EASYLAUNCH_TEST_BUILD_SIF:-1}
PYTHON=${PYTHON:-python3}
MIRROR=$(debian_mirror)

write_wrappers() {
    local dir
    for dir in "$BIN" /usr/local/bin; do
        mkdir -p "$dir"
        cat >"$dir/apptainer.tmp" <<EOF
#!/bin/bash
# Apptainer for easylaunch's tests: /usr/bin/apptainer of a Debian $SUITE root
# ($AROOT), entered through bubblewrap. Written by easylaunch
# scripts/services/apptainer.sh into \$EASYLAUNCH_SERVICES_DIR/bin AND /usr/local/bin: Slurm
# jobs may not inherit the PATH set by the test's env file, and must still find singularity.
set -euo pipefail
ROOT=$AROOT
args=(--bind "\$ROOT" / --dev-bind /dev /dev --proc /proc --bind /sys /sys --bind /tmp /tmp)
for d in /work /root $CACHE /run; do
    args+=(--bind-try "\$d" "\$d")
done
cwd=\$PWD
case \$cwd in
# already bound above
/tmp | /tmp/* | /work | /work/* | /root | /root/* | $CACHE | $CACHE/* | /run | /run/*) ;;
# never shadow the root's own system directories with the host's
/ | /usr | /usr/* | /bin | /bin/* | /sbin | /sbin/* | /lib* | /etc | /etc/* | /var | /var/lib | /var/lib/* | /proc* | /sys* | /dev*) ;;
*) args+=(--bind-try "\$cwd" "\$cwd") ;;
esac
exec env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    bwrap "\${args[@]}" --chdir "\$cwd" /usr/bin/apptainer "\$@"
EOF
        chmod 755 "$dir/apptainer.tmp"
        mv -f "$dir/apptainer.tmp" "$dir/apptainer"
        # `singularity` is the same program (the name easylaunch's Singularity backend calls).
        cp -f "$dir/apptainer" "$dir/singularity.tmp"
        mv -f "$dir/singularity.tmp" "$dir/singularity"
    done
}

apptainer_works() {
    local out
    out=$(timeout 60 "$BIN/apptainer" --version 2>&1) || return 1
    [[ $out == "apptainer version "* ]]
}

build_apptainer_root() {
    local t0 tmp=$AROOT.partial
    t0=$(now)
    log "building apptainer root: debootstrap --variant=minbase $SUITE $AROOT ($MIRROR)"
    safe_rm_tree "$tmp"
    mkdir -p "$CACHE"
    if ! debootstrap --variant=minbase --include=apptainer,squashfs-tools,e2fsprogs \
        "$SUITE" "$tmp" "$MIRROR" >"$LOGDIR/debootstrap-apptainer.log" 2>&1; then
        tail_logs "$LOGDIR/debootstrap-apptainer.log" "$tmp/debootstrap/debootstrap.log"
        safe_rm_tree "$tmp"
        die "debootstrap of Debian $SUITE with apptainer failed (Debian $SUITE changes: see log above)"
    fi
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tmp/etc/hosts"
    local conf=$tmp/etc/apptainer/apptainer.conf
    [[ -f $conf ]] || die "no $conf in the $SUITE root"
    # The sandbox lacks CAP_SYS_RESOURCE (and others): keep only the file capabilities.
    sed -i 's/^root default capabilities *=.*/root default capabilities = file/' "$conf"
    grep -q '^root default capabilities = file' "$conf" ||
        echo 'root default capabilities = file' >>"$conf"
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
    safe_rm_tree "$AROOT"
    mv "$tmp" "$AROOT"
    log "apptainer root built in $(elapsed "$t0")"
}

ensure_apptainer_root() {
    if [[ -x $AROOT/usr/bin/apptainer ]] && apptainer_works; then
        log "reusing $AROOT ($("$BIN/apptainer" --version))"
        return 0
    fi
    [[ -e $AROOT ]] && warn "$AROOT is broken: rebuilding"
    build_apptainer_root
    apptainer_works || {
        timeout 60 "$BIN/apptainer" --version || true
        die "apptainer does not run from $AROOT"
    }
    log "$("$BIN/apptainer" --version)"
}

# Base image (debootstrap) only; runs in the background in parallel with the apptainer root.
build_image_base() {
    local tmp=$IMG.partial
    safe_rm_tree "$tmp"
    mkdir -p "$CACHE"
    if ! debootstrap --variant=minbase --include=python3,python3-pip \
        "$IMG_SUITE" "$tmp" "$MIRROR" >"$LOGDIR/debootstrap-python-image.log" 2>&1; then
        tail_logs "$LOGDIR/debootstrap-python-image.log" "$tmp/debootstrap/debootstrap.log"
        safe_rm_tree "$tmp"
        return 1
    fi
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
    safe_rm_tree "$IMG"
    rm -f "$IMG_STAMP" "$SIF_STAMP"
    mv "$tmp" "$IMG"
    echo "base=$IMG_BASE" >"$IMG_STAMP"
}

image_base_ok() {
    [[ -x $IMG/usr/bin/python3 ]] && grep -qx "base=$IMG_BASE" "$IMG_STAMP" 2>/dev/null &&
        chroot "$IMG" /usr/bin/python3 -c 'import json, sys' 2>/dev/null
}

image_cloudpickle() { root_cloudpickle "$IMG"; } # version installed in the image, empty if none

verify_image() { # IMAGE WANT
    local out
    out=$(cd /tmp && timeout 120 "$BIN/apptainer" exec --cleanenv -B /tmp:/tmp "$1" \
        python3 -c 'import cloudpickle, json; print(cloudpickle.__version__)' 2>&1) || {
        printf '%s\n' "$out" >&2
        return 1
    }
    out=$(tail -n 1 <<<"$out")
    if [[ $out != "$2" ]]; then
        warn "$1: cloudpickle $out, wanted $2"
        return 1
    fi
}

build_sif() {
    local t0 stamp
    stamp=$(cat "$IMG_STAMP")
    if [[ -s $SIF ]] && [[ $(cat "$SIF_STAMP" 2>/dev/null) == "$stamp" ]]; then
        return 0
    fi
    t0=$(now)
    log "building $SIF (apptainer build from the sandbox)"
    rm -f "$SIF" "$SIF_STAMP" "$SIF.partial"
    if (cd /tmp && timeout 600 "$BIN/apptainer" build --force "$SIF.partial" "$IMG") \
        >"$LOGDIR/apptainer-build-sif.log" 2>&1; then
        mv "$SIF.partial" "$SIF"
        echo "$stamp" >"$SIF_STAMP"
        log "SIF built in $(elapsed "$t0") ($(du -h "$SIF" | cut -f1))"
    else
        rm -f "$SIF.partial"
        tail_logs "$LOGDIR/apptainer-build-sif.log"
        warn "could not build a SIF: tests use the sandbox directory"
        return 1
    fi
}

do_start() {
    local t0 want have base_pid='' image image_rc=0 t1
    t0=$(now)
    apt_ensure bubblewrap debootstrap debian-archive-keyring
    write_wrappers
    want=$(wanted_cloudpickle)
    [[ -n $want ]] || warn "no cloudpickle in '$PYTHON' and EASYLAUNCH_TEST_CLOUDPICKLE_VERSION unset: image gets the latest"
    # The python image's debootstrap runs in the background while the apptainer root is checked
    # (or built): the two are independent.
    if ! image_base_ok; then
        log "building python image: debootstrap --variant=minbase --include=python3,python3-pip $IMG_SUITE $IMG"
        t1=$(now)
        build_image_base &
        base_pid=$!
    fi
    ensure_apptainer_root
    if [[ -n $base_pid ]]; then
        wait "$base_pid" || image_rc=$?
        [[ $image_rc == 0 ]] || die "debootstrap of the python image failed (log: $LOGDIR/debootstrap-python-image.log)"
        log "python image base built in $(elapsed "$t1")"
    fi
    have=$(image_cloudpickle)
    if [[ -z $have || (-n $want && $have != "$want") ]]; then
        root_install_cloudpickle "$IMG" "$want"
        have=$(image_cloudpickle)
        [[ -n $have ]] || die "cloudpickle not importable in $IMG"
        [[ -z $want || $have == "$want" ]] || die "image has cloudpickle $have, wanted $want"
    fi
    [[ -n $want ]] || want=$have
    echo "base=$IMG_BASE" >"$IMG_STAMP"
    echo "cloudpickle=$have" >>"$IMG_STAMP"
    verify_image "$IMG" "$want" || die "apptainer exec of $IMG failed"
    log "sandbox image OK: $IMG (cloudpickle $want)"
    image=$IMG
    SIF_OK=0
    if [[ $BUILD_SIF == 1 ]] && build_sif; then
        if verify_image "$SIF" "$want"; then
            image=$SIF
            SIF_OK=1
            log "SIF image OK: $SIF"
        else
            warn "apptainer exec of $SIF failed: tests use the sandbox directory"
        fi
    fi
    {
        echo "# written by scripts/services/apptainer.sh start"
        echo "export PATH=\"$BIN:\$PATH\""
        echo "export EASYLAUNCH_TEST_APPTAINER=1"
        echo "export EASYLAUNCH_TEST_SINGULARITY_IMAGE=$image"
        echo "export EASYLAUNCH_TEST_SINGULARITY_SANDBOX=$IMG"
        [[ $SIF_OK == 1 ]] && echo "export EASYLAUNCH_TEST_SINGULARITY_SIF=$SIF"
        echo "export EASYLAUNCH_TEST_IMAGE_CLOUDPICKLE_VERSION=$want"
    } >"$ENV_FILE"
    log "ready in $(elapsed "$t0"); image: $image; env: $ENV_FILE"
}

do_status() {
    apptainer_works && echo "apptainer: $("$BIN/apptainer" --version) ($AROOT)"
    [[ -f $IMG_STAMP ]] && echo "image: $IMG ($(tr '\n' ' ' <"$IMG_STAMP"))"
    [[ -s $SIF ]] && echo "sif: $SIF"
    return 0
}

case ${1:-} in
start) do_start ;;
stop) log "no daemon: nothing to stop" ;;
status) do_status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
