#!/usr/bin/env bash
# End-to-end test: Debian's podman 4.3 with unionfs-rs as the containers-storage overlay
# driver's `mount_program` (the drop-in for fuse-overlayfs), rootful and rootless.
#
# For each mode it imports a busybox-static root filesystem and runs the scenarios below twice:
# once on overlay+unionfs-rs and once on the vfs driver (the reference: plain copies, no union),
# and compares what podman reports.
#
#   version        `PROG --version` (through the logging wrapper) prints a version
#   run-write      `podman run` writes a file; the container's / is a fuse.unionfs-rs mount;
#                  podman called `PROG -o lowerdir=…,upperdir=…,workdir=… MERGED`
#   build          `podman build` with RUN, COPY, a deleted base file, a deleted-and-recreated
#                  directory, chmod/chown/mkfifo/symlink; every file of the image (type, mode,
#                  owner, content) equals the vfs build
#   image-diff     `podman diff IMAGE` of that build equals vfs
#   rmdir-diff     build `RUN rm -rf /data && mkdir /data` over a lower /data/b; image diff = vfs
#   ctr-diff       `podman container diff` after deletes/recreates/appends, and after `mv` of a
#                  base image directory (a rename of a lower directory: copied up whole), equals
#                  vfs
#   commit         `podman commit`, run the committed image, its `podman diff` equals vfs
#   image-mount    `podman image mount` (rootless: inside `podman unshare`): a read-only union of
#                  lower layers only, whiteouts honoured, unmounted cleanly
#   keep-id        (rootless) `--userns=keep-id`: owners seen inside and after a commit equal vfs;
#                  podman passes uidmapping=/gidmapping=
#   squash         single-id mapping (`--uidmap 0:N:1`): podman passes squash_to_uid/gid=N;
#                  owners, writes and appends equal vfs
#   lifecycle      run -d / exec / stop / start / rm: no mount or daemon left after stop and rm
#   size-limit     a unionfs-rs config file (`mount_program_options = size=20M`) gives every
#                  container mount a quota: `df /` in the container shows 20 MiB, writing 40 MiB
#                  fails with ENOSPC after ~20 MiB
#   leftovers      after `podman rm -af`: no fuse mount under the test dir, no live daemon
#
# Usage: tools/podman-e2e.sh [/path/to/unionfs-rs]      (as root)
# Environment: UNIONFS_BIN (binary, when no argument; default <repo>/target/release/unionfs-rs,
#   built if missing), PODMAN_E2E_USER (rootless user, default podtest, created if missing),
#   PODMAN_E2E_MODES (default "rootful rootless"), PODMAN_E2E_TIMEOUT (seconds per podman
#   command, default 120), PODMAN_E2E_KEEP=1 (keep the temp dir; storage is reset anyway),
#   PODMAN_E2E_ROOTLESS_EXTRA_OPTS (diagnosis only: appended to the -o options podman passes
#   rootless, e.g. `userxattr`; the argv shapes printed are then podman's plus these).
# Prints `podman-e2e: N passed, M failed` last; exits 1 if anything failed.
#
# Notes for this VM (see shared/podman/README.md): runc (crun refuses the hybrid cgroup layout),
# cgroupfs, file events, netns none (rootless slirp4netns cannot open /dev/net/tun), rootful
# nofile/nproc ulimits the VM can grant. Rootless needs /dev/fuse 0666 (restored on exit).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
TAG=podman-e2e
say() { printf '%s: %s\n' "$TAG" "$*"; }
die() { say "error: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root"

# A daemon that outlives its test must not hold our caller's pipes open: close every inherited
# descriptor above stderr (bash reads this script from 255).
for fd in "/proc/$$/fd/"*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

BIN_SRC=${1:-${UNIONFS_BIN:-$repo/target/release/unionfs-rs}}
if [ ! -x "$BIN_SRC" ] && [ -z "${1:-}" ] && [ -z "${UNIONFS_BIN:-}" ]; then
    say "building $BIN_SRC"
    (cd "$repo" && PATH="$HOME/.cargo/bin:$PATH" cargo build --release --quiet --bin unionfs-rs)
fi
[ -x "$BIN_SRC" ] || die "no executable unionfs-rs at $BIN_SRC"
USR=${PODMAN_E2E_USER:-podtest}
MODES=${PODMAN_E2E_MODES:-rootful rootless}
TMO=${PODMAN_E2E_TIMEOUT:-120}
START=$(date +%s)

# ---------------------------------------------------------------- packages, user, /dev/fuse
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v timeout >/dev/null || need+=(coreutils)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ " $MODES " == *" rootless "* ]]; then
    id "$USR" >/dev/null 2>&1 || { say "creating user $USR"; useradd -m "$USR"; }
    grep -q "^$USR:" /etc/subuid || usermod --add-subuids 300000-365535 "$USR"
    grep -q "^$USR:" /etc/subgid || usermod --add-subgids 300000-365535 "$USR"
    UHOME=$(getent passwd "$USR" | cut -d: -f6)
