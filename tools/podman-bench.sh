#!/usr/bin/env bash
# Benchmark: wall time of `podman run --rm` workloads on Debian's podman 4.3, rootful and rootless,
# with three storage setups measured in the same run (order rotated every round):
#
#   unionfs-rs       overlay driver, mount_program = unionfs-rs
#   fuse-overlayfs   overlay driver, mount_program = fuse-overlayfs
#   kernel overlay   overlay driver, no mount_program (rootless: native overlay in the user
#                    namespace; if podman refuses it, the column says so)
#
# Workloads (each one `podman run --rm --pull never IMAGE …`, timed from start to exit):
#   startup      busybox image, `true`
#   smallfiles   busybox image, one `sh -c`: N (default 2000) small files created (`echo > f$i`),
#                then read (`read l < f$i`), then deleted (one `rm`), in the container's rootfs
#   bigread      debootstrap --variant=minbase bookworm image (+ busybox-static at /bin/busybox),
#                `sh -c 'find / -xdev -type f -exec cat {} + > /dev/null'`; falls back to a
#                synthetic image (~10k files / ~200 MB copied from /usr) when debootstrap fails
#
# Before measuring, every mode × setup imports both images, checks the container's / has the
# expected file system type (fuse.unionfs-rs / fuse.fuse-overlayfs / overlay), counts the files
# and bytes the bigread workload sees (must agree across setups) and runs each workload once
# untimed (warm-up; the page cache stays warm, nothing is dropped between runs).
# The in-container time of smallfiles (per phase) and bigread is read from /proc/uptime (10 ms).
#
# Prints markdown tables of medians, plus leftovers (mounts, daemons) and the stderr podman
# reported. Exits 1 if a run failed or something was left over.
#
# Usage: tools/podman-bench.sh [/path/to/unionfs-rs]     (as root)
# Environment: UNIONFS_BIN (binary when no argument; default /opt/unionfs-pbench/unionfs-rs, else
#   <repo>/target/release/unionfs-rs), PBENCH_ROUNDS (default 5), PBENCH_MODES (default
#   "rootful rootless"), PBENCH_NFILES (default 2000), PBENCH_USER (rootless user, default
#   podtest), PBENCH_CACHE (where the debootstrap tree is kept, default /opt/unionfs-pbench),
#   PBENCH_SYNTHETIC=1 (skip debootstrap, use the synthetic image), PBENCH_TIMEOUT (seconds per
#   podman command, default 300), PBENCH_KEEP=1 (keep the temp dir; storage is reset anyway),
#   PBENCH_WORKLOADS (default "startup smallfiles bigread": which to time).
#
# Setup follows tools/podman-e2e.sh (see shared/podman/README.md): runc, cgroupfs, file events,
# netns none, rootful ulimits the VM can grant, /dev/fuse 0666 for rootless (restored on exit).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
TAG=podman-bench
say() { printf '%s: %s\n' "$TAG" "$*" >&2; }
die() { say "error: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root"

# A daemon that outlives its run must not hold our caller's pipes open.
for fd in "/proc/$$/fd/"*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

BIN_SRC=${1:-${UNIONFS_BIN:-}}
if [ -z "$BIN_SRC" ]; then
    if [ -x /opt/unionfs-pbench/unionfs-rs ]; then BIN_SRC=/opt/unionfs-pbench/unionfs-rs
    else BIN_SRC=$repo/target/release/unionfs-rs; fi
fi
[ -x "$BIN_SRC" ] || die "no executable unionfs-rs at $BIN_SRC"
ROUNDS=${PBENCH_ROUNDS:-5}
MODES=${PBENCH_MODES:-rootful rootless}
NFILES=${PBENCH_NFILES:-2000}
USR=${PBENCH_USER:-podtest}
CACHE=${PBENCH_CACHE:-/opt/unionfs-pbench}
TMO=${PBENCH_TIMEOUT:-300}
SETUPS=(ufs fov kov)
declare -A NAME=([ufs]=unionfs-rs [fov]=fuse-overlayfs [kov]="kernel overlay")
declare -A WANT_FS=([ufs]=fuse.unionfs-rs [fov]=fuse.fuse-overlayfs [kov]=overlay)
read -r -a WORKLOADS <<<"${PBENCH_WORKLOADS:-startup smallfiles bigread}"
for wl in "${WORKLOADS[@]}"; do
    case $wl in startup | smallfiles | bigread) ;; *) die "unknown workload $wl in PBENCH_WORKLOADS" ;; esac
