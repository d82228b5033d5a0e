#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the postgres-marked tests (and for trying
# `tune.storage: postgresql://...` locally). Prints one line for the caller to eval:
#
#   eval "$(bash scripts/postgres.sh)" && python -m pytest -m postgres tests/test_tune_postgres.py
#
# - installs PostgreSQL with apt-get if initdb/pg_ctl are missing (root only);
# - keeps the cluster in $MAPRL_PG_DIR (default $TMPDIR/maprl-postgres), owned by the postgres user
#   when run as root (PostgreSQL refuses to run as root);
# - trust authentication for a superuser "maprl", listening on 127.0.0.1 only, on a free port;
# - idempotent: a second call reuses the running server (or restarts the stopped cluster);
# - fails soft: when PostgreSQL cannot be installed or started it says why on stderr and exits 0
#   without printing the export, so the tests skip.
# Stop it with: pg_ctl stop -D "$MAPRL_PG_DIR/data" (as the postgres user when root).
set -uo pipefail

DIR="${MAPRL_PG_DIR:-${TMPDIR:-/tmp}/maprl-postgres}"
DATA="$DIR/data"
DB="${MAPRL_PG_DB:-maprl_test}"
USER_NAME=maprl

say() { echo "postgres.sh: $*" >&2; }
fail() { say "$* -- no PostgreSQL server; the postgres tests will skip"; exit 0; }

find_bin() {
  local name=$1 found
  found=$(command -v "$name" 2>/dev/null) && { echo "$found"; return 0; }
  found=$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1)
  [ -n "$found" ] && { echo "$found"; return 0; }
  return 1
}

install_postgres() {
  [ "$(id -u)" -eq 0 ] || fail "initdb/pg_ctl not found and not root, so cannot apt-get install postgresql"
  command -v apt-get >/dev/null || fail "initdb/pg_ctl not found and no apt-get to install them"
  say "installing postgresql with apt-get (a minute)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q postgresql >&2; then
    apt-get update -q >&2 && apt-get install -y -q postgresql >&2 || fail "apt-get install postgresql failed"
  fi
}

INITDB=$(find_bin initdb) && PG_CTL=$(find_bin pg_ctl) || {
  install_postgres
  INITDB=$(find_bin initdb) && PG_CTL=$(find_bin pg_ctl) || fail "initdb/pg_ctl still missing after install"
}
PG_CTL=$(readlink -f "$PG_CTL"); INITDB=$(readlink -f "$INITDB")
BIN=$(dirname "$PG_CTL")

# Run a PostgreSQL command as a non-root user (PostgreSQL refuses root).
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres >&2 || fail "no postgres user"
  as_pg() {
    if command -v runuser >/dev/null; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  }
else
  as_pg() { "$@"; }
fi

free_port() {
  local port
  for port in $(seq 54329 54429); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return 0; }
  done
  return 1
}

mkdir -p "$DIR" || fail "cannot create $DIR"
[ "$(id -u)" -eq 0 ] && chown postgres "$DIR"
if [ ! -s "$DATA/PG_VERSION" ]; then
  rm -rf "$DATA"
  as_pg "$INITDB" -D "$DATA" -U "$USER_NAME" --auth=trust -E UTF8 --no-locale >"$DIR/initdb.log" 2>&1 \
    || fail "initdb failed (see $DIR/initdb.log)"
fi

PORT=$(cat "$DIR/port" 2>/dev/null || true)
if [ -n "$PORT" ] && as_pg "$PG_CTL" status -D "$DATA" >/dev/null 2>&1; then
  say "reusing the server in $DATA on port $PORT"
else
  PORT=$(free_port) || fail "no free port in 54329-54429"
  mkdir -p "$DIR/sock" && { [ "$(id -u)" -ne 0 ] || chown postgres "$DIR/sock"; }
  as_pg "$PG_CTL" start -D "$DATA" -w -t 60 -l "$DIR/server.log" \
    -o "-p $PORT -k $DIR/sock -c listen_addresses=127.0.0.1" >&2 || fail "pg_ctl start failed (see $DIR/server.log)"
  echo "$PORT" >"$DIR/port"
fi

if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" \
  | grep -q 1; then
  "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" "$DB" >&2 || fail "createdb $DB failed"
fi
echo "export MAPRL_TEST_POSTGRES_URL=postgresql://$USER_NAME@127.0.0.1:$PORT/$DB"
