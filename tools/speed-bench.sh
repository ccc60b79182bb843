#!/usr/bin/env bash
# End-to-end speed comparison: runs the peer harness (../shared/bench/unionbench.sh) against a
# release build of unionfs-rs, kernel overlayfs and fuse-overlayfs in the same run (targets
# rotated every round, medians), and writes the resulting table into README.md between the
# `speed-table` markers.
#
# Usage: tools/speed-bench.sh [--quick] [--runs N] [--no-readme] [-- extra harness arguments]
# Environment: BENCH_DIR (default /var/tmp/ub-bench: the generated layer set is reused while it
#   matches), HARNESS (default ../shared/bench/unionbench.sh), PEERS (default
#   overlay,fuse-overlayfs; add unionfs-fuse,mergerfs if installed).
# Needs root, fuse3, fuse-overlayfs. Takes ~10 min with --quick --runs 3, ~40 min in full.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
harness=${HARNESS:-$root/../shared/bench/unionbench.sh}
bench_dir=${BENCH_DIR:-/var/tmp/ub-bench}
peers=${PEERS:-overlay,fuse-overlayfs}
quick=()
runs=()
readme=1
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) quick=(--quick); shift ;;
    --runs) runs=(--runs "$2"); shift 2 ;;
    --no-readme) readme=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "speed-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
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
python3 "$harness" "${quick[@]}" "${runs[@]}" --bench-dir "$bench_dir" --targets "$peers" \
    --target "unionfs-rs|$bin mount {lowers} {upper} {merged} --workdir {work}|fusermount3 -u {merged}" \
    "${extra[@]}"
latest=$(find "$bench_dir/results" -mindepth 1 -maxdepth 1 -printf "%f\n" | sort | tail -n 1)
if [ -z "$latest" ] || [ "$latest" = "$before" ] || [ ! -s "$bench_dir/results/$latest/table.md" ]; then
    echo "speed-bench: the harness left no new table in $bench_dir/results" >&2
    exit 1
fi
table=$bench_dir/results/$latest/table.md
echo "speed-bench: table in $table"
[ "$readme" = 1 ] || exit 0

# The README gets the header line, the main table and the RSS/noise lines (not the appendix).
section=$(mktemp)
trap 'rm -f "$section"' EXIT
{
    echo "<!-- speed-table:begin (written by tools/speed-bench.sh; edit there, not here) -->"
    echo
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) vCPUs, kernel $(uname -r), unionfs-rs $(git rev-parse --short HEAD), $(fuse-overlayfs --version 2>/dev/null | head -n 1)."
    echo
    awk '/^appendix/ {exit} {print}' "$table"
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
