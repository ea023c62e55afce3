# shellcheck shell=bash
# The container test images of docker.sh and podman.sh (sourced after lib.sh, not executed).
#
# No registry is reachable: every image is a root filesystem kept as a tar file in $IMAGES, next
# to a stamp saying what it holds (rebuilt only when that changes), and imported by each engine
# from that FILE (`podman import` of a pipe from a process substitution silently makes an empty
# image). KEY   image                              contents
#   bookworm    local/easylaunch-python:bookworm   Debian bookworm minbase + python3 (3.11, the
#               launcher's minor) + the caller's cloudpickle: apptainer.sh's python-image when it
#               holds the wanted cloudpickle, else our own debootstrap ($IMAGES/bookworm-root) + pip
#   bullseye    local/easylaunch-python:bullseye   Debian bullseye minbase + python3 (3.9, another
#               minor), no cloudpickle: a user's image
#   busybox     local/easylaunch-busybox           busybox-static + a symlink per applet, /etc/passwd:
#               /bin/sh but no python (~2 MB)
#   nosh        local/easylaunch-nosh              /etc/passwd, /etc/group, /tmp, /sbin/tini (static):
#               no /bin/sh, no python
# Every image gets PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin.
# $IMAGES/ENGINE-KEY.id records which tar stamp and image id an engine holds, so a warm start only
# inspects the images. Each tar is built under its own lock ($IMAGES/KEY.lock, held in a subshell
# only: daemons never inherit it); the two debootstraps can run in parallel (image_build KEY &).
# Callers set ENGINE (the CLI as an array, e.g. (docker -H unix:///var/run/docker.sock)) and
# WANT_CP (wanted_cloudpickle) and install IMAGE_PACKAGES first (IMAGE_DEBOOTSTRAP_PACKAGES suffice
# for the two debootstrapped images).

CACHE=/var/cache/easylaunch-test
IMAGES=$CACHE/images
IMAGES_VERSION=1 # bump to rebuild every tar
IMAGE_KEYS=(bookworm bullseye busybox nosh)
declare -A IMAGE_NAME=(
    [bookworm]=local/easylaunch-python:bookworm
    [bullseye]=local/easylaunch-python:bullseye
    [busybox]=local/easylaunch-busybox
    [nosh]=local/easylaunch-nosh
)
IMAGE_ENV_PATH='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
IMAGE_DEBOOTSTRAP_PACKAGES=(debootstrap debian-archive-keyring)
# shellcheck disable=SC2034 # used by the scripts that source this file
IMAGE_PACKAGES=("${IMAGE_DEBOOTSTRAP_PACKAGES[@]}" busybox-static tini)
# apptainer.sh's bookworm root (reused when it holds the wanted cloudpickle; =0 never reuses it)
PY_IMG=$CACHE/python-image
PY_IMG_STAMP=$CACHE/python-image.stamp
REUSE_PY_IMG=${EASYLAUNCH_TEST_IMAGES_REUSE_APPTAINER:-1}
OWN_ROOT=$IMAGES/bookworm-root
OWN_ROOT_BASE="debootstrap minbase bookworm python3 v1"
# labels the containers the images are checked with (never io.easylaunch.managed)
IMAGE_CHECK_LABEL=io.easylaunch.test-harness
# the image's python3 version as "X.Y", by KEY (bookworm, bullseye), set by images_check
declare -A IMAGE_PYTHON=()

