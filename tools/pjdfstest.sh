#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite (crates.io: pjdfstest 0.2.2) against a live
# unionfs-rs mount, inside a directory that exists in the lower layer (so the suite works in a
# merged, copied-up directory).
#
# Usage: tools/pjdfstest.sh [--fs unionfs|kernel|native] [TEST_PATTERN...]
#   --fs kernel / native measure the baselines (kernel overlayfs over the same layers; the plain
#   directory filesystem of /var/tmp).
# Environment:
#   PJDFSTEST_BAR      minimum number of passed cases (default 337); below it the script fails
#   PJDFSTEST_CONFIG   configuration file (default: ../shared/conformance/pjdfstest.toml
#                      relative to the repository root)
#   PJDFSTEST_TIMEOUT  seconds before the suite is killed (default 1500)
#   UNIONFS_BIN        binary to mount with (default target/debug/unionfs-rs, built if missing)
#   FS_KEEP=1          keep the temporary directory (logs) after the run
# Prints `pjdfstest: N passed, M failed` and exits non-zero when N < PJDFSTEST_BAR or the suite
# could not run.
set -euo pipefail
LOG_TAG=pjdfstest
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/lib-mount.sh
. "$here/lib-mount.sh"

kind=unionfs
patterns=()
while [ $# -gt 0 ]; do
    case "$1" in
    --fs) kind=$2; shift 2 ;;
    --fs=*) kind=${1#--fs=}; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) patterns+=("$1"); shift ;;
    esac
done

bar=${PJDFSTEST_BAR:-337}
config=${PJDFSTEST_CONFIG:-$here/../../shared/conformance/pjdfstest.toml}
[ -f "$config" ] || { log "configuration not found: $config"; exit 2; }
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

if ! command -v pjdfstest >/dev/null; then
    log "installing pjdfstest from crates.io"
    cargo install pjdfstest --version 0.2.2 --locked ||
        cargo install pjdfstest --version 0.2.2
fi
bash "$here/ensure-test-users.sh"

fs_setup pjdfstest
# A small lower layer; the suite runs inside lower's "pjd" directory.
mkdir -p "$FS_ROOT/lower/pjd/sub" "$FS_ROOT/lower/other"
echo data >"$FS_ROOT/lower/pjd/existing"
echo data >"$FS_ROOT/lower/other/file"
ln -s existing "$FS_ROOT/lower/pjd/link"
fs_mount "$kind"

target="$FS_TARGET/pjd"
out="$FS_ROOT/pjdfstest.log"
log "running pjdfstest in $target (config $config)"
set +e
(cd "$target" && RUST_BACKTRACE=0 timeout --kill-after=30 "${PJDFSTEST_TIMEOUT:-1500}" \
    pjdfstest -c "$config" -p "$target" "${patterns[@]}") >"$out" 2>&1
rc=$?
set -e

summary=$(grep -E '^Summary: ' "$out" | tail -n 1 || true)
if [ -z "$summary" ]; then
    log "no summary from pjdfstest (exit $rc); last output:"
    tail -n 40 "$out" >&2
    echo "pjdfstest: 0 passed, 1 failed"
    exit 1
fi
num() { sed -nE "s/.* ([0-9]+) $1.*/\1/p" <<<"$summary"; }
passed=$(num passed)
failed=$(num failed)
skipped=$(num skipped)

if [ "${failed:-0}" -gt 0 ]; then
    log "failed cases:"
    grep -E 'FAILED$' "$out" | awk '{print "  " $1}' >&2
    grep -A1 -E 'FAILED$' "$out" | grep -vE 'FAILED$|^--$' | sort | uniq -c | sort -rn | head -n 10 |
        sed 's/^/  reason: /' >&2
fi
log "$summary (on $kind; bar $bar)"

echo "pjdfstest: ${passed:-0} passed, ${failed:-0} failed, ${skipped:-0} skipped"
if [ "${passed:-0}" -lt "$bar" ]; then
    log "FAIL: ${passed:-0} passed < bar $bar"
    exit 1
fi
