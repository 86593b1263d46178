#!/usr/bin/env bash
# Makes a PostgreSQL server available on loopback for the store tests and prints its admin
# URL as the last line of stdout. Idempotent: reuses ORLY_TEST_PG_URL when it answers, and a
# cluster this script started before.
#
#   export ORLY_TEST_PG_URL="$(scripts/test-postgres.sh | tail -n1)"
#   cargo test -p orly-db --test store
#
# Env: ORLY_TEST_PG_URL (use this server), ORLY_TEST_PG_DIR (cluster dir, default
# /tmp/orly-test-pg), ORLY_TEST_PG_PORT (default 54329). Installs PostgreSQL with apt-get
# when it is missing (needs root). The cluster runs as the `postgres` system user, with trust
# auth, fsync off: for tests only.
set -euo pipefail

PG_DIR="${ORLY_TEST_PG_DIR:-/tmp/orly-test-pg}"
PG_PORT="${ORLY_TEST_PG_PORT:-54329}"
PG_USER=postgres
URL="postgres://${PG_USER}@127.0.0.1:${PG_PORT}/postgres"

log() { echo "test-postgres: $*" >&2; }

find_bin() {
    local name="$1" c
    if c="$(command -v "$name" 2>/dev/null)"; then
        echo "$c"
        return 0
    fi
    for c in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$c/$name" ]; then
            echo "$c/$name"
            return 0
        fi
    done
    return 1
}

answers() { # url
    local isready
    if isready="$(find_bin pg_isready)"; then
        "$isready" -q -d "$1" -t 2 >/dev/null 2>&1
    elif command -v psql >/dev/null 2>&1; then
        psql "$1" -qAtc 'SELECT 1' >/dev/null 2>&1
    else
        return 1
    fi
}

if [ -n "${ORLY_TEST_PG_URL:-}" ] && answers "$ORLY_TEST_PG_URL"; then
    echo "$ORLY_TEST_PG_URL"
    exit 0
fi

as_pg() {
    if [ "$(id -u)" = "$(id -u "$PG_USER" 2>/dev/null || echo x)" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$PG_USER" -- "$@"
    else
        su "$PG_USER" -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

if ! find_bin initdb >/dev/null || ! find_bin pg_ctl >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        log "PostgreSQL is not installed and we are not root; install it or set ORLY_TEST_PG_URL"
        exit 1
    fi
    log "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"

if ! id -u "$PG_USER" >/dev/null 2>&1; then
    log "creating system user $PG_USER"
    useradd --system --home-dir "$PG_DIR" --shell /bin/sh "$PG_USER"
fi

mkdir -p "$PG_DIR"
if [ "$(id -u)" = 0 ]; then
    chown "$PG_USER" "$PG_DIR"
fi
chmod 700 "$PG_DIR"
DATA="$PG_DIR/data"

if [ ! -f "$DATA/PG_VERSION" ]; then
    log "initializing a cluster in $DATA"
    as_pg "$INITDB" -D "$DATA" -U "$PG_USER" --auth=trust --encoding=UTF8 --locale=C.UTF-8 >&2 \
        || as_pg "$INITDB" -D "$DATA" -U "$PG_USER" --auth=trust --encoding=UTF8 --no-locale >&2
    cat >>"$DATA/postgresql.conf" <<CONF
# orly test cluster
listen_addresses = '127.0.0.1'
port = ${PG_PORT}
unix_socket_directories = '${PG_DIR}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
CONF
    cat >"$DATA/pg_hba.conf" <<HBA
local all all trust
host  all all 127.0.0.1/32 trust
HBA
fi

if ! as_pg "$PG_CTL" -D "$DATA" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:${PG_PORT}"
    as_pg "$PG_CTL" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 start >&2 || {
        log "pg_ctl start failed; server log:"
        tail -n 30 "$PG_DIR/server.log" >&2 || true
        exit 1
    }
fi

for _ in $(seq 1 100); do
    if answers "$URL"; then
        echo "$URL"
        exit 0
    fi
    sleep 0.1
done
log "PostgreSQL did not accept connections on port ${PG_PORT}; see $PG_DIR/server.log"
exit 1
