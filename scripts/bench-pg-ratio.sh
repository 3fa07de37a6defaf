#!/usr/bin/env bash
# Durable-commit throughput of Stoa on PostgreSQL against pgbench's single-row commit rate,
# measured side by side in ONE run (the disk's flush time drifts from minute to minute, so only
# a ratio measured together means anything; STACK.md gotcha 11).
#
#   scripts/bench-pg-ratio.sh                 # pgbench, stoa, pgbench again; prints the ratio
#   STOA=target/release/stoa DURATION=20 scripts/bench-pg-ratio.sh -- --rooms 200 --window 64
#
# Needs a local PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) and pgbench
# (`apt-get install -y postgresql-contrib` or /usr/lib/postgresql/*/bin). Arguments after `--`
# go to `stoa bench throughput`. Both scratch databases are dropped at the end.
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
STOA="${STOA:-target/release/stoa}"
DURATION="${DURATION:-20}"          # seconds, for pgbench and for stoa's measured window
CLIENTS="${CLIENTS:-32}"
[[ "${1:-}" == "--" ]] && shift

PGBENCH="$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | tail -1 || true)"
[[ -x "$PGBENCH" ]] || { echo "pgbench not found: apt-get install -y postgresql-contrib" >&2; exit 1; }
[[ -x "$STOA" ]] || { echo "$STOA not found: cargo build --release (or set STOA=…)" >&2; exit 1; }

RUN="$(date +%s)_$$"
PGB_DB="stoa_pgbench_$RUN"
STOA_DB="stoa_bench_$RUN"
WORK="$(mktemp -d)"
cleanup() {
  dropdb --if-exists "$PGB_DB" >/dev/null 2>&1 || true
  dropdb --if-exists "$STOA_DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

createdb "$PGB_DB"
createdb "$STOA_DB"
psql -q -d "$PGB_DB" -c "CREATE TABLE t (id bigserial PRIMARY KEY, room bigint NOT NULL, body text NOT NULL)"
# One single-row INSERT per transaction (autocommit): a durable commit each, like one message.
printf "INSERT INTO t (room, body) VALUES (:client_id, '%s');\n" "$(printf 'x%.0s' $(seq 100))" > "$WORK/insert.sql"

pgbench_tps() {
  "$PGBENCH" -n -c "$CLIENTS" -j 2 -T "$DURATION" -f "$WORK/insert.sql" "$PGB_DB" 2>/dev/null \
    | awk '/^tps = / { print $3; exit }'
}

echo "synchronous_commit = $(psql -Atc 'SHOW synchronous_commit'), fsync = $(psql -Atc 'SHOW fsync'), wal_sync_method = $(psql -Atc 'SHOW wal_sync_method')" >&2
echo "pgbench: $CLIENTS clients, single-row INSERT commits, ${DURATION}s …" >&2
PGB1="$(pgbench_tps)"
echo "pgbench: $PGB1 commits/s" >&2

echo "stoa bench throughput on postgres, ${DURATION}s measured …" >&2
"$STOA" bench throughput --store "postgres://$PGUSER@$PGHOST:$PGPORT/$STOA_DB" \
  --duration "${DURATION}s" --format json "$@" > "$WORK/stoa.json"
STOA_RATE="$(jq -r .committed_per_s "$WORK/stoa.json")"
echo "stoa: $STOA_RATE committed msg/s (ack after commit)" >&2

echo "pgbench again …" >&2
PGB2="$(pgbench_tps)"
echo "pgbench: $PGB2 commits/s" >&2

jq -n --argjson pg1 "$PGB1" --argjson pg2 "$PGB2" --argjson stoa "$STOA_RATE" \
  --slurpfile run "$WORK/stoa.json" --arg clients "$CLIENTS" --arg duration "$DURATION" '{
    date: $run[0].date,
    pgbench_clients: ($clients | tonumber),
    duration_s: ($duration | tonumber),
    pgbench_commits_per_s_before: $pg1,
    pgbench_commits_per_s_after: $pg2,
    pgbench_commits_per_s_mean: (($pg1 + $pg2) / 2),
    stoa_committed_per_s: $stoa,
    ratio: ($stoa / (($pg1 + $pg2) / 2)),
    stoa: $run[0]
  }'
