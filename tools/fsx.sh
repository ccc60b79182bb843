#!/usr/bin/env bash
# Run fsx (crates.io: fsx 0.3.2, a Rust port of the classic File System eXerciser) through a
# unionfs-rs mount on files that start in the lower layer and get copied up through the mount.
#
#   phase 1: normal mode on dir/fsxfile (a 200 KiB lower file; fsx opens it O_TRUNC, so the
#            copy-up happens at open), FSX_OPS operations in one fsx run: reads, writes, mapped
#            writes, truncate, fallocate, hole punching, copy_file_range, sendfile, fadvise,
#            fsync, fdatasync, close/reopen, msync invalidation — everything but mapped reads;
#   phase 1m: the same with mapped reads too, on dir/mapfile (a fifth of FSX_OPS, at most
#            200,000): fsx 0.3.2 never unmaps a mapped read, so a run with them slows down as
#            the mappings pile up and dies near vm.max_map_count; phase 1 leaves them out to
#            run a million operations in one process at a steady rate;
#   phase 2: block mode on dir/blockfile (a 256 KiB lower file opened O_RDWR without O_TRUNC, so
#            the copy-up carries the data; fsx keeps the size fixed).
# Before: the lower files read back identically through the mount. After: the merged contents
# are what lands in upper once unmounted, and the lower files are unchanged.
#
# Usage: tools/fsx.sh [--fs unionfs|kernel|native]
# Environment: FSX_OPS (operations in phase 1, default 100000; phase 1m a fifth of that, at
#   most 200000; phase 2 a quarter, at most 100000),
#   FSX_SEED (default 1), FSX_TIMEOUT (seconds per phase, default 1200), UNIONFS_BIN, FS_KEEP=1.
set -euo pipefail
LOG_TAG=fsx
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/lib-mount.sh
. "$here/lib-mount.sh"

kind=unionfs
while [ $# -gt 0 ]; do
    case "$1" in
    --fs) kind=$2; shift 2 ;;
    --fs=*) kind=${1#--fs=}; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) log "unknown argument $1"; exit 2 ;;
    esac
done
ops=${FSX_OPS:-100000}
seed=${FSX_SEED:-1}
tmo=${FSX_TIMEOUT:-1200}

if ! command -v fsx >/dev/null; then
    log "installing fsx from crates.io"
    cargo install fsx --version 0.3.2 --locked || cargo install fsx --version 0.3.2
fi

# fsx 0.3.2 never unmaps its mapped reads: past vm.max_map_count (65530) of them, around
# 500,000 operations with our weights, mmap fails with ENOMEM. Allow enough for the run (the
# leaked mappings share the file's page cache pages). Not lowered again here: another fsx may be
# running beside this one (tools/test.sh puts the old value back after its runs).
map_count_before=$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 0)
map_count_need=$((ops / 5 / 4 + 65536))
if [ "$map_count_before" -gt 0 ] && [ "$map_count_before" -lt "$map_count_need" ]; then
    sysctl -q -w vm.max_map_count="$map_count_need" ||
        log "warning: cannot raise vm.max_map_count to $map_count_need; fsx may fail with ENOMEM"
fi

fs_setup fsx
mkdir -p "$FS_ROOT/lower/dir" "$FS_ROOT/artifacts"
head -c 204800 /dev/urandom >"$FS_ROOT/lower/dir/fsxfile"
head -c 262144 /dev/urandom >"$FS_ROOT/lower/dir/blockfile"
head -c 204800 /dev/urandom >"$FS_ROOT/lower/dir/mapfile"
files="dir/fsxfile dir/mapfile dir/blockfile"
# shellcheck disable=SC2086 # a list of names
lower_sums=$(cd "$FS_ROOT/lower" && md5sum $files)

for mapread in 0 5; do
    conf=$FS_ROOT/fsx.toml
    [ "$mapread" = 0 ] || conf=$FS_ROOT/fsx-map.toml
    cat >"$conf" <<EOF
flen = 262144
[weights]
close_open = 1
read = 10
write = 10
mapread = $mapread
mapwrite = 5
invalidate = 1
truncate = 3
fsync = 0.05
fdatasync = 0.05
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
EOF
done
cat >"$FS_ROOT/fsx-block.toml" <<'EOF'
blockmode = true
nosizechecks = true
[weights]
close_open = 0
truncate = 0
posix_fallocate = 0
read = 10
write = 10
mapread = 5
mapwrite = 5
fsync = 0.05
EOF

fs_mount "$kind"
t=$FS_TARGET
failures=0
passes=0
fail() { log "FAIL: $*"; failures=$((failures + 1)); }

for f in fsxfile mapfile blockfile; do
    if cmp -s "$FS_ROOT/lower/dir/$f" "$t/dir/$f"; then
        passes=$((passes + 1))
    else
        fail "dir/$f does not read back identically through the mount"
    fi
done

run_fsx() { # name, config, file, nops
    local name=$1 conf=$2 file=$3 n=$4 start rc
    start=$(date +%s)
    log "$name: $n operations on $file (seed $seed)"
    set +e
    timeout --kill-after=30 "$tmo" fsx -q -N "$n" -S "$seed" -f "$conf" -P "$FS_ROOT/artifacts" \
        "$file" >"$FS_ROOT/$name.log" 2>&1
    rc=$?
    set -e
    tail -n 3 "$FS_ROOT/$name.log" | sed "s/^/  $name: /" >&2
    if [ $rc -eq 0 ] && grep -q 'All operations completed A-OK' "$FS_ROOT/$name.log"; then
        log "$name: ok in $(($(date +%s) - start)) s"
        passes=$((passes + 1))
    else
        [ $rc -eq 124 ] && log "$name: timed out after $tmo s"
        tail -n 40 "$FS_ROOT/$name.log" >&2
        fail "$name (exit $rc)"
    fi
}

run_fsx phase1 "$FS_ROOT/fsx.toml" "$t/dir/fsxfile" "$ops"
phase1m_ops=$((ops / 5))
[ "$phase1m_ops" -gt 200000 ] && phase1m_ops=200000
run_fsx phase1m "$FS_ROOT/fsx-map.toml" "$t/dir/mapfile" "$phase1m_ops"
phase2_ops=$((ops / 4))
[ "$phase2_ops" -gt 100000 ] && phase2_ops=100000
run_fsx phase2 "$FS_ROOT/fsx-block.toml" "$t/dir/blockfile" "$phase2_ops"

# shellcheck disable=SC2086
merged_sums=$(cd "$t" && md5sum $files)
if [ "$kind" != native ]; then
    fs_umount || fail "unmount / daemon exit"
    # shellcheck disable=SC2086
    upper_sums=$(cd "$FS_ROOT/upper" && md5sum $files) || upper_sums=missing
    if [ "$upper_sums" = "$merged_sums" ]; then
        passes=$((passes + 1))
    else
        fail "upper after unmount differs from what the mount showed: $upper_sums vs $merged_sums"
    fi
    # shellcheck disable=SC2086
    if [ "$(cd "$FS_ROOT/lower" && md5sum $files)" = "$lower_sums" ]; then
        passes=$((passes + 1))
    else
        fail "lower files were modified"
    fi
fi

if [ "$failures" -gt 0 ] && [ -s "$FS_ROOT/daemon.log" ]; then
    log "daemon log (last lines):"
    tail -n 20 "$FS_ROOT/daemon.log" >&2
fi
echo "fsx: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
