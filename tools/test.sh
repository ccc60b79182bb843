#!/usr/bin/env bash
# The project's test command (README): build, cargo test (unit, differential against kernel
# overlayfs, cross-mount, CLI), pjdfstest and fsx against live unionfs-rs mounts.
# Needs root, /dev/fuse, fuse3, attr, acl, and kernel overlayfs (for the reference side).
# Every section runs even if an earlier one failed (except after a failed build); the exit code
# is non-zero if any section failed.
#
# Environment: CARGO_TEST_ARGS (extra arguments after `cargo test`, e.g. a test name),
#   TEST_THREADS (default 2), SKIP_PJDFSTEST=1, SKIP_FSX=1, SKIP_STRESS=1, SKIP_PODMAN=1,
#   FSX_OPS (default 1000000 per fsx run through the daemon, a fifth of that with passthrough;
#   ~18 min side by side here; see tools/fsx.sh), and those of the tools it calls.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}

results=()
failed=0
stage_logs=$(mktemp -d /var/tmp/test-stages.XXXXXX)
declare -A stage_log=()
section() { printf '\n========== %s ==========\n' "$1"; }
record() { # name, exit code, seconds
    if [ "$2" -eq 0 ]; then
        results+=("PASS  $1 ($3 s)")
    else
        results+=("FAIL  $1 ($3 s, exit $2)")
        failed=$((failed + 1))
    fi
}
run() { # name, command...
    local name=$1 start rc
    shift
    section "$name"
    start=$(date +%s)
    stage_log[$name]="$stage_logs/${#stage_log[@]}.log"
    "$@" 2>&1 | tee "${stage_log[$name]}"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $(($(date +%s) - start))
    return "$rc"
}
# What made a stage fail, short enough to sit right above the summary (CI shows the tail).
why() { # name, log file
    [ -s "$2" ] || return 0
    printf -- '--- %s: lines that name a failure ---\n' "$1"
    grep -a -E 'FAIL|panicked|^failures:|^    [a-z_:]+$|^test .* FAILED|error(\[|:)|differs|mismatch|timed out|not ok|BAD|Operation failed' "$2" |
        grep -a -v -E '^PASS|passed, 0 failed' | tail -n 25
    printf -- '--- %s: last lines ---\n' "$1"
    tail -n 8 "$2"
}

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the suite mounts filesystems and compares with kernel overlayfs: run it as root" >&2
    exit 2
fi
run "setup" bash tools/setup-test-deps.sh || { echo "test.sh: setup failed" >&2; exit 1; }
# FUSE over io_uring is off unless root switches the fuse module's enable_uring on (then every
# root mount uses it by default). The stages below run as on a machine where it is off; the
# io_uring stages at the end run them again with it on. The switch is put back at exit.
uring_param=/sys/module/fuse/parameters/enable_uring
uring_was=
if [ -w "$uring_param" ]; then
    uring_was=$(cat "$uring_param")
    trap 'echo "$uring_was" >"$uring_param"' EXIT
    echo N >"$uring_param"