fi

# Short: podman 4.3 refuses rootless runroots over 50 characters ($T/rootless/ufs/xdg/containers).
T=$(mktemp -d /tmp/pe.XXXXXX)
chmod 755 "$T"
FUSE_MODE=$(stat -c %a /dev/fuse)

# ---------------------------------------------------------------- cleanup on every path
# pod MODE DRIVER ARGS…: podman on that mode's storage for that driver.
pod() {
    local mode=$1 drv=$2
    shift 2
    local env=(E2E_MODE="$mode"
        CONTAINERS_CONF="$T/conf/containers-$mode-$drv.conf"
        CONTAINERS_STORAGE_CONF="$T/conf/storage-$mode-$drv.conf")
    if [ "$mode" = rootful ]; then
        timeout -k 10 "$TMO" env "${env[@]}" podman "$@" </dev/null
    else
        timeout -k 10 "$TMO" runuser -u "$USR" -- env -i \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME="$UHOME" USER="$USR" LOGNAME="$USR" XDG_RUNTIME_DIR="$T/rootless/$drv/xdg" \
            E2E_EXTRA_OPTS="${PODMAN_E2E_ROOTLESS_EXTRA_OPTS:-}" \
            "${env[@]}" podman "$@" </dev/null
    fi
}

cleanup() {
    local rc=$? mode drv m p
    set +e
    trap - EXIT INT TERM
    for mode in $MODES; do
        for drv in ufs vfs; do
            [ -f "$T/conf/storage-$mode-$drv.conf" ] || continue
            pod "$mode" "$drv" rm -af -t 0 >/dev/null 2>&1
            [ "$mode" = rootful ] && pod "$mode" "$drv" image unmount -a -f >/dev/null 2>&1
            pod "$mode" "$drv" system reset -f >/dev/null 2>&1
            if [ "$mode" = rootless ]; then
                p=$(cat "$T/rootless/$drv/xdg/libpod/tmp/pause.pid" 2>/dev/null)
                [ -n "$p" ] && kill "$p" 2>/dev/null
            fi
        done
    done
    # Mounts podman or a daemon left under our dir (deepest first): FUSE mounts, and the private
    # bind mount rootful podman puts on <graphroot>/overlay.
    awk -v t="$T/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    # Daemons still alive (ours only: their argv[0] is our private copy of the binary).
    for p in $(live_daemons); do kill "$p" 2>/dev/null; done
    chmod "$FUSE_MODE" /dev/fuse 2>/dev/null
    if [ "${PODMAN_E2E_KEEP:-0}" = 1 ]; then say "kept $T"; else rm -rf "$T"; fi
    exit "$rc"
}
live_daemons() {
    # pids of non-zombie processes running $T/bin/unionfs-rs (optionally: whose args contain $1)
    ps -eo pid=,stat=,args= | awk -v b="$T/bin/unionfs-rs" -v s="${1:-}" \
        '$2 !~ /^Z/ && $3 == b && (s == "" || index($0, s)) { print $1 }'
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- binary, wrapper, rootfs
mkdir -p "$T/bin" "$T/log" "$T/out"
chmod 1777 "$T/log"
install -m 755 "$BIN_SRC" "$T/bin/unionfs-rs"

# The mount_program: log argv, cwd, ids and the program's stderr, then exec the binary.
# stderr goes through a FIFO so that podman still reads until every writer (the program and
# the daemon it forks) has closed it, as it would without the wrapper.
cat > "$T/bin/mount-program" <<EOF
#!/bin/bash
LOG=$T/log/mount-\${E2E_MODE:-unknown}.log
exec 3>>"\$LOG"
# diagnostic knob: options appended to podman's -o string (PODMAN_E2E_ROOTLESS_EXTRA_OPTS)
if [ -n "\${E2E_EXTRA_OPTS:-}" ] && [ "\$#" = 3 ] && [ "\$1" = -o ]; then
    printf 'podman-argv [%s] [%s] [%s]\n' "\$@" >&3
    set -- -o "\$2,\$E2E_EXTRA_OPTS" "\$3"
fi
printf 'call %s uid=%s cwd=%s uid_map=%s\n' "\$(date +%T.%N)" "\$(id -u)" "\$PWD" \\
    "\$(tr -s ' ' < /proc/self/uid_map | tr '\n' ';')" >&3
printf 'argv' >&3; printf ' [%s]' "\$@" >&3; printf '\n' >&3
# size-limit scenario: a unionfs-rs config file giving every container mount a quota
if [ -f $T/conf/size-limit.on ]; then export UNIONFS_RS_CONFIG=$T/conf/unionfs-size.conf; fi
fifo=\$(mktemp -u $T/log/err.XXXXXX)
mkfifo -m 600 "\$fifo"
( while IFS= read -r l; do echo "stderr \$l" >&3; echo "\$l" >&2; done < "\$fifo"
  rm -f "\$fifo" ) &
exec 3>&- 2>"\$fifo" $T/bin/unionfs-rs "\$@"
EOF
chmod 755 "$T/bin/mount-program"

R=$T/rootfs
mkdir -p "$R"/{bin,etc,data/sub,root,tmp}
cp /bin/busybox "$R/bin/busybox"
for c in $("$R/bin/busybox" --list); do [ "$c" = busybox ] || ln -sf busybox "$R/bin/$c"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
echo removeme > "$R/etc/gone"
echo base > "$R/data/b"
echo keep > "$R/data/k"
echo s > "$R/data/sub/x"
chmod 1777 "$R/tmp"
tar -C "$R" -cf "$T/rootfs.tar" .
chmod 644 "$T/rootfs.tar"

mkdir -p "$T/ctx" "$T/ctx2"
echo copied > "$T/ctx/copied.txt"
cat > "$T/ctx/Containerfile" <<'EOF'
FROM localhost/base
RUN echo layer1 > /data/l1 && mkdir -p /opt/app && echo v1 > /opt/app/conf && ln -s /data/l1 /data/link1
COPY copied.txt /opt/app/copied.txt
RUN rm /etc/gone && rm /data/k && echo v2 > /opt/app/conf
RUN rm -rf /data && mkdir /data && echo new > /data/n && mkdir /data/sub && echo y > /data/sub/y
RUN chmod 700 /opt/app && chown 1:2 /opt/app/conf && mkfifo /opt/app/fifo && mkdir -p /opt/empty
EOF
printf 'FROM localhost/base\nRUN rm -rf /data && mkdir /data\n' > "$T/ctx2/Containerfile"

# Every file of an image: type+mode, owner, content hash, link target (container-specific
# /etc/hosts, /etc/hostname and /etc/resolv.conf left out).
cat > "$T/manifest.sh" <<'EOF'
cd /
for p in $(find bin/busybox data etc opt root tmp | sort); do
  case $p in etc/hosts|etc/hostname|etc/resolv.conf) continue;; esac
  if [ -f "$p" ] && [ ! -L "$p" ]; then h=$(md5sum < "$p" | cut -c1-8); else h=-; fi
  echo "$(stat -c '%A %u:%g' "$p") $p $h $([ -L "$p" ] && readlink "$p")"
