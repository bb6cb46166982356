#!/usr/bin/env bash
# Try s3cachefs on this machine: a local S3 server (SeaweedFS) with a bucket `media`, mounted with a
# disk cache. Everything lives in one directory and listens on 127.0.0.1 only.
#
#   scripts/demo.sh            # install, start SeaweedFS, mount; prints what to do next
#   scripts/demo.sh objects    # list the objects in the bucket (to watch the write-through)
#   scripts/demo.sh stop       # unmount and stop SeaweedFS (the data stays in the demo directory)
#
# Environment: S3CACHEFS_DEMO_DIR (default: a new /tmp/s3cachefs-demo.XXXXXXXX, made once and kept
# for later runs), S3CACHEFS_VENV (default ./.venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${S3CACHEFS_VENV:-$REPO/.venv}
BUCKET=media
ENDPOINT=http://127.0.0.1:8333

# Where the path of the default demo directory is kept, so that `stop` and the next start find it.
# Only we can write there (/run is root's; XDG_RUNTIME_DIR is the user's own, 0700).
if [ "$(id -u)" = 0 ]; then
    STATE_DIR=/run/s3cachefs-demo
elif [ -n "${XDG_RUNTIME_DIR:-}" ]; then
    STATE_DIR=$XDG_RUNTIME_DIR/s3cachefs-demo
else
    STATE_DIR=${XDG_STATE_HOME:-$HOME/.local/state}/s3cachefs-demo
fi
STATE=$STATE_DIR/dir

# SeaweedFS's default ports, given explicitly. `weed mini` quietly moves to another port when one is
# taken, which would leave the endpoint above pointing at somebody else, so they are checked first.
MASTER_PORT=9333 VOLUME_PORT=9340 FILER_PORT=8888 S3_PORT=8333 ADMIN_PORT=23646
PORTS=("$MASTER_PORT" $((MASTER_PORT + 10000)) "$VOLUME_PORT" $((VOLUME_PORT + 10000))
       "$FILER_PORT" $((FILER_PORT + 10000)) "$S3_PORT" $((S3_PORT + 10000))
       "$ADMIN_PORT" $((ADMIN_PORT + 10000)))

# Demo credentials, known to both SeaweedFS and s3cachefs (boto3 reads them from the environment).
export AWS_ACCESS_KEY_ID=s3cachefs-demo AWS_SECRET_ACCESS_KEY=s3cachefs-demo-secret
export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3

