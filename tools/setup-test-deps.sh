#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian 12 machine (root): fuse3 (fusermount3,
# mount.fuse3), attr/acl, kmod, util-linux, passwd; load fuse and overlay; create the users
# pjdfstest's configuration names. pjdfstest and fsx (crates.io) are installed by their own
# runners, podman and friends by tools/podman-e2e.sh. Idempotent and quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
for p in fuse3 attr acl kmod util-linux passwd coreutils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup: no /dev/fuse on this machine" >&2; exit 1; }
grep -qw overlay /proc/filesystems || echo "setup: warning: kernel overlayfs not listed in /proc/filesystems" >&2
bash tools/ensure-test-users.sh
