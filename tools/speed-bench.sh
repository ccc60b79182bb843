#!/usr/bin/env bash
# End-to-end speed comparison: runs the peer harness (../shared/bench/unionbench.sh) against a
# release build of unionfs-rs, kernel overlayfs and fuse-overlayfs in the same run (targets
# rotated every round, medians), and writes the resulting table into README.md between the
# `speed-table` markers.
#
# Usage: tools/speed-bench.sh [--quick] [--runs N] [--no-readme] [-- extra harness arguments]
#        tools/speed-bench.sh --from RESULTS_DIR/table.md   (only rewrite the README section)
# Environment: BENCH_DIR (default /var/tmp/ub-bench: the generated layer set is reused while it
#   matches), HARNESS (default ../shared/bench/unionbench.sh), PEERS (default
#   overlay,fuse-overlayfs; add unionfs-fuse,mergerfs if installed).
# Needs root, fuse3, fuse-overlayfs. `--quick --runs 3` took ~5 min here; a full run (5 rounds,
# full sizes) takes several times that.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
harness=${HARNESS:-$root/../shared/bench/unionbench.sh}
bench_dir=${BENCH_DIR:-/var/tmp/ub-bench}
peers=${PEERS:-overlay,fuse-overlayfs}
quick=()
runs=()
readme=1
from=
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) quick=(--quick); shift ;;
    --runs) runs=(--runs "$2"); shift 2 ;;
    --no-readme) readme=0; shift ;;
    --from) from=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "speed-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
fo_version=$(fuse-overlayfs --version 2>/dev/null | grep -m1 '^fuse-overlayfs' || echo "fuse-overlayfs")
if [ -n "$from" ]; then
    [ -s "$from" ] || { echo "speed-bench: no table at $from" >&2; exit 2; }
    table=$from
else
[ "$(id -u)" = 0 ] || { echo "speed-bench: run as root (mounts, drop_caches)" >&2; exit 2; }
[ -f "$harness" ] || { echo "speed-bench: harness not found at $harness (set HARNESS)" >&2; exit 2; }
command -v fuse-overlayfs >/dev/null || {
    echo "speed-bench: fuse-overlayfs is not installed (apt-get install fuse-overlayfs)" >&2
    exit 2
}

cargo build --release --bin unionfs-rs
bin=$root/target/release/unionfs-rs
mkdir -p "$bench_dir"
before=$(find "$bench_dir/results" -mindepth 1 -maxdepth 1 -printf "%f\n" 2>/dev/null | sort | tail -n 1 || true)
# Where the kernel has FUSE over io_uring, it is switched on for the run (put back after):
# `unionfs-rs` then uses it (as root, the default), and `unionfs-rs/dev-fuse` is the same binary
# with `--uring off`, i.e. what a machine without the switch gets. `unionfs-rs/lower` is the
# default mount with `--passthrough lower` (the kernel reads lower files itself; opt-in, see
# README).
targets="$peers,unionfs-rs,unionfs-rs/lower"
devfuse=()
uring_param=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring_param" ]; then
    uring_was=$(cat "$uring_param")
    trap 'echo "$uring_was" >"$uring_param"' EXIT
    echo Y >"$uring_param"
    targets="$targets,unionfs-rs/dev-fuse"
    devfuse=(--target "unionfs-rs/dev-fuse|$bin mount {lowers} {upper} {merged} --workdir {work} --uring off|fusermount3 -u {merged}")
fi
python3 "$harness" "${quick[@]}" "${runs[@]}" --bench-dir "$bench_dir" --targets "$targets" \
    --target "unionfs-rs|$bin mount {lowers} {upper} {merged} --workdir {work}|fusermount3 -u {merged}" \
    --target "unionfs-rs/lower|$bin mount {lowers} {upper} {merged} --workdir {work} --passthrough lower|fusermount3 -u {merged}" \
    "${devfuse[@]}" "${extra[@]}"
if [ -n "${uring_was:-}" ]; then
    echo "$uring_was" >"$uring_param"
    trap - EXIT
fi
latest=$(find "$bench_dir/results" -mindepth 1 -maxdepth 1 -printf "%f\n" | sort | tail -n 1)
if [ -z "$latest" ] || [ "$latest" = "$before" ] || [ ! -s "$bench_dir/results/$latest/table.md" ]; then
    echo "speed-bench: the harness left no new table in $bench_dir/results" >&2
    exit 1
fi
table=$bench_dir/results/$latest/table.md
echo "speed-bench: table in $table"
{ git describe --always --dirty 2>/dev/null || echo "unknown commit"; } >"$bench_dir/results/$latest/unionfs-rs.commit"
# How idle CPUs wait decides what a FUSE round trip costs on a VM (see README, Performance):
# recorded with the table.
idle_driver=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)
halt_poll=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || true)
echo "cpuidle $idle_driver${halt_poll:+ (guest_halt_poll_ns $halt_poll)}" >"$bench_dir/results/$latest/cpuidle.txt"
fi
cpuidle=$(cat "$(dirname "$table")/cpuidle.txt" 2>/dev/null || echo "cpuidle unrecorded")
commit=$(cat "$(dirname "$table")/unionfs-rs.commit" 2>/dev/null || echo "unrecorded commit")
if ! head -n 6 "$table" | grep -q '| unionfs-rs'; then
    echo "speed-bench: the table has no unionfs-rs column (did its mount fail? see the harness log above)" >&2
    exit 1
fi
[ "$readme" = 1 ] || exit 0

# The README gets the header line, the main table and the RSS/noise lines (not the appendix).
section=$(mktemp)
trap 'rm -f "$section"' EXIT
{
    echo "<!-- speed-table:begin (written by tools/speed-bench.sh; edit there, not here) -->"
    echo
    echo "Measured $(date -u -r "$table" +%Y-%m-%d) on $(nproc) vCPUs, kernel $(uname -r), $cpuidle, unionfs-rs $commit, $fo_version."
    echo
    # Pipes inside cells ("(1.00|0.87)", "find|wc") would split them: escape them.
    awk '/^appendix/ {exit} {print}' "$table" |
        sed -E '/^\|[-| ]+\|$/! { /^\|/ { :a; s/([^ \\])\|([^ ])/\1\\|\2/; ta; }; }'
    echo
    echo "<!-- speed-table:end -->"
} >"$section"
python3 - "$root/README.md" "$section" <<'EOF'
import re, sys
readme, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
text = open(readme).read()
pat = re.compile(r"<!-- speed-table:begin.*?<!-- speed-table:end -->", re.S)
if not pat.search(text):
    sys.exit("speed-bench: README.md has no speed-table markers")
open(readme, "w").write(pat.sub(lambda _: section, text, count=1))
EOF
echo "speed-bench: README.md updated"