done
EOF
chmod 644 "$T/manifest.sh" "$T/ctx/copied.txt"
chmod -R a+rX "$T/ctx" "$T/ctx2"

# ---------------------------------------------------------------- configs
mkdir -p "$T/conf"
for mode in $MODES; do
    for drv in ufs vfs; do
        base=$T/$mode/$drv
        mkdir -p "$base"
        {
            echo '[storage]'
            if [ "$drv" = ufs ]; then echo 'driver = "overlay"'; else echo 'driver = "vfs"'; fi
            echo "graphroot = \"$base/storage\""
            [ "$mode" = rootless ] && echo "rootless_storage_path = \"$base/storage\""
            echo "runroot = \"$base/run\""
            if [ "$drv" = ufs ]; then
                echo '[storage.options.overlay]'
                echo "mount_program = \"$T/bin/mount-program\""
            fi
        } > "$T/conf/storage-$mode-$drv.conf"
        {
            echo '[containers]'
            echo 'netns = "none"'
            [ "$mode" = rootful ] && echo 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
            echo '[engine]'
            echo 'cgroup_manager = "cgroupfs"'
            echo 'events_logger = "file"'
            echo 'runtime = "runc"'
            [ "$mode" = rootful ] && echo "tmp_dir = \"$base/libpod-tmp\""
            echo '[network]'
            echo "network_config_dir = \"$base/networks\""
        } > "$T/conf/containers-$mode-$drv.conf"
        if [ "$mode" = rootless ]; then
            mkdir -p "$base/xdg"
            chown -R "$USR:" "$T/rootless"
            chmod 700 "$base/xdg"
        fi
    done
    : > "$T/log/mount-$mode.log"
    chmod 666 "$T/log/mount-$mode.log"