say() { printf 'demo.sh: %s\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

# unsafe_dir DIR (which exists): why we must not work in DIR, or nothing if it is ours alone.
unsafe_dir() {
    local owner mode
    if [ -L "$1" ]; then echo "is a symbolic link"; return; fi
    if [ ! -d "$1" ]; then echo "is not a directory"; return; fi
    read -r owner mode < <(stat -c '%u %a' -- "$1")
    if [ "$owner" != "$(id -u)" ]; then echo "is owned by uid $owner, not by you (uid $(id -u))"; return; fi
    if ((8#$mode & 8#022)); then echo "is writable by group or others (mode $mode)"; fi
}

# demo_dir create|find: set DEMO and the paths in it. We run as root, so never in a directory that
# somebody else could have made or can write to: a fixed name under /tmp could be made first by any
# local user, with symlinks in it (cache -> /etc) that we would follow. Without S3CACHEFS_DEMO_DIR,
# `create` makes a fresh one with mktemp (0700) and records it in $STATE; `find` only looks it up
# and fails when there is none.
demo_dir() {
    local why
    if [ -n "${S3CACHEFS_DEMO_DIR:-}" ]; then
        DEMO=$S3CACHEFS_DEMO_DIR
        if [ -e "$DEMO" ] || [ -L "$DEMO" ]; then
            why=$(unsafe_dir "$DEMO")
            [ -z "$why" ] || die "S3CACHEFS_DEMO_DIR=$DEMO $why; give a directory that is yours alone"
        elif [ "$1" = create ]; then
            mkdir -p -- "$(dirname -- "$DEMO")"
            # Not -p: if somebody makes it between the test above and here, this fails.
            mkdir -m 0700 -- "$DEMO"
        else
            die "S3CACHEFS_DEMO_DIR=$DEMO does not exist"
        fi
    else
        DEMO=""
        if [ -f "$STATE" ]; then DEMO=$(cat "$STATE"); fi
        if [ -n "$DEMO" ] && { [ -e "$DEMO" ] || [ -L "$DEMO" ]; }; then
            # A directory of an earlier run, unless (say) a /tmp cleaner removed it and another user
            # made one of the same name.
            why=$(unsafe_dir "$DEMO")
            [ -z "$why" ] || die "the demo directory $DEMO (recorded in $STATE) $why; delete $STATE to start afresh"
        elif [ "$1" = create ]; then
            mkdir -p -m 0700 "$STATE_DIR"
            # /tmp itself, not $TMPDIR: a parent that another user owns could swap our directory.
            DEMO=$(mktemp -d /tmp/s3cachefs-demo.XXXXXXXX)
            printf '%s\n' "$DEMO" >"$STATE"
            say "demo directory: $DEMO (recorded in $STATE)"
        else
            return 1
        fi
    fi
    DEMO=$(cd "$DEMO" && pwd -P)
    MNT=$DEMO/mnt
    WEED_PID=$DEMO/weed.pid
    WEED_LOG=$DEMO/weed.log
    FS_PID=$DEMO/s3cachefs.pid
    FS_LOG=$DEMO/s3cachefs.log
}

# For `stop` and `objects`: the demo directory, or the reason there is none.
no_demo() {
    local msg="no demo directory recorded in $STATE"
    if [ -d /tmp/s3cachefs-demo ]; then
        # Made by an older demo.sh, which used that fixed name.
        msg="$msg (for the demo in /tmp/s3cachefs-demo of an older demo.sh, run: sudo S3CACHEFS_DEMO_DIR=/tmp/s3cachefs-demo bash $REPO/scripts/demo.sh ${1:-stop})"
    fi
    echo "$msg"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
mounted() { awk -v m="$MNT" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

# wait_gone PID SECONDS: true once the process is gone.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null
}

# The daemon's pid: it forks away from us, so find it by its command line (exact mount point match).
find_fs_pid() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "s3cachefs mount $BUCKET $MNT " && { basename "$p"; return 0; }
    done
    return 1
}

s3_ready() {
    "$VENV/bin/python" - "$ENDPOINT" "$BUCKET" <<'EOF' >/dev/null 2>&1
import sys
import boto3, botocore.config
c = boto3.client("s3", endpoint_url=sys.argv[1],
                 config=botocore.config.Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}))
sys.exit(0 if sys.argv[2] in [b["Name"] for b in c.list_buckets()["Buckets"]] else 1)
EOF
}

stop_weed() {
    alive "$WEED_PID" || { rm -f "$WEED_PID"; return 0; }
    local pid
    pid=$(cat "$WEED_PID")
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 30; then
        say "SeaweedFS (pid $pid) ignored SIGTERM for 30s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "SeaweedFS (pid $pid) would not die"
    fi
    rm -f "$WEED_PID"
    say "SeaweedFS stopped"
}

unmount_fs() {
    if mounted; then
        local pid=""
        if alive "$FS_PID"; then pid=$(cat "$FS_PID"); fi
        if ! out=$(fusermount3 -u "$MNT" 2>&1); then
            if [ -z "$pid" ] && ! find_fs_pid >/dev/null; then
                # The daemon is gone and left a dead mount behind: detach it.
                fusermount3 -uz "$MNT"
            else
                die "cannot unmount $MNT: $out (is a shell or program still using it? cd out of it and retry)"
            fi
        fi
        if [ -n "$pid" ] && ! wait_gone "$pid" 30; then
            die "unmounted, but s3cachefs (pid $pid) has not exited after 30s; see $FS_LOG"
        fi
        say "unmounted $MNT"
    fi
    rm -f "$FS_PID"
}

stop() {
    if ! demo_dir find; then
        say "$(no_demo stop): nothing to stop"
        return 0
    fi
    unmount_fs
    stop_weed
}

objects() {
    demo_dir find || die "the demo is not running: $(no_demo objects)"
    alive "$WEED_PID" || die "the demo is not running (start it with scripts/demo.sh)"
    "$VENV/bin/python" - "$ENDPOINT" "$BUCKET" <<'EOF'
import sys
import boto3
c = boto3.client("s3", endpoint_url=sys.argv[1])
n = 0
for page in c.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2]):
    for o in page.get("Contents", []):
        n += 1
        print(f"{o['Size']:>12}  {o['LastModified']:%Y-%m-%d %H:%M:%S}  {o['Key']}")
print(f"({n} object{'s' if n != 1 else ''} in bucket {sys.argv[2]} at {sys.argv[1]})")
EOF
}

instructions() {
    cat <<EOF

s3cachefs is mounted: bucket "$BUCKET" on SeaweedFS at $ENDPOINT -> $MNT

  Try it:
    cp /etc/os-release $MNT/hello.txt     # in S3 before cp returns
    ls -l $MNT
    cat $MNT/hello.txt
    $REPO/scripts/demo.sh objects        # what is in the bucket now

  Look around:
    demo:   $DEMO
    cache:  $DEMO/cache   (capped at 1G)
    logs:   $FS_LOG  $WEED_LOG

  Stop it (data stays in $DEMO; delete that directory to start over):
    $REPO/scripts/demo.sh stop
EOF
}