done
START=$(date +%s)

# ---------------------------------------------------------------- packages, user, /dev/fuse
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v fuse-overlayfs >/dev/null || need+=(fuse-overlayfs)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v timeout >/dev/null || need+=(coreutils)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
[ "${PBENCH_SYNTHETIC:-0}" = 1 ] || command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
FOV_BIN=$(command -v fuse-overlayfs)
if [[ " $MODES " == *" rootless "* ]]; then
    id "$USR" >/dev/null 2>&1 || { say "creating user $USR"; useradd -m "$USR"; }
    grep -q "^$USR:" /etc/subuid || usermod --add-subuids 300000-365535 "$USR"
    grep -q "^$USR:" /etc/subgid || usermod --add-subgids 300000-365535 "$USR"
    UHOME=$(getent passwd "$USR" | cut -d: -f6)
fi

# Short on purpose: podman 4.3's `container cleanup` (the exit command conmon runs when a container
# exits) refuses a runroot longer than 50 characters ("the specified runroot is longer than 50
# characters"); rootless runroot is $XDG_RUNTIME_DIR/containers = $T/rootless/SETUP/xdg/containers.
# Without the cleanup, every rootless `podman run --rm` waits 20 s for the exit code.
T=$(mktemp -d /tmp/pbench.XXXXXX)
chmod 755 "$T"
[ ${#T} -le 22 ] || die "temp dir name $T too long for podman's 50-character runroot limit"
FUSE_MODE=$(stat -c %a /dev/fuse)

# ---------------------------------------------------------------- cleanup on every path
# pod MODE SETUP ARGS…: podman on that mode's storage for that setup.
pod() {
    local mode=$1 s=$2
    shift 2
    local env=(CONTAINERS_CONF="$T/conf/containers-$mode-$s.conf"
        CONTAINERS_STORAGE_CONF="$T/conf/storage-$mode-$s.conf")
    if [ "$mode" = rootful ]; then
        timeout -k 10 "$TMO" env "${env[@]}" podman "$@" </dev/null
    else
        timeout -k 10 "$TMO" runuser -u "$USR" -- env -i \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME="$UHOME" USER="$USR" LOGNAME="$USR" XDG_RUNTIME_DIR="$T/rootless/$s/xdg" \
            "${env[@]}" podman "$@" </dev/null
    fi
}
# pids of live (non-zombie) FUSE daemons of ours: unionfs-rs runs as our private copy of the
# binary; fuse-overlayfs is recognised by a path under $T in its arguments.
live_daemons() { # [ufs|fov]
    ps -eo pid=,stat=,args= | awk -v b="$T/bin/unionfs-rs" -v f="$FOV_BIN" -v t="$T/" -v w="${1:-}" '
        $2 ~ /^Z/ { next }
        (w == "" || w == "ufs") && $3 == b { print $1; next }
        (w == "" || w == "fov") && ($3 == f || $3 == "fuse-overlayfs") && index($0, t) { print $1 }'
}
fuse_mounts_under() { # MODE SETUP: fuse/overlay mounts under $T in the mode's mount namespace
    if [ "$1" = rootful ]; then
        awk -v t="$T/" '($3 ~ /^fuse/ || $3 == "overlay") && index($2, t) == 1 { print $3, $2 }' /proc/mounts
    else
        pod "$1" "$2" unshare cat /proc/mounts 2>/dev/null |
            awk -v t="$T/" '($3 ~ /^fuse/ || $3 == "overlay") && index($2, t) == 1 { print $3, $2 }'
    fi
}

cleanup() {
    local rc=$? mode s m p
    set +e
    trap - EXIT INT TERM
    for mode in $MODES; do
        for s in "${SETUPS[@]}"; do
            [ -f "$T/conf/storage-$mode-$s.conf" ] || continue
            pod "$mode" "$s" rm -af -t 0 >/dev/null 2>&1
            [ "$mode" = rootful ] && pod "$mode" "$s" image unmount -a -f >/dev/null 2>&1
            pod "$mode" "$s" system reset -f >/dev/null 2>&1
            if [ "$mode" = rootless ]; then
                p=$(cat "$T/rootless/$s/xdg/libpod/tmp/pause.pid" 2>/dev/null)
                [ -n "$p" ] && kill "$p" 2>/dev/null
            fi
        done
    done
    # Mounts left under our dir (deepest first): FUSE and overlay mounts, and the private bind
    # mount rootful podman puts on <graphroot>/overlay.
    awk -v t="$T/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    for p in $(live_daemons); do kill "$p" 2>/dev/null; done
    chmod "$FUSE_MODE" /dev/fuse 2>/dev/null
    if [ "${PBENCH_KEEP:-0}" = 1 ]; then say "kept $T"; else rm -rf "$T"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- binary, images
mkdir -p "$T/bin" "$T/runs" "$T/setup"
install -m 755 "$BIN_SRC" "$T/bin/unionfs-rs"
# the commit the binary was built from: BIN.rev beside a frozen copy, else the checkout's HEAD
if [ -f "$BIN_SRC.rev" ]; then REV="built from $(cat "$BIN_SRC.rev")"
else REV="checkout at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"; fi

# small image: busybox-static root filesystem
R=$T/rootfs
mkdir -p "$R"/{bin,etc,root,tmp}
cp /bin/busybox "$R/bin/busybox"
for c in $("$R/bin/busybox" --list); do [ "$c" = busybox ] || ln -sf busybox "$R/bin/$c"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
chmod 1777 "$R/tmp"
tar -C "$R" -cf "$T/bb.tar" .

# large image: debootstrap minbase (kept in $CACHE between runs), or a synthetic fallback;
# not built when bigread is not timed
want() { [[ " ${WORKLOADS[*]} " == *" $1 "* ]]; }
BIG_KIND=
BIG_ROOT=$CACHE/minbase-root
if ! want bigread; then
    cp "$T/bb.tar" "$T/big.tar"
    BIG_KIND="(not timed)"
elif [ "${PBENCH_SYNTHETIC:-0}" != 1 ]; then
    if [ ! -x "$BIG_ROOT/usr/bin/dpkg" ]; then
        say "debootstrap --variant=minbase bookworm $BIG_ROOT"
        rm -rf "$BIG_ROOT"
        mkdir -p "$CACHE"
        if debootstrap --variant=minbase bookworm "$BIG_ROOT" http://deb.debian.org/debian \
            > "$T/setup/debootstrap.log" 2>&1; then :; else
            say "debootstrap failed (tail of its log follows); using the synthetic image"
            tail -n 5 "$T/setup/debootstrap.log" >&2
            rm -rf "$BIG_ROOT"
        fi
    fi
    if [ -x "$BIG_ROOT/usr/bin/dpkg" ]; then
        cp /bin/busybox "$BIG_ROOT/usr/bin/busybox"
        # no device nodes (rootless import cannot mknod); everything else as debootstrap left it
        tar -C "$BIG_ROOT" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
            -cf "$T/big.tar" .
        BIG_KIND="debootstrap --variant=minbase bookworm (+ busybox-static)"
    fi
fi
if [ -z "$BIG_KIND" ]; then
    S=$T/synthetic
    cp -a "$R" "$S"
    mkdir -p "$S/data"
    # regular files from /usr, at most 1 MiB each, until ~10k files / ~200 MB
    find /usr -xdev -type f -size -1024k -printf '%s %p\n' | awk '
        { n++; b += $1; print substr($0, index($0, " ") + 1); if (n >= 10000 || b >= 200e6) exit }' \
        > "$T/setup/synthetic.list"
    tar -C / -cf - --no-recursion -T <(sed 's#^/##' "$T/setup/synthetic.list") | tar -C "$S/data" -xf -
    tar -C "$S" -cf "$T/big.tar" .
    BIG_KIND="synthetic: $(wc -l < "$T/setup/synthetic.list") files from /usr (debootstrap unavailable)"
fi
chmod 644 "$T/bb.tar" "$T/big.tar"
say "big image: $BIG_KIND, tar $(du -m "$T/big.tar" | cut -f1) MiB"

# ---------------------------------------------------------------- configs
mkdir -p "$T/conf"
for mode in $MODES; do
    for s in "${SETUPS[@]}"; do
        base=$T/$mode/$s
        mkdir -p "$base"
        {
            echo '[storage]'
            echo 'driver = "overlay"'
            echo "graphroot = \"$base/storage\""
            [ "$mode" = rootless ] && echo "rootless_storage_path = \"$base/storage\""
            echo "runroot = \"$base/run\""
            case $s in
                ufs) printf '[storage.options.overlay]\nmount_program = "%s"\n' "$T/bin/unionfs-rs" ;;
                fov) printf '[storage.options.overlay]\nmount_program = "%s"\n' "$FOV_BIN" ;;
                kov) : ;; # native overlay: no mount_program
            esac
        } > "$T/conf/storage-$mode-$s.conf"
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
        } > "$T/conf/containers-$mode-$s.conf"
        if [ "$mode" = rootless ]; then
            mkdir -p "$base/xdg"
            chown -R "$USR:" "$T/rootless"
            chmod 700 "$base/xdg"
        fi
    done
