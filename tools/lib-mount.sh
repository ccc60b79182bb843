# shellcheck shell=bash
# Sourced by tools/pjdfstest.sh and tools/fsx.sh: set up layer directories and mount the
# filesystem under test; always unmount on exit.
#
#   fs_setup NAME      make $FS_ROOT (a fresh dir under /var/tmp) with lower/ upper/ work/ merged/
#   fs_mount KIND      mount $FS_ROOT as KIND = unionfs | kernel | native; sets $FS_TARGET
#                      (the merged dir, or for native a plain directory)
#   fs_umount          unmount (idempotent) and make sure the daemon is gone
#
# Environment: UNIONFS_BIN (default: <repo>/target/debug/unionfs-rs, built if missing),
#   UNIONFS_MOUNT_ARGS (extra arguments for `unionfs-rs mount`, e.g. "--cache-size 128K").

FS_ROOT=""
FS_TARGET=""
FS_KIND=""
FS_MOUNTED=0

_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$_lib_dir")
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '%s: %s\n' "${LOG_TAG:-tools}" "$*" >&2; }

unionfs_bin() {
    local bin="${UNIONFS_BIN:-$REPO_ROOT/target/debug/unionfs-rs}"
    if [ ! -x "$bin" ]; then
        log "building $bin"
        (cd "$REPO_ROOT" && cargo build --quiet --bin unionfs-rs) >&2
    fi
    printf '%s\n' "$bin"
}

fs_setup() {
    FS_ROOT=$(mktemp -d "/var/tmp/$1.XXXXXX")
    chmod 0755 "$FS_ROOT"
    mkdir -p "$FS_ROOT/lower" "$FS_ROOT/upper" "$FS_ROOT/work" "$FS_ROOT/merged"
    trap fs_cleanup EXIT
    trap 'exit 130' INT TERM
}

# Pids of processes whose command line mentions our (unique) merged path.
_daemon_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        if { tr '\0' '\n' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$FS_ROOT/merged"; then
            printf '%s\n' "${p#/proc/}"
        fi
    done
}

fs_mount() {
    FS_KIND=$1
    case "$FS_KIND" in
    unionfs)
        local bin
        bin=$(unionfs_bin)
        # shellcheck disable=SC2086 # UNIONFS_MOUNT_ARGS is a list of extra arguments
        timeout 30 "$bin" mount "$FS_ROOT/lower" "$FS_ROOT/upper" "$FS_ROOT/merged" \
            --workdir "$FS_ROOT/work" --log-file "$FS_ROOT/daemon.log" ${UNIONFS_MOUNT_ARGS:-} \
            >"$FS_ROOT/mount.out" 2>&1 || {
            log "mount failed:"
            cat "$FS_ROOT/mount.out" >&2
            return 1
        }
        FS_MOUNTED=1
        FS_TARGET="$FS_ROOT/merged"
        ;;
    kernel)
        mount -t overlay overlay -o "lowerdir=$FS_ROOT/lower,upperdir=$FS_ROOT/upper,workdir=$FS_ROOT/work,index=off,redirect_dir=off,metacopy=off" \
            "$FS_ROOT/merged"
        FS_MOUNTED=1
        FS_TARGET="$FS_ROOT/merged"
        ;;
    native)
        cp -a "$FS_ROOT/lower/." "$FS_ROOT/upper/"
        FS_TARGET="$FS_ROOT/upper"
        ;;
    *)
        log "unknown filesystem kind: $FS_KIND (unionfs|kernel|native)"
        return 2
        ;;
    esac
    if [ "$FS_MOUNTED" = 1 ] && ! grep -qF " $FS_ROOT/merged " /proc/self/mountinfo; then
        log "nothing mounted at $FS_ROOT/merged"
        return 1
    fi
    log "$FS_KIND mounted, target $FS_TARGET"
}

fs_umount() {
    [ -n "$FS_ROOT" ] || return 0
    if [ "$FS_MOUNTED" = 1 ]; then
        if [ "$FS_KIND" = unionfs ]; then
            # EBUSY right after a test can be a release still in flight: retry before going lazy.
            local tries=0
            until fusermount3 -u "$FS_ROOT/merged" 2>/dev/null; do
                tries=$((tries + 1))
                if [ "$tries" -ge 15 ]; then
                    log "fusermount3 -u keeps failing; detaching lazily"
                    umount -l "$FS_ROOT/merged" 2>/dev/null || true
                    break
                fi
                sleep 0.2
            done
        else
            umount "$FS_ROOT/merged" 2>/dev/null || umount -l "$FS_ROOT/merged" 2>/dev/null || true
        fi
        FS_MOUNTED=0
    fi
    local pids
    local i
    for i in $(seq 1 150); do
        pids=$(_daemon_pids)
        [ -z "$pids" ] && return 0
        sleep 0.2
        [ "$i" -lt 10 ] && continue
        # Gone from our mount table but the daemon lives on: a copy of the mount is held in
        # another mount namespace (e.g. a rootless podman started meanwhile). Ask it to stop.
        if [ "$FS_KIND" = unionfs ] && ! grep -qF " $FS_ROOT/merged " /proc/self/mountinfo &&
            [ "${_termed:-}" != "$pids" ]; then
            log "mount gone here but daemon $pids still serving (mount copied into another namespace?): SIGTERM"
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            _termed=$pids
        fi
    done
    log "daemon still running 30 s after unmount, killing: $pids ($(ps -o pid,stat,etime,args -p "${pids//$'\n'/,}" 2>/dev/null | tail -n +2))"
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    return 1
}

fs_cleanup() {
    local rc=$?
    fs_umount || true
    if [ "${FS_KEEP:-0}" = 1 ]; then
        log "keeping $FS_ROOT"
    elif [ -n "$FS_ROOT" ] && ! grep -qF " $FS_ROOT/" /proc/self/mountinfo; then
        rm -rf "$FS_ROOT"
    fi
    exit "$rc"
}
