#!/usr/bin/env bash
# Which FUSE requests a command costs, and how long the daemon took to answer each kind: runs
# COMMAND while perf records the kernel's fuse:fuse_request_send / fuse_request_end tracepoints
# (kernel 6.14+), then prints on stderr, per opcode, the number of requests, the average, the
# longest and the total time from send to answer. This is how the waits behind `mv` (GETATTRs of directories waiting
# for background commits) and the GETATTR after every unlink of `rm -rf` were found.
#
# Usage: tools/fuse-trace.sh [--mount MERGED] [--keep FILE] -- COMMAND [ARGS...]
#   --mount MERGED  count only the requests of that FUSE mount (default: every FUSE mount)
#   --keep FILE     keep perf's recording in FILE (default: a temporary file, removed)
# Needs root and perf (Debian: linux-perf).
set -euo pipefail
mount_dir=
keep=
while [ $# -gt 0 ]; do
    case "$1" in
    --mount) mount_dir=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "fuse-trace: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "fuse-trace: no command given (see --help)" >&2; exit 2; }
command -v perf >/dev/null || { echo "fuse-trace: perf not found (apt-get install linux-perf)" >&2; exit 2; }
perf list 2>/dev/null | grep 'fuse:fuse_request_send' >/dev/null ||
    { echo "fuse-trace: this kernel has no fuse:fuse_request_* tracepoints (6.14+)" >&2; exit 2; }
conn=
if [ -n "$mount_dir" ]; then
    case "$(findmnt -n -o FSTYPE -M "$mount_dir" 2>/dev/null)" in
    fuse | fuse.* | fuseblk) ;;
    *) echo "fuse-trace: $mount_dir is not a FUSE mount point" >&2; exit 2 ;;
    esac
    # The connection id is the minor number of the mount's device (glibc's dev_t layout).
    dev=$(stat -c %d "$mount_dir")
    conn=$(( (dev & 0xff) | ((dev >> 12) & 0xfffff00) ))
fi
data=${keep:-$(mktemp /tmp/fuse-trace.XXXXXX)}
cleanup() { [ -n "$keep" ] || rm -f "$data"; }
trap cleanup EXIT
status=0
perf record -q -a -e fuse:fuse_request_send -e fuse:fuse_request_end -o "$data" -- "$@" || status=$?
perf script -i "$data" 2>/dev/null | awk -v conn="$conn" '
    # ... fuse:fuse_request_send: connection C req R opcode N (NAME) len L
    # ... fuse:fuse_request_end: connection C req R len L error E
    {
        t = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1); break }
        c = ""; r = ""
        for (i = 1; i < NF; i++) { if ($i == "connection") c = $(i + 1); if ($i == "req") r = $(i + 1) }
        if (t == "" || r == "" || (conn != "" && c != conn)) next
        if ($0 ~ /fuse_request_send/) {
            op = ""; for (i = 1; i <= NF; i++) if ($i ~ /^\(FUSE_/) { op = $i; gsub(/[()]/, "", op) }
            sent[c " " r] = t; name[c " " r] = op
        } else if ((c " " r) in sent) {
            k = c " " r; o = name[k]; d = (t - sent[k]) * 1e6
            n[o]++; sum[o] += d; if (d > max[o]) max[o] = d
            delete sent[k]
        }
    }
    END {
        printf "%-22s %8s %10s %10s %11s\n", "request", "count", "avg us", "max us", "total ms"
        for (o in n) printf "%-22s %8d %10.0f %10.0f %11.1f\n", o, n[o], sum[o] / n[o], max[o], sum[o] / 1000 | "sort -k5 -n -r"
        for (k in sent) u++
        if (u) printf "(%d requests not answered while recording)\n", u
    }' >&2
exit $status
