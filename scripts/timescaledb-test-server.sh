#!/usr/bin/env bash
# Provision and run a TimescaleDB server for the test suite on 127.0.0.1:5433.
#
#   scripts/timescaledb-test-server.sh [start]   provision if needed, start, verify
#   scripts/timescaledb-test-server.sh stop      fast shutdown
#   scripts/timescaledb-test-server.sh status    exit 0 if it accepts connections, 3 if not
#
# Debian 12 has no TimescaleDB package and we cannot use Docker, but Debian 13
# (trixie) ships postgresql-17-timescaledb. So we debootstrap a minimal trixie
# root and run its PostgreSQL under chroot. Nothing needs mounting in the
# chroot (no /proc, no tmpfs /dev/shm): initdb falls back to sysv dynamic shared
# memory and pg_ctl copes without /proc. The root lives in a cache folder
# outside the clone so CI runs and later sessions on the same machine reuse it.
# Superuser is `postgres` with trust auth; the host's PostgreSQL on 5432 is
# left alone.
set -euo pipefail

PORT=5433
CACHE=${TELEMETRY_TIMESCALE_CACHE:-/var/cache/telemetry-timescaledb}
ROOT=$CACHE/trixie-root
MIRROR=http://deb.debian.org/debian
PGBIN=/usr/lib/postgresql/17/bin # paths from here on are inside the chroot
PGDATA=/var/lib/telemetry-pg/data
PGLOG=/var/log/telemetry-pg.log
# Not /var/run/...: that is an absolute symlink to /run, which from the host
# side would resolve to the host's own socket dir.
SOCKDIR=/run/postgresql
SCRATCH_DB=timescaledb_smoke

log() { printf 'timescaledb-test-server: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# -U/-d only so the server log isn't littered with 'role "root" does not exist'.
is_ready() { pg_isready -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres; }

# Host psql (PostgreSQL 15 client) is enough for the few commands we send.
hpsql() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

# env -i keeps host variables (locale, PG*, NOTIFY_SOCKET) from leaking into
# the chroot, where e.g. a host-only locale would make postgres complain.
# 9>&- matters: otherwise the postmaster inherits our lock fd and holds the
# lock for as long as it runs, blocking every later start/stop.
as_postgres() {
    chroot "$ROOT" /usr/bin/env -i LANG=C.UTF-8 PATH=/usr/bin:/bin HOME=/var/lib/postgresql \
        su postgres -s /bin/sh -c "cd / && $1" 9>&-
}

# Two concurrent invocations (e.g. a developer and CI) must not bootstrap or
# start the cluster at the same time.
take_lock() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    if ! flock -n 9; then
        log "another invocation holds $CACHE/lock; waiting (up to 15 min)..."
        flock -w 900 9 || die "timed out waiting for $CACHE/lock"
    fi
}

# Anything still mounted under a dead debootstrap's temp dir (it mounts proc
# and sys itself) must go before rm -rf, or rm would wander into them.
remove_tree() {
    local dir=$1 mnt
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system "$dir"
}

ensure_root() {
    if [[ -x $ROOT$PGBIN/postgres && -e $ROOT/usr/share/postgresql/17/extension/timescaledb.control ]]; then
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap..."
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q debootstrap >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; } ||
            die "could not install debootstrap"
    fi

    # ROOT only ever appears by rename of a completed bootstrap, so an
    # interrupted run leaves just a temp dir, which we throw away here.
    local tmp
    for tmp in "$CACHE"/trixie-root.tmp.*; do
        [[ -e $tmp ]] || continue
        log "removing leftover partial bootstrap $tmp"
        remove_tree "$tmp"
    done
    [[ -e $ROOT ]] && { log "removing incomplete $ROOT"; remove_tree "$ROOT"; }

    tmp=$CACHE/trixie-root.tmp.$$
    log "bootstrapping Debian trixie with PostgreSQL 17 + TimescaleDB into $ROOT"
    log "(about a minute and ~600 MB; output in $CACHE/debootstrap.log)"
    if ! debootstrap --variant=minbase --include=postgresql-17,postgresql-17-timescaledb \
        trixie "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2 || true
        remove_tree "$tmp"
        die "debootstrap failed; see $CACHE/debootstrap.log"
    fi
    # The package postinst made a default 17/main cluster we never use, and the
    # downloaded .debs are dead weight: ~150 MB of cache between them.
    chroot "$tmp" pg_dropcluster 17 main >/dev/null 2>&1 || true
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    mv -T "$tmp" "$ROOT"
    log "bootstrap complete"
}

