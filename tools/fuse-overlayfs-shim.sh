#!/usr/bin/env bash
# Harness check (not part of CI): speaks the unionfs-rs CLI but mounts with fuse-overlayfs, so
# the integration tests can be pointed at another FUSE implementation to see that they do find
# differences (fuse-overlayfs writes user.fuseoverlayfs.* xattrs and .wh..wh..opq files into
# upper, does not keep parent mtimes on copy-up, ...):
#   UNIONFS_TEST_BIN=$PWD/tools/fuse-overlayfs-shim.sh cargo test --test differential
#   UNIONFS_BIN=$PWD/tools/fuse-overlayfs-shim.sh bash tools/pjdfstest.sh
# (Differential runs can also compare kernel overlayfs with itself: UNIONFS_DIFF_SELFTEST=1.)
set -u
case "${1:-}" in
--version) echo "fuse-overlayfs-shim 0"; exit 0 ;;
umount) exec fusermount3 -u "$2" ;;
mount)
    shift
    pos=()
    work=""
    extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --workdir) work=$2; shift 2 ;;
        --userxattr) extra+=(-o userxattr); shift ;;
        -f | --foreground) shift ;;
        -o) extra+=(-o "$2"); shift 2 ;;
        *) pos+=("$1"); shift ;;
        esac
    done
    if [ ${#pos[@]} -eq 3 ]; then
        exec fuse-overlayfs -o "lowerdir=${pos[0]},upperdir=${pos[1]},workdir=$work" "${extra[@]}" "${pos[2]}"
    elif [ ${#pos[@]} -eq 2 ]; then
        exec fuse-overlayfs -o "lowerdir=${pos[0]}" "${extra[@]}" "${pos[1]}"
    fi
    echo "usage: $0 mount LOWERS [UPPER] MERGED [--workdir W]" >&2
    exit 2
    ;;
*) exec fuse-overlayfs "$@" ;;
esac