done
if [[ " $MODES " == *" rootless "* ]]; then chmod 0666 /dev/fuse; fi

# ---------------------------------------------------------------- assertions, runner
PASS=0
FAILN=0
FAILED=()
same() { # same WHAT FILE_VFS FILE_UFS
    if ! cmp -s "$2" "$3"; then
        echo "MISMATCH $1 (< vfs, > unionfs-rs):"
        diff "$2" "$3" || true
        return 1
    fi
}
want() { # want WHAT PATTERN TEXT
    if ! grep -qE -- "$2" <<<"$3"; then
        echo "MISSING $1: /$2/ not in:"
        printf '%s\n' "$3"
        return 1
    fi
}
last_argv() { grep '^argv ' "$T/log/mount-$M.log" | tail -n 1; }
mounted_under() { # fuse mounts under $T in the mode's mount namespace
    if [ "$M" = rootful ]; then
        awk -v t="$T/" '$3 ~ /^fuse/ && index($2, t) == 1 { print $2 }' /proc/mounts
    else
        pod "$M" ufs unshare cat /proc/mounts |
            awk -v t="$T/" '$3 ~ /^fuse/ && index($2, t) == 1 { print $2 }'
    fi
}
# Does a container still have a mount or a live daemon? (none expected)
nothing_left_for() { # CONTAINER_UPPERDIR
    local m d
    m=$(mounted_under | grep -F "${1%/diff}/" || true)
    d=$(live_daemons "${1%/diff}/")
    if [ -n "$m$d" ]; then
        echo "LEFT OVER: mounts [$m] daemons [$d]"
        ps -o pid,stat,args -p "${d:-1}" || true
        return 1
    fi
}
scenario() { # scenario NAME FUNCTION
    local name=$M/$1 log=$T/out/${M}-$1.log t0 rc
    t0=$(date +%s)
    set +e
    (set -euo pipefail; "$2") >"$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        PASS=$((PASS + 1))
        say "PASS $name ($(($(date +%s) - t0))s)"
    else
        FAILN=$((FAILN + 1))
        FAILED+=("$name")
        say "FAIL $name (exit $rc, $(($(date +%s) - t0))s)"
        tail -n 25 "$log" | sed 's/^/    /'
    fi
}
P() { pod "$M" ufs "$@"; } # the filesystem under test
V() { pod "$M" vfs "$@"; } # the reference
O=$T/out

# ---------------------------------------------------------------- scenarios
s_import() {
    P import -q "$T/rootfs.tar" localhost/base
    V import -q "$T/rootfs.tar" localhost/base
}

s_run_write() {
    local out a
    out=$(P run --pull never --rm localhost/base sh -c 'echo hi > /tmp/x && cat /tmp/x && grep " / " /proc/mounts')
    echo "$out"
    want "file written and read back" '^hi$' "$out"
    want "rootfs is a unionfs-rs FUSE mount" '^[^ ]+ / fuse\.unionfs-rs ' "$out"
    a=$(last_argv)
    echo "$a"
    want "argv: PROG -o OPTS MERGED" '^argv \[-o\] \[lowerdir=[^]]*,upperdir=[^]]*/diff,workdir=[^]]*/work[^]]*\] \[[^]]*/merged\]$' "$a"
}

s_build() {
    P build --network none -q -t localhost/built "$T/ctx"
    V build --network none -q -t localhost/built "$T/ctx"
    P run --pull never --rm -v "$T/manifest.sh:/m.sh:ro" localhost/built sh /m.sh > "$O/$M-man-ufs"
    V run --pull never --rm -v "$T/manifest.sh:/m.sh:ro" localhost/built sh /m.sh > "$O/$M-man-vfs"
    cat "$O/$M-man-ufs"
    want "the deleted-and-recreated dir has only its new content" '^-rw-r--r-- 0:0 data/n ' "$(cat "$O/$M-man-ufs")"
    same "image content" "$O/$M-man-vfs" "$O/$M-man-ufs"
}