done
if [[ " $MODES " == *" rootless "* ]]; then chmod 0666 /dev/fuse; fi

# ---------------------------------------------------------------- workloads
# Each prints "inner T0 T1 …" (/proc/uptime stamps); smallfiles also "n=<files read>".
# shellcheck disable=SC2016
SMALL='read a _ < /proc/uptime; mkdir /w; cd /w; i=0
while [ $i -lt '"$NFILES"' ]; do echo "file $i" > f$i; i=$((i+1)); done
read b _ < /proc/uptime; i=0; n=0
while [ $i -lt '"$NFILES"' ]; do read l < f$i && n=$((n+1)); i=$((i+1)); done
read c _ < /proc/uptime; rm -f /w/f*; cd /; rmdir /w
read d _ < /proc/uptime; echo "inner $a $b $c $d"; echo "n=$n"; [ $n = '"$NFILES"' ]'
# shellcheck disable=SC2016
BIG='read a _ < /proc/uptime; find / -xdev -type f -exec cat {} + > /dev/null; r=$?
read b _ < /proc/uptime; echo "inner $a $b"; exit $r'
# shellcheck disable=SC2016
BIGCOUNT='echo "files=$(find / -xdev -type f | wc -l) bytes=$(find / -xdev -type f -exec cat {} + | wc -c)"'
wl_args() { # WORKLOAD -> podman run arguments after `run --rm --pull never`, NUL-separated
    case $1 in
        startup) printf '%s\0' localhost/bb true ;;
        smallfiles) printf '%s\0' localhost/bb sh -c "$SMALL" ;;
        bigread) printf '%s\0' localhost/big sh -c "$BIG" ;;
    esac
}

