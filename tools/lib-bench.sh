# shellcheck shell=bash
# Sourced by the end-to-end benchmarks (quota-bench.sh, copy-bench.sh), run from the repo root:
#
#   bench_setup NAME   build the release binary ($bin), make a scratch dir $base under /var/tmp,
#                      and on exit unmount whatever is still mounted at $base/*/m and remove $base

bench_setup() {
  cargo build --release --quiet
  bin=$PWD/target/release/unionfs-rs
  base=$(mktemp -d "/var/tmp/$1.XXXXXX")
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local m
  for m in "$base"/*/m; do
    grep -qs " $m " /proc/mounts && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
  done
  rm -rf "$base"
}