s_image_diff() {
    P diff localhost/built | sort > "$O/$M-idiff-ufs"
    V diff localhost/built | sort > "$O/$M-idiff-vfs"
    cat "$O/$M-idiff-vfs"
    same "podman diff localhost/built" "$O/$M-idiff-vfs" "$O/$M-idiff-ufs"
}

s_rmdir_diff() {
    P build --network none -q -t localhost/rmdir "$T/ctx2"
    V build --network none -q -t localhost/rmdir "$T/ctx2"
    P run --pull never --rm localhost/rmdir ls -a /data > "$O/$M-rmdir-ls-ufs"
    V run --pull never --rm localhost/rmdir ls -a /data > "$O/$M-rmdir-ls-vfs"
    same "ls -a /data in the image" "$O/$M-rmdir-ls-vfs" "$O/$M-rmdir-ls-ufs"
    P diff localhost/rmdir | sort > "$O/$M-rmdir-ufs"
    V diff localhost/rmdir | sort > "$O/$M-rmdir-vfs"
    cat "$O/$M-rmdir-vfs"
    same "podman diff localhost/rmdir" "$O/$M-rmdir-vfs" "$O/$M-rmdir-ufs"
}

CHANGES='rm -rf /data && mkdir /data && echo n > /data/n2 && rm /etc/passwd && echo x >> /etc/group && mkdir -p /new/dir && touch /new/dir/f && rm -rf /opt/app && ln -s /tmp /tl && echo t > /tmp/t'
s_ctr_diff() {
    local c
    # `podman diff NAME` looks NAME up as an image (ID prefix) before a container: a container
    # called "db" showed the diff of whichever image's ID began with "db" (seen on both sides,
    # ~1 run in 10). `podman container diff` and names that are not hex avoid that.
    for c in P V; do
        $c rm -f ctr-changes >/dev/null 2>&1 || true
        $c run --pull never --name ctr-changes localhost/built sh -c "$CHANGES"
        $c container diff ctr-changes | sort > "$O/$M-cdiff-$c"
        # the issue's case: rm -rf /data; mkdir /data over a lower /data/b
        $c rm -f ctr-rmdata >/dev/null 2>&1 || true
        $c run --pull never --name ctr-rmdata localhost/base sh -c 'rm -rf /data && mkdir /data && echo n > /data/b2'
        $c container diff ctr-rmdata | sort > "$O/$M-bdiff-$c"
        # a base image directory moved (and changed after the move)
        $c rm -f ctr-mvdir >/dev/null 2>&1 || true
        $c run --pull never --name ctr-mvdir localhost/base \
            sh -c 'mv /data /moved && echo m > /moved/sub/m && cat /moved/b /moved/sub/x'
        $c container diff ctr-mvdir | sort > "$O/$M-mdiff-$c"
    done
    cat "$O/$M-cdiff-V" "$O/$M-bdiff-V" "$O/$M-mdiff-V"
    want "vfs: the file the command created" '^A /new/dir/f$' "$(cat "$O/$M-cdiff-V")"
    want "vfs: the file the command created" '^A /data/b2$' "$(cat "$O/$M-bdiff-V")"
    same "podman diff CONTAINER (over localhost/built)" "$O/$M-cdiff-V" "$O/$M-cdiff-P"
    same "podman diff CONTAINER (rm -rf /data; mkdir /data over base)" "$O/$M-bdiff-V" "$O/$M-bdiff-P"
    want "vfs: the moved directory's new file" '^A /moved/sub/m$' "$(cat "$O/$M-mdiff-V")"
    same "podman diff CONTAINER (mv /data /moved over base)" "$O/$M-mdiff-V" "$O/$M-mdiff-P"
}