declare -A AVAIL FSTYPE COUNTS
note() { echo "$*" >> "$T/notes"; say "$*"; }
: > "$T/notes"

# ---------------------------------------------------------------- per mode × setup preparation
for mode in $MODES; do
    for s in "${SETUPS[@]}"; do
        k=$mode-$s
        log=$T/setup/$k.log
        pod "$mode" "$s" system reset -f >/dev/null 2>&1 || true
        say "prepare $mode ${NAME[$s]} ($(($(date +%s) - START))s elapsed)"
        t0=$(date +%s)
        if ! { pod "$mode" "$s" import -q "$T/bb.tar" localhost/bb &&
            pod "$mode" "$s" import -q "$T/big.tar" localhost/big; } >"$log" 2>&1; then
            AVAIL[$k]="import failed: $(tail -n 1 "$log")"
            note "$mode ${NAME[$s]}: ${AVAIL[$k]}"
            continue
        fi
        if ! out=$(pod "$mode" "$s" run --rm --pull never localhost/bb grep ' / ' /proc/mounts 2>>"$log"); then
            AVAIL[$k]="podman run failed: $(tail -n 1 "$log")"
            note "$mode ${NAME[$s]}: ${AVAIL[$k]}"
            continue
        fi
        FSTYPE[$k]=$(awk '$2 == "/" { t = $3 } END { print t }' <<<"$out")
        if [ "${FSTYPE[$k]}" != "${WANT_FS[$s]}" ]; then
            AVAIL[$k]="container / is '${FSTYPE[$k]}', not ${WANT_FS[$s]}"
            note "$mode ${NAME[$s]}: ${AVAIL[$k]}"
            continue
        fi
        t1=$(date +%s)
        if want bigread; then
            COUNTS[$k]=$(pod "$mode" "$s" run --rm --pull never localhost/big sh -c "$BIGCOUNT" 2>>"$log") ||
                note "$mode ${NAME[$s]}: counting run failed: $(tail -n 1 "$log")"
        fi
        # warm-up of smallfiles (bigread was just read twice by the counting run)
        if want smallfiles; then
            mapfile -d "" -t a < <(wl_args smallfiles)
            pod "$mode" "$s" run --rm --pull never "${a[@]}" >>"$log" 2>&1 ||
                note "$mode ${NAME[$s]}: warm-up smallfiles failed: $(tail -n 1 "$log")"
        fi
        AVAIL[$k]=ok
        say "  / is ${FSTYPE[$k]}; bigread image ${COUNTS[$k]:-not counted}; import $((t1 - t0))s, count+warm-up $(($(date +%s) - t1))s"
    done
