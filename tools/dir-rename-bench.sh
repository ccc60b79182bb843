#!/usr/bin/env bash
# Time `mv` of a lower directory tree on kernel overlayfs (EXDEV: mv copies and removes),
# fuse-overlayfs (its rename copies the tree up), unionfs-rs in the `-o lowerdir=` form
# (dir_rename=copy: the same) and unionfs-rs with redirect_dir=on (one rename and a redirect).
# Targets rotated every round; medians printed. Run as root.
#
# Usage: tools/dir-rename-bench.sh [BIN] (default target/release/unionfs-rs)
# Environment: ROUNDS (default 5), DIRS (default 100), FILES (per directory, default 20),
#   SIZE (bytes per file, default 4096).
set -euo pipefail
bin=${1:-target/release/unionfs-rs}
rounds=${ROUNDS:-5}
ndirs=${DIRS:-100}
nfiles=${FILES:-20}
size=${SIZE:-4096}
[ "$(id -u)" = 0 ] || { echo "dir-rename-bench: run as root" >&2; exit 2; }
[ -x "$bin" ] || { echo "dir-rename-bench: no binary at $bin (cargo build --release)" >&2; exit 2; }
command -v fuse-overlayfs >/dev/null || { echo "dir-rename-bench: fuse-overlayfs not installed" >&2; exit 2; }
T=$(mktemp -d /var/tmp/dir-rename-bench.XXXXXX)
cleanup() {
    for m in "$T"/*/m; do
        mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    rm -rf "$T"
}
trap cleanup EXIT

mkdir -p "$T/lower/tree"
head -c "$size" /dev/urandom > "$T/blob"
for d in $(seq 1 "$ndirs"); do
    mkdir -p "$T/lower/tree/d$d/sub"
    for f in $(seq 1 "$nfiles"); do cp "$T/blob" "$T/lower/tree/d$d/f$f"; done
    cp "$T/blob" "$T/lower/tree/d$d/sub/g"
done
files=$(find "$T/lower/tree" -type f | wc -l)

mount_target() { # name, dir
    local d=$2
    rm -rf "$d"; mkdir -p "$d/u" "$d/w" "$d/m"
    case $1 in
    kernel) mount -t overlay overlay -o "lowerdir=$T/lower,upperdir=$d/u,workdir=$d/w" "$d/m" ;;
    fuse-overlayfs) fuse-overlayfs -o "lowerdir=$T/lower,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null ;;
    unionfs-rs) "$bin" -o "lowerdir=$T/lower,upperdir=$d/u,workdir=$d/w" "$d/m" ;;
    unionfs-rs-redirect) "$bin" -o "lowerdir=$T/lower,upperdir=$d/u,workdir=$d/w,redirect_dir=on" "$d/m" ;;
    esac
}
targets=(kernel fuse-overlayfs unionfs-rs unionfs-rs-redirect)
declare -A times
for r in $(seq 1 "$rounds"); do
    for i in "${!targets[@]}"; do
        t=${targets[$(((i + r) % ${#targets[@]}))]}
        d=$T/$t
        mount_target "$t" "$d"
        sync
        s=$(date +%s%N)
        mv "$d/m/tree" "$d/m/moved"
        e=$(date +%s%N)
        [ "$(find "$d/m/moved" -type f | wc -l)" = "$files" ] || { echo "$t: wrong tree after mv" >&2; exit 1; }
        times[$t]+="$(((e - s) / 1000000)) "
        umount "$d/m" 2>/dev/null || umount -l "$d/m"
    done
done
echo "mv of a lower tree: $files files of $size bytes in $((ndirs * 2 + 1)) directories, median of $rounds rounds (ms)"
for t in "${targets[@]}"; do
    med=$(tr ' ' '\n' <<<"${times[$t]}" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')
    printf '  %-20s %6s   (%s)\n' "$t" "$med" "${times[$t]% }"
done