s_commit() {
    local c
    for c in P V; do
        $c commit -q ctr-rmdata localhost/committed >/dev/null
        $c run --pull never --rm localhost/committed sh -c 'ls -a /data; cat /data/b2' > "$O/$M-crun-$c"
        $c diff localhost/committed | sort > "$O/$M-cidiff-$c"
        $c commit -q ctr-mvdir localhost/committed-mv >/dev/null
        $c run --pull never --rm localhost/committed-mv \
            sh -c 'ls -a / /moved /moved/sub; cat /moved/b /moved/sub/m' > "$O/$M-cmrun-$c"
        $c rm -f ctr-changes ctr-rmdata ctr-mvdir
    done
    cat "$O/$M-crun-P"
    same "content of the committed image" "$O/$M-crun-V" "$O/$M-crun-P"
    same "podman diff of the committed image" "$O/$M-cidiff-V" "$O/$M-cidiff-P"
    same "content of the committed image with a moved base directory" "$O/$M-cmrun-V" "$O/$M-cmrun-P"
}

s_image_mount() {
    local script out a
    # shellcheck disable=SC2016
    script='set -e; m=$(podman image mount localhost/built); echo "mnt=$m"; grep " $m " /proc/mounts
        cat "$m/data/n"; ls -a "$m/data"; ls "$m/etc"
        if touch "$m/x" 2>/dev/null; then echo WRITABLE; else echo read-only; fi
        podman image unmount localhost/built >/dev/null
        if grep -q " $m " /proc/mounts; then echo STILL-MOUNTED; else echo unmounted; fi'
    local rc=0
    if [ "$M" = rootful ]; then
        out=$(CONTAINERS_CONF="$T/conf/containers-$M-ufs.conf" \
            CONTAINERS_STORAGE_CONF="$T/conf/storage-$M-ufs.conf" E2E_MODE=$M \
            timeout -k 10 "$TMO" sh -c "$script" 2>&1) || rc=$?
    else
        out=$(P unshare sh -c "$script" 2>&1) || rc=$?
    fi
    echo "$out"
    [ "$rc" = 0 ] || { echo "image mount script failed: exit $rc"; return 1; }
    a=$(last_argv)
    echo "$a"
    want "mounted through unionfs-rs, read-only" ' fuse\.unionfs-rs ro,' "$out"
    want "content of the top layer" '^new$' "$out"
    want "deleted base file hidden" '^group$' "$out"
    if grep -q '^gone$' <<<"$out"; then echo "deleted /etc/gone visible"; return 1; fi
    want "read-only" '^read-only$' "$out"
    want "unmounted" '^unmounted$' "$out"
    want "argv: lowerdir only" '^argv \[-o\] \[lowerdir=[^],]*(,[^],]*)*\] \[[^]]*/merged\]$' "$a"
    if grep -q 'upperdir=' <<<"$a"; then echo "image mount got an upperdir"; return 1; fi
    nothing_left_for "$(awk -F= '/^mnt=/ { print $2 }' <<<"$out")"
}

KEEPID_SCRIPT='id; stat -c "%u:%g %n" /data /data/b /bin/busybox /tmp; echo w > /tmp/w; mkdir /tmp/dd; stat -c "%u:%g %n" /tmp/w /tmp/dd; if echo x 2>/dev/null >> /data/b; then echo appended; else echo denied; fi'
s_keep_id() {
    local c a
    for c in P V; do
        $c rm -f kid >/dev/null 2>&1 || true
        $c run --pull never --name kid --userns=keep-id localhost/base sh -c "$KEEPID_SCRIPT" > "$O/$M-kid-$c" || true
        $c commit -q kid localhost/kidc >/dev/null
        $c run --pull never --rm localhost/kidc stat -c '%u:%g %n' /tmp/w /tmp/dd /data/b > "$O/$M-kidc-$c"
        $c rm -f kid
    done
    a=$(grep '^argv ' "$T/log/mount-$M.log" | grep uidmapping= | tail -n 1)
    echo "$a"
    want "podman passes uidmapping=/gidmapping= for keep-id" 'uidmapping=[0-9:]+,gidmapping=[0-9:]+' "$a"
    cat "$O/$M-kid-P"
    same "inside a keep-id container" "$O/$M-kid-V" "$O/$M-kid-P"
    same "owners in the image committed from it" "$O/$M-kidc-V" "$O/$M-kidc-P"
}

SQUASH_SCRIPT='id; stat -c "%u:%g %n" /data /data/b /bin/busybox /tmp; echo w > /tmp/w; stat -c "%u:%g %n" /tmp/w; echo x >> /data/b && cat /data/b'
s_squash() {
    local c a n
    if [ "$M" = rootful ]; then n=200000; else n=5; fi
    for c in P V; do
        $c run --pull never --rm --uidmap "0:$n:1" --gidmap "0:$n:1" localhost/base sh -c "$SQUASH_SCRIPT" > "$O/$M-sq-$c"
    done
    a=$(last_argv)
    echo "$a"
    want "podman passes squash_to_uid/gid" "squash_to_uid=$n,squash_to_gid=$n" "$a"
    cat "$O/$M-sq-P"
    same "inside a single-id-mapped container" "$O/$M-sq-V" "$O/$M-sq-P"
}