start() {
    demo_dir create  # before installing anything: a refused directory should cost nothing
    bash "$REPO/scripts/install.sh"
    command -v fusermount3 >/dev/null 2>&1 || die "fusermount3 not found (apt-get install fuse3)"
    [ -e /dev/fuse ] || die "/dev/fuse does not exist: this machine (or container) cannot mount FUSE filesystems"

    if alive "$WEED_PID" && mounted && stat "$MNT" >/dev/null 2>&1; then
        say "already running"
        instructions
        return 0
    fi
    if mounted; then
        # A leftover of an earlier run (its daemon died, or its server did): mount afresh.
        unmount_fs
    fi

    if ! alive "$WEED_PID"; then
        rm -f "$WEED_PID"
        local taken
        taken=$("$VENV/bin/python" - "${PORTS[@]}" <<'EOF'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        # As weed's listeners do (Go sets SO_REUSEADDR): connections of a server stopped less than a
        # minute ago (TIME_WAIT) do not make its port busy, only a socket bound to it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            busy.append(str(port))
print(" ".join(busy))
EOF
)
        if [ -n "$taken" ]; then
            die "port(s) $taken already in use on 127.0.0.1 (another SeaweedFS, or a demo started with another S3CACHEFS_DEMO_DIR?); the demo needs SeaweedFS's default ports ${PORTS[*]} - see who holds them with: ss -ltnp"
        fi

        mkdir -p "$DEMO/s3" "$DEMO/cache" "$MNT"
        say "starting SeaweedFS on $ENDPOINT (data in $DEMO/s3, log in $WEED_LOG)"
        printf '\n===== %s demo.sh start\n' "$(date '+%F %T')" >>"$WEED_LOG"
        local log_start
        log_start=$(stat -c %s "$WEED_LOG")
        # SeaweedFS's empty-folder cleaner can delete a file written where a directory of the same
        # name was emptied minutes before (README, "SeaweedFS"); a delay that never passes turns it
        # off. With a filer.toml weed does not pick its default metadata store, so it is named here
        # (the same directory as the default, so an older demo's data is kept).
        cat >"$DEMO/s3/filer.toml" <<EOF
[filer.options]
s3.empty_folder_cleanup_delay = "876000h"

[leveldb2]
enabled = true
dir = "$DEMO/s3/filerldb2"
EOF
        # setsid: the server outlives this script and the terminal it ran in.
        setsid "$VENV/bin/weed" -config_dir="$DEMO/s3" mini -dir="$DEMO/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket="$BUCKET" \
            -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
            -master.port=$MASTER_PORT -volume.port=$VOLUME_PORT -filer.port=$FILER_PORT -s3.port=$S3_PORT \
            -admin.port=$ADMIN_PORT </dev/null >>"$WEED_LOG" 2>&1 &
        echo $! >"$WEED_PID"

        local ready="" deadline=$((SECONDS + 30))
        while ((SECONDS < deadline)); do
            alive "$WEED_PID" || { tail -n 30 "$WEED_LOG" >&2; rm -f "$WEED_PID"; die "SeaweedFS exited during startup (log above)"; }
            if s3_ready; then ready=1; break; fi
            sleep 0.5
        done
        if [ -z "$ready" ]; then
            tail -n 30 "$WEED_LOG" >&2
            stop_weed
            die "SeaweedFS did not answer on $ENDPOINT within 30s (log above)"
        fi
        if tail -c +"$((log_start + 1))" "$WEED_LOG" | grep -q "not available on"; then
            stop_weed
            die "SeaweedFS could not get its default ports (another server started meanwhile?); see $WEED_LOG"
        fi
    fi

    mkdir -p "$DEMO/cache" "$MNT"
    say "mounting $BUCKET at $MNT (log in $FS_LOG)"
    if ! "$VENV/bin/s3cachefs" mount "$BUCKET" "$MNT" --endpoint-url "$ENDPOINT" \
        --cache-dir "$DEMO/cache" --cache-size 1G --log-file "$FS_LOG"; then
        [ -f "$FS_LOG" ] && tail -n 30 "$FS_LOG" >&2
        stop_weed
        die "mount failed (output above)"
    fi
    mounted || { stop_weed; die "s3cachefs returned success but $MNT is not mounted; see $FS_LOG"; }
    find_fs_pid >"$FS_PID" || rm -f "$FS_PID"
    instructions
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    objects | ls) objects ;;
    -h | --help | help) sed -n "2,10p" "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (use: start, stop, objects)" ;;
esac
