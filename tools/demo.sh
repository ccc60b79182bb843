#!/usr/bin/env bash
# Set up everything on a fresh Debian machine and mount a small demo union:
#   two lower layers (one with a whiteout and an opaque directory), an upper, a merged view.
# Usage: bash tools/demo.sh [DIR]        (default DIR: /tmp/unionfs-demo)
# Unmount with: target/release/unionfs-rs umount DIR/merged
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/unionfs-demo}

if ! command -v fusermount3 >/dev/null || ! command -v setfattr >/dev/null; then
  echo "== installing fuse3 and attr"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq fuse3 attr >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq fuse3 attr >/dev/null; fi
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

echo "== building (release)"
cargo build --release --quiet
bin=$PWD/target/release/unionfs-rs

if grep -qs " $dir/merged " /proc/mounts; then "$bin" umount "$dir/merged"; sleep 0.2; fi
rm -rf "$dir"
mkdir -p "$dir"/{lower1,lower2,upper,work,merged}
echo "from lower2" > "$dir/lower2/readme.txt"
echo "shadowed by lower1" > "$dir/lower2/shadowed.txt"
echo "lower1 wins" > "$dir/lower1/shadowed.txt"
mkdir -p "$dir/lower2/etc" "$dir/lower2/cache" "$dir/lower1/cache"
echo "old config" > "$dir/lower2/etc/app.conf"
echo "deleted in lower1" > "$dir/lower2/gone.txt"
echo "hidden by the opaque dir above" > "$dir/lower2/cache/stale"
echo "fresh" > "$dir/lower1/cache/fresh"
if [ "$(id -u)" = 0 ]; then
  mknod "$dir/lower1/gone.txt" c 0 0                               # a whiteout
  setfattr -n trusted.overlay.opaque -v y "$dir/lower1/cache"     # an opaque directory
  opts=()
else
  setfattr -n user.overlay.opaque -v y "$dir/lower1/cache"
  opts=(--userxattr)
fi

"$bin" mount "${opts[@]}" "$dir/lower1:$dir/lower2" "$dir/upper" "$dir/merged" --workdir "$dir/work"
echo "== mounted $dir/merged"
ls -l "$dir/merged" "$dir/merged/cache"
cat <<EOF

Try:  echo new >> $dir/merged/etc/app.conf   (copies the file up into $dir/upper)
      rm $dir/merged/readme.txt              (leaves a whiteout in $dir/upper)
      ls -l $dir/upper
Unmount:  $bin umount $dir/merged
EOF