ensure_cluster() {
    # The socket dir lives under /run, which nobody recreates for us in a chroot.
    chroot "$ROOT" install -d -o postgres -g postgres -m 2775 "$SOCKDIR"
    [[ -e $ROOT$PGLOG ]] || chroot "$ROOT" install -o postgres -g postgres -m 0640 /dev/null "$PGLOG"

    [[ -f $ROOT$PGDATA/PG_VERSION ]] && return

    # Same idea as the root: initdb into a temp dir and rename when complete.
    local tmp=$PGDATA.tmp
    log "initialising cluster in $ROOT$PGDATA"
    rm -rf "$ROOT$tmp"
    chroot "$ROOT" install -d -o postgres -g postgres -m 0700 "$(dirname "$PGDATA")"
    as_postgres "$PGBIN/initdb -D $tmp -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null"

    cat >"$ROOT$tmp/pg_hba.conf" <<'EOF'
# Test-only server bound to loopback: trust is the point.
local all         all                 trust
host  all         all   127.0.0.1/32  trust
host  all         all   ::1/128       trust
local replication all                 trust
host  replication all   127.0.0.1/32  trust
EOF
    cat >>"$ROOT$tmp/postgresql.conf" <<EOF

# --- telemetry test server (scripts/timescaledb-test-server.sh) ---
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKDIR'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
# Modest: this shares a 2-core, 24 GiB machine with the rest of the stack.
shared_buffers = 256MB
work_mem = 16MB
maintenance_work_mem = 128MB
max_connections = 100
# Queries over hypertables lock every chunk they touch; the default 64 per
# transaction runs out quickly.
max_locks_per_transaction = 256
max_worker_processes = 16
timescaledb.max_background_workers = 8
# Pointless for a test server, and without /proc postgres can't size them.
huge_pages = off
# Keep the log readable for whoever debugs a failing test.
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    chroot "$ROOT" chown -R postgres:postgres "$tmp"
    mv -T "$ROOT$tmp" "$ROOT$PGDATA"
}

