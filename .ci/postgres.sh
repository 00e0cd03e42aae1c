#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1:$PGPORT for the tests (Debian's packages) and print its URI.
set -euo pipefail
PGPORT=${PGPORT:-55432}
PGDATA=${PGDATA:-/tmp/ctlab-pg}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if ! [ -x "$BIN/pg_ctl" ]; then
  echo "PostgreSQL is not installed (apt-get install postgresql)" >&2
  exit 1
fi
RUN=(runuser -u postgres --)
[ "$(id -u)" = 0 ] || RUN=()
if ! "${RUN[@]}" "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  rm -rf "$PGDATA"
  mkdir -p "$PGDATA"
  [ "$(id -u)" = 0 ] && chown postgres "$PGDATA"
  "${RUN[@]}" "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust >/dev/null
  "${RUN[@]}" "$BIN/pg_ctl" -D "$PGDATA" -o "-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200" \
    -l "$PGDATA/server.log" -w start >/dev/null
fi
for db in ctlab_mlflow ctlab_optuna; do
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 ||
    psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qc "CREATE DATABASE $db" >/dev/null
done
echo "postgresql+psycopg://postgres@127.0.0.1:$PGPORT"