image_names() { # the four image names, in IMAGE_KEYS order
    local key out=''
    for key in "${IMAGE_KEYS[@]}"; do out+="${out:+ }${IMAGE_NAME[$key]}"; done
    echo "$out"
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

python_image_reusable() {
    local cp
    [[ $REUSE_PY_IMG == 1 && -x $PY_IMG/usr/bin/python3 && -f $PY_IMG_STAMP ]] || return 1
    grep -q '^base=debootstrap minbase bookworm ' "$PY_IMG_STAMP" || return 1
    cp=$(sed -n 's/^cloudpickle=//p' "$PY_IMG_STAMP")
    [[ -n $cp && (-z $WANT_CP || $cp == "$WANT_CP") ]]
}

image_want() { # KEY -> the stamp its tar must have
    case $1 in
    bookworm)
        if python_image_reusable; then
            echo "v$IMAGES_VERSION copy of $PY_IMG: $(tr '\n' ' ' <"$PY_IMG_STAMP")"
        else
            echo "v$IMAGES_VERSION $OWN_ROOT_BASE cloudpickle=${WANT_CP:-latest}"
        fi
        ;;
    bullseye) echo "v$IMAGES_VERSION debootstrap minbase bullseye python3" ;;
    busybox) echo "v$IMAGES_VERSION busybox-static $(pkg_version busybox-static)" ;;
    nosh) echo "v$IMAGES_VERSION tini-static $(pkg_version tini)" ;;
    *) die "unknown image $1" ;;
    esac
}

tar_root() { # DIR OUT: the root filesystem DIR as a tar file OUT, owners by number
    tar --numeric-owner --one-file-system -C "$1" -cf "$2" .
}