done

# ---------------------------------------------------------------- measurement
RES=$T/results.tsv
: > "$RES"
run_timed() { # MODE SETUP WORKLOAD ROUND
    local mode=$1 s=$2 wl=$3 r=$4 f t0 t1 rc=0 inner a
    f=$T/runs/$mode-$s-$wl-$r
    mapfile -d "" -t a < <(wl_args "$wl")
    t0=$(date +%s%N)
    pod "$mode" "$s" run --rm --pull never "${a[@]}" >"$f.out" 2>"$f.err" || rc=$?
    t1=$(date +%s%N)
    inner=$(awk '/^inner / { s = ""; for (i = 3; i <= NF; i++) s = s sprintf("%s%.2f", i > 3 ? "," : "", $i - $(i - 1)); print s }' "$f.out")
    printf '%s\t%s\t%s\t%s\t%.3f\t%s\t%s\n' "$mode" "$wl" "$s" "$r" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a) / 1e9 }')" "${inner:--}" "$rc" >> "$RES"
    say "  $mode ${NAME[$s]} $wl: $(tail -n 1 "$RES" | cut -f5)s (inner ${inner:--}) rc=$rc"
    [ "$rc" = 0 ] || note "FAILED run: $mode ${NAME[$s]} $wl round $r exit $rc: $(tail -n 1 "$f.err")"
}
for r in $(seq 1 "$ROUNDS"); do
    order=()
    for i in 0 1 2; do order+=("${SETUPS[$(((i + r - 1) % 3))]}"); done
    say "round $r/$ROUNDS, order: ${order[*]} ($(($(date +%s) - START))s elapsed)"
    for mode in $MODES; do
        for wl in "${WORKLOADS[@]}"; do
            for s in "${order[@]}"; do
                [ "${AVAIL[$mode-$s]}" = ok ] && run_timed "$mode" "$s" "$wl" "$r"
            done
        done
        # no daemon of ours should be alive between runs
        for s in ufs fov; do
            d=$(live_daemons "$s" | tr '\n' ' ')
            [ -z "$d" ] || note "round $r $mode: ${NAME[$s]} daemons alive after --rm runs: $d"
        done
    done
done

# ---------------------------------------------------------------- leftovers, stderr
LEFT=0
for mode in $MODES; do
    for s in "${SETUPS[@]}"; do
        [ "${AVAIL[$mode-$s]}" = ok ] || continue
        pod "$mode" "$s" rm -af -t 0 >/dev/null 2>&1 || true
        m=$(fuse_mounts_under "$mode" "$s" | grep -F " $T/$mode/$s/" || true)
        if [ -n "$m" ]; then
            LEFT=1
            note "$mode ${NAME[$s]}: mounts left after rm -af: $(tr '\n' ';' <<<"$m")"
        fi
    done
done
for s in ufs fov; do
    d=$(live_daemons "$s" | tr '\n' ' ')
    if [ -n "$d" ]; then LEFT=1; note "${NAME[$s]} daemons alive at the end: $d"; fi
done