s_lifecycle() {
    local up out
    P rm -f lc >/dev/null 2>&1 || true
    P run --pull never -d --name lc localhost/base sleep 600 >/dev/null
    up=$(P inspect lc --format '{{.GraphDriver.Data.UpperDir}}')
    echo "upper: $up"
    out=$(P exec lc sh -c 'echo e > /tmp/e && cat /tmp/e')
    want "exec writes" '^e$' "$out"
    [ -n "$(live_daemons "${up%/diff}/")" ] || { echo "no daemon while running"; return 1; }
    P stop -t 0 lc >/dev/null
    nothing_left_for "$up"
    P start lc >/dev/null
    out=$(P exec lc cat /tmp/e)
    want "file kept across stop/start" '^e$' "$out"
    P rm -f -t 0 lc >/dev/null
    nothing_left_for "$up"
}

s_size_limit() {
    local out
    echo "mount_program_options = size=20M" > "$T/conf/unionfs-size.conf"
    chmod 644 "$T/conf/unionfs-size.conf"
    touch "$T/conf/size-limit.on"
    out=$(P run --pull never --rm localhost/base sh -c \
        'df -k / | tail -n 1; dd if=/dev/zero of=/big bs=1M count=40 2>&1; echo "dd rc=$?"; ls -l /big') || true
    rm -f "$T/conf/size-limit.on"
    echo "$out"
    want "df / in the container shows the 20 MiB limit" ' 20480 ' "$out"
    want "writing past the limit fails with ENOSPC" 'No space left on device' "$out"
    want "what fit was written" '^-.* 2[01][0-9]{6} ' "$out"
}

s_leftovers() {
    local m d
    P rm -af -t 0 >/dev/null
    V rm -af -t 0 >/dev/null
    m=$(mounted_under)
    d=$(live_daemons)
    if [ -n "$m$d" ]; then
        echo "LEFT OVER after rm -af: mounts [$m] daemons [$d]"
        ps -o pid,stat,args -p "${d:-1}" | cut -c1-300 || true
        return 1
    fi
}

s_version() {
    local out
    out=$("$T/bin/mount-program" --version </dev/null)
    echo "$out"
    want "PROG --version prints a version" '[0-9]+\.[0-9]+' "$out"
}

# ---------------------------------------------------------------- run
say "binary $BIN_SRC, podman $(podman --version | awk '{print $3}'), dir $T"
M=any
scenario version s_version
for M in $MODES; do
    P system reset -f >/dev/null 2>&1 || true
    V system reset -f >/dev/null 2>&1 || true
    scenario import s_import
    scenario run-write s_run_write
    scenario build s_build
    scenario image-diff s_image_diff
    scenario rmdir-diff s_rmdir_diff
    scenario ctr-diff s_ctr_diff
    scenario commit s_commit
    scenario image-mount s_image_mount
    [ "$M" = rootless ] && scenario keep-id s_keep_id
    scenario squash s_squash
    scenario lifecycle s_lifecycle
    scenario size-limit s_size_limit
    scenario leftovers s_leftovers
    # How podman called the mount program in this mode (ids and layer names elided).
    say "$M: mount program calls (count, argv shape):"
    sed -n 's/^argv //p' "$T/log/mount-$M.log" |
        sed -E "s#$T#\$T#g; s#/[0-9a-f]{64}/#/<id>/#g; s#/l/[A-Z0-9]{26}#/l/<L>#g; s#(/l/<L>)(:\\\$T[^:,]*/l/<L>)+#\\1:…#g" |
        sort | uniq -c | sort -rn | sed 's/^/    /'
    if grep -q '^stderr ' "$T/log/mount-$M.log"; then
        say "$M: mount program stderr:"
        grep '^stderr ' "$T/log/mount-$M.log" | sort | uniq -c | sed 's/^/    /'
    fi
done

say "took $(($(date +%s) - START))s"
[ "$FAILN" = 0 ] || say "failed: ${FAILED[*]}"
echo "$TAG: $PASS passed, $FAILN failed"
[ "$FAILN" = 0 ]