fi
if run "cargo build" cargo build --bins; then
    # shellcheck disable=SC2086
    run "cargo test" cargo test --no-fail-fast ${CARGO_TEST_ARGS:-} -- --test-threads="${TEST_THREADS:-2}"
    export UNIONFS_BIN="$PWD/target/debug/unionfs-rs"
    if [ "${SKIP_PJDFSTEST:-0}" != 1 ]; then
        run "pjdfstest" bash tools/pjdfstest.sh
    fi
    if [ "${SKIP_FSX:-0}" != 1 ]; then
        # Data integrity through the page cache with a budget far below the file (eviction,
        # write-back and throttling all the time), with the cache off, and (as root) with the
        # kernel doing the file I/O itself by FUSE passthrough (our opens, truncates, copy-up
        # and attribute paths around it; a fifth of the operations, its I/O is the kernel's),
        # and with the kernel's write-back cache above ours (as rootless mounts run; a fifth).
        # The runs are independent mounts and mostly wait on each other's CPU-light FUSE round
        # trips: run them side by side, then report each.
        fsx_run() { # name, mount arguments, operations
            env UNIONFS_MOUNT_ARGS="$2" FSX_OPS="$3" \
                FSX_TIMEOUT="${FSX_TIMEOUT:-3600}" bash tools/fsx.sh >"$fsx_logs/$1.log" 2>&1
            echo $? >"$fsx_logs/$1.rc"
        }
        # Installed once here, not by every run at the same time.
        command -v fsx >/dev/null || cargo install fsx --version 0.3.2 --locked ||
            cargo install fsx --version 0.3.2
        map_count=$(cat /proc/sys/vm/max_map_count)
        fsx_logs=$(mktemp -d /var/tmp/fsx-logs.XXXXXX)
        fsx_ops=${FSX_OPS:-1000000}
        section "fsx (page cache 128K, cache off, passthrough, kernel write-back: in parallel)"
        start=$(date +%s)
        fsx_run cache128k "--cache-size 128K --passthrough off" "$fsx_ops" &
        fsx_run nocache "--cache-size 0 --passthrough off" "$fsx_ops" &
        fsx_names="cache128k nocache"
        if [ "$(id -u)" = 0 ]; then
            fsx_run passthrough "" $((fsx_ops / 5)) &
            fsx_names="$fsx_names passthrough"
        fi
        fsx_run writeback "--cache-size 128K --passthrough off --writeback-cache on" \
            $((fsx_ops / 5)) &
        fsx_names="$fsx_names writeback"
        wait
        for n in $fsx_names; do
            printf -- '--- fsx %s ---\n' "$n"
            cat "$fsx_logs/$n.log"
            record "fsx ($n)" "$(cat "$fsx_logs/$n.rc")" $(($(date +%s) - start))
            cp "$fsx_logs/$n.log" "$stage_logs/fsx-$n.log"
            stage_log["fsx ($n)"]="$stage_logs/fsx-$n.log"
        done
        rm -rf "$fsx_logs"
        sysctl -q -w vm.max_map_count="$map_count" || true
    fi
    if [ "${SKIP_STRESS:-0}" != 1 ]; then
        # Random operations from three processes at once (renames of files and directories,
        # exchanges, links, writes, listings, deep walks while ancestors move), then the tree
        # compared with kernel overlayfs over the same upper and after a remount
        # (tools/concurrent-stress.py), with merged directories moving while others work
        # inside them: copied up whole (dir_rename=copy, the `-o lowerdir=` form's default),
        # and with redirects (redirect_dir=on), there with lower files read by passthrough
        # (passthrough=lower: writers wait for readers, none may see a stale file). The first
        # has a quota: the usage it records must be what upper and the work dir hold.
        run "concurrency stress (dir_rename=copy, quota)" python3 tools/concurrent-stress.py \
            --workers 3 --seconds 20 --seed 1 --bin "$UNIONFS_BIN" \
            --mount-opt=-o --mount-opt=dir_rename=copy --mount-opt=--size=4G
        run "concurrency stress (redirect_dir=on, passthrough=lower)" \
            python3 tools/concurrent-stress.py \
            --workers 3 --seconds 20 --seed 2 --bin "$UNIONFS_BIN" \
            --mount-opt=-o --mount-opt=redirect_dir=on,passthrough=lower
    fi
    if [ "${SKIP_PODMAN:-0}" != 1 ]; then
        run "podman e2e" bash tools/podman-e2e.sh "$UNIONFS_BIN"
    fi
    if [ -z "$uring_was" ]; then
        results+=("SKIP  io_uring stages (no writable $uring_param: kernel without FUSE over io_uring)")
    elif [ "${SKIP_URING:-0}" = 1 ]; then
        results+=("SKIP  io_uring stages (SKIP_URING=1)")
    else
        # Everything again with requests through io_uring (root mounts use it by default once
        # the switch is on): the integration tests (the differential ones against kernel
        # overlayfs among them), pjdfstest, fsx through our page cache and by passthrough, and
        # podman (rootful; rootless mounts stay on /dev/fuse, see README). First a check that
        # a default mount really serves through the ring here.
        echo Y >"$uring_param"
        run "io_uring in use" bash -c '
            d=$(mktemp -d /var/tmp/uring-check.XXXXXX) && mkdir "$d/l" "$d/u" "$d/m" &&
            echo x >"$d/l/f" && "$1" mount "$d/l" "$d/u" "$d/m" && cat "$d/m/f" >/dev/null &&
            "$1" stats "$d/m" | tee /dev/stderr | grep -E "uring_requests: [1-9]"; rc=$?
            "$1" umount "$d/m"; rm -rf "$d"; exit $rc' _ "$UNIONFS_BIN"
        # shellcheck disable=SC2086
        run "cargo test (io_uring)" cargo test --no-fail-fast --tests ${CARGO_TEST_ARGS:-} \
            -- --test-threads="${TEST_THREADS:-2}"
        if [ "${SKIP_PJDFSTEST:-0}" != 1 ]; then
            run "pjdfstest (io_uring)" bash tools/pjdfstest.sh
        fi
        if [ "${SKIP_FSX:-0}" != 1 ]; then
            map_count=$(cat /proc/sys/vm/max_map_count)
            run "fsx (io_uring, page cache 128K)" env UNIONFS_MOUNT_ARGS="--cache-size 128K --passthrough off" \
                FSX_OPS=$((${FSX_OPS:-1000000} / 5)) FSX_TIMEOUT="${FSX_TIMEOUT:-3600}" bash tools/fsx.sh
            run "fsx (io_uring, passthrough)" env UNIONFS_MOUNT_ARGS="" \
                FSX_OPS=$((${FSX_OPS:-1000000} / 10)) FSX_TIMEOUT="${FSX_TIMEOUT:-3600}" bash tools/fsx.sh
            sysctl -q -w vm.max_map_count="$map_count" || true
        fi
        if [ "${SKIP_PODMAN:-0}" != 1 ]; then
            run "podman e2e (io_uring)" bash tools/podman-e2e.sh "$UNIONFS_BIN"
        fi
        echo N >"$uring_param"
    fi
fi

if [ "$failed" -gt 0 ]; then
    section "why (failed stages)"
    for r in "${results[@]}"; do
        case "$r" in
        FAIL*)
            n=${r#FAIL  }
            n=${n% (*}
            why "$n" "${stage_log[$n]:-}"
            ;;
        esac
    done
fi
rm -rf "$stage_logs"
section "summary"
printf '%s\n' "${results[@]}"
total=${#results[@]}
skipped=0
for r in "${results[@]}"; do case "$r" in SKIP*) skipped=$((skipped + 1)) ;; esac; done
echo "test.sh: $((total - failed - skipped)) passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
[ "$failed" -eq 0 ]