# ---------------------------------------------------------------- report
med() { # MODE WORKLOAD SETUP FIELD(5 = wall, 6 = inner) [PHASE of inner] -> median or -
    awk -F'\t' -v m="$1" -v w="$2" -v s="$3" -v f="$4" -v p="${5:-1}" '
        $1 == m && $2 == w && $3 == s && $7 == 0 {
            v = $f; if (f == 6) { split(v, x, ","); v = x[p] }
            if (v != "" && v != "-") print v + 0 }' "$RES" | sort -g |
        awk '{ a[++n] = $1 }
            END {
                if (n == 0) { print "-"; exit }
                printf "%.3f\n", (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f\n", a / b }'; }
cell() { # MODE SETUP VALUE
    local k=$1-$2
    if [ "${AVAIL[$k]:-}" = ok ]; then echo "$3"; else echo "n/a (${AVAIL[$k]%%:*})"; fi
}

CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "Machine: $(uname -sr), $(nproc) vCPU ($CPU), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM;" \
    "podman $(podman --version | awk '{print $3}'), $(runc --version | head -n 1), fuse-overlayfs $("$FOV_BIN" --version 2>/dev/null | awk '/^fuse-overlayfs/ { print $3 }')," \
    "$("$T/bin/unionfs-rs" --version) ($REV); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "podman run --rm wall time in seconds, median of $ROUNDS rounds (setup order rotated each round; page cache warm)."
echo "smallfiles = $NFILES files; bigread = $BIG_KIND."
echo
echo "| workload | mode | unionfs-rs | fuse-overlayfs | kernel overlay | unionfs-rs/fuse-overlayfs | unionfs-rs/overlay |"
echo "|---|---|---:|---:|---:|---:|---:|"
for wl in "${WORKLOADS[@]}"; do
    for mode in $MODES; do
        u=$(med "$mode" "$wl" ufs 5); f=$(med "$mode" "$wl" fov 5); o=$(med "$mode" "$wl" kov 5)
        echo "| $wl | $mode | $(cell "$mode" ufs "$u") | $(cell "$mode" fov "$f") | $(cell "$mode" kov "$o") | $(ratio "$u" "$f") | $(ratio "$u" "$o") |"
    done
done
if want smallfiles || want bigread; then
echo
echo "In-container time (s, median; from /proc/uptime, 10 ms resolution):"
echo
echo "| phase | mode | unionfs-rs | fuse-overlayfs | kernel overlay | unionfs-rs/fuse-overlayfs | unionfs-rs/overlay |"
echo "|---|---|---:|---:|---:|---:|---:|"
for ph in "smallfiles 1 create" "smallfiles 2 read" "smallfiles 3 delete" "bigread 1 find+cat"; do
    read -r wl p label <<<"$ph"
    want "$wl" || continue
    for mode in $MODES; do
        u=$(med "$mode" "$wl" ufs 6 "$p"); f=$(med "$mode" "$wl" fov 6 "$p"); o=$(med "$mode" "$wl" kov 6 "$p")
        echo "| $wl $label | $mode | $(cell "$mode" ufs "$u") | $(cell "$mode" fov "$f") | $(cell "$mode" kov "$o") | $(ratio "$u" "$f") | $(ratio "$u" "$o") |"
    done
done
fi
echo
echo "Checks:"
for mode in $MODES; do
    for s in "${SETUPS[@]}"; do
        k=$mode-$s
        if [ "${AVAIL[$k]:-}" = ok ]; then
            echo "- $mode ${NAME[$s]}: / is ${FSTYPE[$k]}; bigread image ${COUNTS[$k]:-?}; successful runs: $(awk -F'\t' -v m="$mode" -v s="$s" '$1 == m && $3 == s && $7 == 0' "$RES" | wc -l)/$(awk -F'\t' -v m="$mode" -v s="$s" '$1 == m && $3 == s' "$RES" | wc -l)"
        else
            echo "- $mode ${NAME[$s]}: NOT MEASURED: ${AVAIL[$k]:-not prepared}"
        fi
    done
done
for mode in $MODES; do
    for s in "${SETUPS[@]}"; do
        e=$(cat "$T/runs/$mode-$s"-*.err 2>/dev/null | sort | uniq -c | sort -rn | head -n 5)
        [ -z "$e" ] || { echo "- stderr of $mode ${NAME[$s]} runs (count, line):"; sed 's/^/      /' <<<"$e"; }
    done
done
if [ -s "$T/notes" ]; then echo "Notes:"; sed 's/^/- /' "$T/notes"; fi
[ "$LEFT" = 0 ] && echo "- no mounts or daemons left after the runs"
FAILED=$(awk -F'\t' '$7 != 0' "$RES" | wc -l)
echo "$TAG: $(wc -l < "$RES") timed runs, $FAILED failed, took $(($(date +%s) - START))s"
[ "$FAILED" = 0 ] && [ "$LEFT" = 0 ]