clean_debian_root() { # DIR: drop what an image does not need (apt caches)
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*_Packages* \
        "$1"/var/lib/apt/lists/*Release*
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$1/etc/hosts"
}

write_passwd() { # DIR SHELL
    mkdir -p "$1/etc" "$1/root" "$1/tmp"
    chmod 1777 "$1/tmp"
    printf 'root:x:0:0:root:/root:%s\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' "$2" \
        >"$1/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$1/etc/group"
}

debootstrap_root() { # SUITE INCLUDE DIR LOGNAME
    local suite=$1 include=$2 dir=$3 logf=$LOGDIR/debootstrap-$4.log
    safe_rm_tree "$dir"
    mkdir -p "$(dirname "$dir")"
    if ! debootstrap --variant=minbase --include="$include" "$suite" "$dir" "$(debian_mirror)" \
        >"$logf" 2>&1; then
        tail_logs "$logf" "$dir/debootstrap/debootstrap.log"
        safe_rm_tree "$dir"
        die "debootstrap --variant=minbase --include=$include $suite failed (log: $logf)"
    fi
    clean_debian_root "$dir"
    chroot "$dir" /usr/bin/python3 -c 'import json, sys' ||
        die "python3 does not run in the debootstrapped $suite root $dir"
}

build_bullseye() { # OUT
    local root=$IMAGES/bullseye-root.partial
    debootstrap_root bullseye python3 "$root" bullseye
    [[ -z $(root_cloudpickle "$root") ]] || die "the bullseye root has cloudpickle: it must not"
    tar_root "$root" "$1"
    safe_rm_tree "$root"
}

ensure_own_bookworm_root() {
    local have
    if ! [[ -x $OWN_ROOT/usr/bin/python3 && $(cat "$OWN_ROOT.stamp" 2>/dev/null) == "base=$OWN_ROOT_BASE" ]]; then
        debootstrap_root bookworm python3 "$OWN_ROOT.partial" bookworm
        safe_rm_tree "$OWN_ROOT"
        rm -f "$OWN_ROOT.stamp"
        mv "$OWN_ROOT.partial" "$OWN_ROOT"
        echo "base=$OWN_ROOT_BASE" >"$OWN_ROOT.stamp"
    fi
    have=$(root_cloudpickle "$OWN_ROOT")
    if [[ -z $have || (-n $WANT_CP && $have != "$WANT_CP") ]]; then
        root_install_cloudpickle "$OWN_ROOT" "$WANT_CP"
        have=$(root_cloudpickle "$OWN_ROOT")
        [[ -n $have && (-z $WANT_CP || $have == "$WANT_CP") ]] ||
            die "$OWN_ROOT has cloudpickle '$have', wanted '${WANT_CP:-any}'"
    fi
}

build_bookworm() { # OUT
    local before
    if python_image_reusable; then
        before=$(cat "$PY_IMG_STAMP")
        log "bookworm: copying apptainer.sh's $PY_IMG ($(tr '\n' ' ' <"$PY_IMG_STAMP"))"
        tar_root "$PY_IMG" "$1"
        [[ $(cat "$PY_IMG_STAMP" 2>/dev/null) == "$before" ]] ||
            die "$PY_IMG changed while it was copied (apptainer.sh start running?): start again"
    else
        log "bookworm: building our own root $OWN_ROOT"
        ensure_own_bookworm_root
        tar_root "$OWN_ROOT" "$1"
    fi
}

build_busybox() { # OUT
    local root=$IMAGES/busybox-root.partial path
    [[ -x /bin/busybox ]] || die "no /bin/busybox (apt busybox-static)"
    rm -rf "$root"
    write_passwd "$root" /bin/sh
    mkdir -p "$root/bin"
    cp /bin/busybox "$root/bin/busybox"
    while read -r path; do
        [[ -n $path && $path != bin/busybox && ! -e $root/$path ]] || continue
        mkdir -p "$root/$(dirname "$path")"
        ln -s /bin/busybox "$root/$path"
    done < <(/bin/busybox --list-full)
    [[ -L $root/bin/sh && ! -e $root/usr/bin/python3 ]] || die "unexpected busybox root (sh/python3)"
    tar_root "$root" "$1"
    rm -rf "$root"
}

build_nosh() { # OUT
    local root=$IMAGES/nosh-root.partial
    [[ -x /usr/bin/tini-static ]] || die "no /usr/bin/tini-static (apt tini)"
    rm -rf "$root"
    write_passwd "$root" /nonexistent
    mkdir -p "$root/sbin"
    cp /usr/bin/tini-static "$root/sbin/tini"
    tar_root "$root" "$1"
    rm -rf "$root"
}

# image_build KEY: make $IMAGES/KEY.tar hold what image_want says (no-op when it does).
image_build() {
    local key=$1
    mkdir -p "$IMAGES"
    (
        local want t0 tar=$IMAGES/$key.tar
        flock -w 1800 9 || die "timed out waiting for $IMAGES/$key.lock"
        want=$(image_want "$key")
        if [[ -s $tar && $(cat "$tar.stamp" 2>/dev/null) == "$want" ]]; then
            exit 0
        fi
        t0=$(now)
        log "building image tar $key ($want)"
        rm -f "$tar.partial"
        "build_$key" "$tar.partial"
        rm -f "$tar.stamp"
        mv -f "$tar.partial" "$tar"
        echo "$want" >"$tar.stamp"
        log "image tar $key built in $(elapsed "$t0") ($(du -h "$tar" | cut -f1))"
    ) 9>"$IMAGES/$key.lock"
}

# images_build_background KEY...: image_build each KEY in the background; images_wait waits.
IMAGE_BUILD_PIDS=()
images_build_background() {
    local key
    for key in "$@"; do
        image_build "$key" &
        IMAGE_BUILD_PIDS+=("$!:$key")
    done
}
images_wait() { # fails (exit) if a background build failed
    local entry rc=0 failed=''
    for entry in "${IMAGE_BUILD_PIDS[@]}"; do
        wait "${entry%%:*}" || { rc=$?; failed+=" ${entry#*:}"; }
    done
    IMAGE_BUILD_PIDS=()
    [[ $rc == 0 ]] || die "building image tar(s)$failed failed (see above)"
}
# For an EXIT trap: never leave a background debootstrap writing into the cache behind us.
images_wait_quietly() {
    local entry
    for entry in "${IMAGE_BUILD_PIDS[@]}"; do
        wait "${entry%%:*}" 2>/dev/null || true
    done
}

# image_id NAME: the engine's id of image NAME (empty if absent)
# shellcheck disable=SC2153 # ENGINE is set by the script that sources this file
image_id() { "${ENGINE[@]}" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# images_load ENGINE_NAME: import every tar the engine does not hold in its current version.
images_load() {
    local engine=$1 key name stamp rec cur id t0 logf
    for key in "${IMAGE_KEYS[@]}"; do
        name=${IMAGE_NAME[$key]}
        stamp=$(cat "$IMAGES/$key.tar.stamp")
        rec=$IMAGES/$engine-$key.id
        cur=$(image_id "$name")
        if [[ -n $cur && -f $rec && $(cat "$rec") == "$(printf 'stamp=%s\nid=%s' "$stamp" "$cur")" ]]; then
            continue
        fi
        t0=$(now)
        logf=$LOGDIR/$engine-import-$key.log
        "${ENGINE[@]}" import --change "$IMAGE_ENV_PATH" "$IMAGES/$key.tar" "$name" >"$logf" 2>&1 ||
            { tail_logs "$logf"; die "$engine import of $IMAGES/$key.tar as $name failed"; }
        id=$(image_id "$name")
        [[ -n $id ]] || { tail_logs "$logf"; die "$engine import said OK but there is no image $name"; }
        if [[ -n $cur && $cur != "$id" ]]; then
            "${ENGINE[@]}" rmi "$cur" >/dev/null 2>&1 || warn "could not remove the previous $name ($cur)"
        fi
        printf 'stamp=%s\nid=%s\n' "$stamp" "$id" >"$rec"
        log "imported $name into $engine in $(elapsed "$t0")"
    done
}

# images_check ENGINE_NAME: run each image once (python versions, no python, the static binary);
# sets IMAGE_PYTHON[bookworm|bullseye]. Its containers are removed even when a check fails.
images_check() {
    local engine=$1 key out rc=0 t0
    t0=$(now)
    _check_run() { # IMAGE CMD... -> stdout (a failure prints the output and returns non-zero)
        local o
        o=$(timeout 120 "${ENGINE[@]}" run --rm --network none --label "$IMAGE_CHECK_LABEL=1" "$@" 2>&1) ||
            { printf '%s\n' "$o" >&2; return 1; }
        printf '%s\n' "$o"
    }
    for key in bookworm bullseye; do
        out=$(_check_run "${IMAGE_NAME[$key]}" python3 -c 'import json, sys; print("%d.%d" % sys.version_info[:2])') ||
            { rc=1; warn "python3 does not run in ${IMAGE_NAME[$key]} on $engine"; continue; }
        IMAGE_PYTHON[$key]=$(tail -n 1 <<<"$out")
    done
    # shellcheck disable=SC2016 # expanded in the container
    if ! out=$(_check_run "${IMAGE_NAME[busybox]}" /bin/sh -c \
        'for p in python3 python; do command -v $p && exit 3; done; echo no-python') ||
        [[ $out != no-python ]]; then
        rc=1
        warn "${IMAGE_NAME[busybox]} on $engine: expected /bin/sh without python, got: $out"
    fi
    if ! out=$(_check_run "${IMAGE_NAME[nosh]}" /sbin/tini --version) || [[ $out != *"tini version"* ]]; then
        rc=1
        warn "${IMAGE_NAME[nosh]} on $engine: /sbin/tini --version said: $out"
    fi
    # --rm removes them; a container whose start failed may stay: remove those by our label.
    local left
    left=$("${ENGINE[@]}" ps -aq --filter "label=$IMAGE_CHECK_LABEL" 2>/dev/null || true)
    if [[ -n $left ]]; then
        # shellcheck disable=SC2086
        "${ENGINE[@]}" rm -f $left >/dev/null 2>&1 || warn "could not remove check containers: $left"
    fi
    [[ $rc == 0 ]] || return 1
    log "images run on $engine (python ${IMAGE_PYTHON[bookworm]} and ${IMAGE_PYTHON[bullseye]}) in $(elapsed "$t0")"
}
