#!/usr/bin/env bash
# cp inside the mount (coreutils cp uses copy_file_range): a lower file of SIZE_MIB to a new
# file, then that copy (now in upper) to another, caches dropped before each, `sync` included.
# Targets rotated every round in the same run: kernel overlayfs, fuse-overlayfs (if installed),
# unionfs-rs as root (default options) and with --passthrough off (what a rootless mount gets).
# Prints the median seconds of each and the ratios against kernel overlayfs and fuse-overlayfs.
# Usage: bash tools/copy-bench.sh [ROUNDS] [SIZE_MIB]      (root; builds a release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
mib=${2:-1024}
[ "$(id -u)" = 0 ] || { echo "copy-bench: run as root" >&2; exit 2; }
# shellcheck source=tools/lib-bench.sh
. tools/lib-bench.sh
bench_setup unionfs-cpbench
mkdir -p "$base/lower"
head -c $((mib << 20)) /dev/urandom >"$base/lower/big"
sync

targets=(overlay)
command -v fuse-overlayfs >/dev/null && targets+=(fuse-overlayfs)
targets+=(unionfs-rs unionfs-rs/pt-off)

mount_target() { # $1 target, $2 dir
  local d=$2
  case $1 in
    overlay) mount -t overlay overlay -o "lowerdir=$base/lower,upperdir=$d/u,workdir=$d/w" "$d/m" ;;
    fuse-overlayfs) fuse-overlayfs -o "lowerdir=$base/lower,upperdir=$d/u,workdir=$d/w" "$d/m" ;;
    unionfs-rs) "$bin" mount "$base/lower" "$d/u" "$d/m" --workdir "$d/w" ;;
    unionfs-rs/pt-off) "$bin" mount "$base/lower" "$d/u" "$d/m" --workdir "$d/w" --passthrough off ;;
  esac
}

secs() { # command...: seconds it took, caches dropped before
  sync
  echo 3 >/proc/sys/vm/drop_caches
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  sync
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.3f}')"
}

declare -A lower_s upper_s
for ((r = 0; r < rounds; r++)); do
  for t in "${targets[@]}"; do
    d=$base/${t//\//_}
    rm -rf "$d"
    mkdir -p "$d"/{u,w,m}
    mount_target "$t" "$d"
    a=$(secs cp "$d/m/big" "$d/m/copy1")
    b=$(secs cp "$d/m/copy1" "$d/m/copy2")
    cmp -s "$d/m/big" "$d/m/copy2" || { echo "copy-bench: $t: copy differs" >&2; exit 1; }
    if [ "$t" = overlay ]; then umount "$d/m"; else fusermount3 -u "$d/m"; fi
    lower_s[$t]+="$a "
    upper_s[$t]+="$b "
  done
done

median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
echo "cp of a ${mib} MiB file inside the mount, median of $rounds rounds (seconds, sync included)"
printf '%-20s %12s %12s   %s\n' target "lower->new" "upper->new" samples
for t in "${targets[@]}"; do
  printf '%-20s %12s %12s   %s/ %s\n' "$t" "$(median "${lower_s[$t]}")" "$(median "${upper_s[$t]}")" "${lower_s[$t]}" "${upper_s[$t]}"
done
for ref in overlay fuse-overlayfs; do
  [ -n "${lower_s[$ref]:-}" ] || continue
  for t in unionfs-rs unionfs-rs/pt-off; do
    python3 -c "
l=$(median "${lower_s[$t]}")/$(median "${lower_s[$ref]}"); u=$(median "${upper_s[$t]}")/$(median "${upper_s[$ref]}")
print(f'$t vs $ref: lower->new {l:.2f}x, upper->new {u:.2f}x (time ratio, <1 = faster)')"
  done
done
echo "machine: $(nproc) vCPU, $(uname -r), $(df -T /var/tmp | awk 'NR==2{print $2}') under /var/tmp; $(fuse-overlayfs --version 2>/dev/null | head -1)"