# PID of a live postmaster for our cluster, or nothing. Checking the process's
# root tells our chroot's postgres apart from a reused PID after a reboot or
# from the host's own PostgreSQL.
live_postmaster() {
    local pidfile=$ROOT$PGDATA/postmaster.pid pid
    [[ -f $pidfile ]] || return 0
    pid=$(head -n 1 "$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if [[ $(readlink "/proc/$pid/root" 2>/dev/null) == "$(readlink -f "$ROOT")" ]]; then
        echo "$pid"
    fi
}

# Processes still running inside our chroot (after a kill -9 of the
# postmaster, its children linger briefly and keep the shared memory busy).
chroot_pids() {
    local real p
    real=$(readlink -f "$ROOT")
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/root" 2>/dev/null) == "$real" ]] && echo "${p#/proc/}"
    done
    return 0
}

launch_postmaster() {
    local i
    for ((i = 0; i < 30; i++)); do
        [[ -z $(chroot_pids) ]] && break
        ((i == 0)) && log "waiting for leftover processes of a killed server to exit..."
        sleep 1
    done
    [[ -z $(chroot_pids) ]] ||
        die "processes from an old server still run in the chroot: $(chroot_pids | tr '\n' ' ')"

    # Postgres only ignores a lock file whose PID is dead. After a kill -9
    # the PID can linger as an unreaped zombie, and after a reboot it can
    # belong to some unrelated process, so postgres would refuse to start.
    # Our socket dir is on disk in the cache, so its lock survives reboots.
    local f
    for f in "$ROOT$PGDATA/postmaster.pid" "$ROOT$SOCKDIR/.s.PGSQL.$PORT.lock"; do
        [[ -e $f ]] || continue
        log "removing stale ${f#"$ROOT"} (no server is running)"
        rm -f "$f"
    done
    rm -f "$ROOT$SOCKDIR/.s.PGSQL.$PORT"

    log "starting PostgreSQL 17 + TimescaleDB on 127.0.0.1:$PORT (log: $ROOT$PGLOG)"
    if ! as_postgres "$PGBIN/pg_ctl -D $PGDATA -l $PGLOG -w -t 120 start >/dev/null"; then
        tail -n 20 "$ROOT$PGLOG" >&2 || true
        die "pg_ctl start failed; see $ROOT$PGLOG"
    fi
}

# A postmaster we find running may be starting up, in crash recovery, or
# still dying from a kill -9; so keep looking until it answers or is gone.
start_server() {
    local i pid launched=
    for ((i = 0; i < 90; i++)); do
        is_ready && return
        pid=$(live_postmaster)
        if [[ -z $pid ]]; then
            [[ -z $launched ]] || break
            launch_postmaster
            launched=1
            continue
        elif ((i == 0)); then
            log "postmaster $pid is already running; waiting for it to accept connections"
        fi
        sleep 1
    done
    tail -n 20 "$ROOT$PGLOG" >&2 || true
    die "server did not come up on 127.0.0.1:$PORT; see $ROOT$PGLOG"
}

verify() {
    if [[ -z $(hpsql -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$SCRATCH_DB'") ]]; then
        hpsql -d postgres -c "CREATE DATABASE $SCRATCH_DB"
    fi
    hpsql -d "$SCRATCH_DB" -c "CREATE EXTENSION IF NOT EXISTS timescaledb" 2>/dev/null ||
        die "CREATE EXTENSION timescaledb failed in database $SCRATCH_DB"
    log "server version:      $(hpsql -d "$SCRATCH_DB" -Atc 'SHOW server_version')"
    log "timescaledb version: $(hpsql -d "$SCRATCH_DB" -Atc "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")"
    log "timescaledb.license: $(hpsql -d "$SCRATCH_DB" -Atc 'SHOW timescaledb.license')"
    log "ready: postgresql://postgres@127.0.0.1:$PORT/postgres"
}

cmd_start() {
    if is_ready; then
        log "a server already accepts connections on 127.0.0.1:$PORT; nothing to do"
        exit 0
    fi
    take_lock
    # Whoever held the lock before us may have just started it.
    if is_ready; then
        log "a server already accepts connections on 127.0.0.1:$PORT; nothing to do"
        exit 0
    fi
    ensure_root
    ensure_cluster
    start_server
    verify
}

cmd_stop() {
    if [[ ! -f $ROOT$PGDATA/PG_VERSION ]]; then
        log "no cluster at $ROOT$PGDATA; nothing to stop"
        return
    fi
    take_lock
    if [[ -z $(live_postmaster) ]]; then
        log "server is not running"
        return
    fi
    log "stopping server on 127.0.0.1:$PORT"
    as_postgres "$PGBIN/pg_ctl -D $PGDATA -m fast -w -t 60 stop >/dev/null" ||
        die "pg_ctl stop failed; see $ROOT$PGLOG"
    log "stopped"
}

cmd_status() {
    local pid
    pid=$(live_postmaster)
    if is_ready; then
        log "accepting connections on 127.0.0.1:$PORT${pid:+ (postmaster $pid)}"
        exit 0
    fi
    log "not accepting connections on 127.0.0.1:$PORT${pid:+ (but postmaster $pid is running)}"
    exit 3
}

case ${1:-start} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac
