#!/usr/bin/env bash
# The figures of docs/benchmarks.md: every `stoa bench` mode, ROUNDS times, one JSON summary per
# line in $OUT/<name>.jsonl, then the median of each headline figure.
#
#   cargo build --release && scripts/bench-suite.sh            # 3 rounds, ~25 min
#   ROUNDS=1 OUT=/tmp/b scripts/bench-suite.sh                    # one quick pass
#   cargo build --profile profiling && STOA=target/profiling/stoa scripts/bench-suite.sh
#                          # under perf: the release build has no debug info, `profiling` has
#
# PostgreSQL runs need a local server at 127.0.0.1:5432 (user postgres, trust); each run gets a
# fresh database, dropped afterwards. Set PG=0 to skip them.
set -euo pipefail

STOA="${STOA:-target/release/stoa}"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-bench-results}"
PG="${PG:-1}"
PGURL="postgres://postgres@127.0.0.1:5432"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"

run() { # name, then stoa bench arguments
  local name="$1"; shift
  echo "== $name: stoa bench $*" >&2
  if "$STOA" bench "$@" --format json > "$OUT/.last.json" 2> "$OUT/.last.err"; then
    jq -c . "$OUT/.last.json" >> "$OUT/$name.jsonl"
  else
    echo "   failed: $(tail -3 "$OUT/.last.err")" >&2
  fi
}

with_pg_db() { # name, then stoa bench arguments (the store URL is appended)
  local db="stoa_suite_$(date +%s)_$$"
  createdb -h 127.0.0.1 -U postgres "$db"
  run "$@" --store "$PGURL/$db" || true
  dropdb -h 127.0.0.1 -U postgres --if-exists "$db"
}

for round in $(seq "$ROUNDS"); do
  echo "#### round $round of $ROUNDS" >&2
  run throughput-sqlite throughput
  run throughput-sqlite-jemalloc throughput --server-env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
  run fanout-sqlite fanout
  run latency-sqlite latency
  run idle-rooms idle-rooms --rooms 100000 --warm-rooms 20000
  run cold-activation-sqlite cold-activation
  run connections connections
  if [[ "$PG" == 1 ]]; then
    echo "== pg-ratio" >&2
    STOA="$STOA" "$HERE/bench-pg-ratio.sh" | jq -c . >> "$OUT/pg-ratio.jsonl" || echo "   pg-ratio failed" >&2
    with_pg_db latency-postgres latency
    with_pg_db cold-activation-postgres cold-activation
  fi
done

median() { # file, jq expression
  [[ -s "$1" ]] || return 0
  jq -s "[.[] | $2] | sort | if length == 0 then null else .[(length - 1) / 2 | floor] end" "$1"
}

echo
echo "medians over $ROUNDS round(s), from $OUT/*.jsonl:"
for f in "$OUT"/*.jsonl; do
  name="$(basename "$f" .jsonl)"
  case "$name" in
    throughput-*) keys="committed_per_s ack_p50_ms ack_p99_ms cpu_cores_server cpu_cores_other" ;;
    fanout-*) keys="deliveries_per_s e2e_p50_ms e2e_p99_ms setup_s cpu_cores_other" ;;
    latency-*) keys="saturation_per_s target_rate_per_s e2e_p50_ms e2e_p99_ms e2e_p999_ms cpu_cores_other" ;;
    idle-rooms) keys="bytes_per_idle_room activations_per_s" ;;
    cold-activation-*) keys="cold_join_p50_ms cold_join_p99_ms warm_join_p50_ms bulk_insert_rooms_per_s" ;;
    connections) keys="bytes_per_connection_idle bytes_per_connection_active connect_per_s ack_p50_ms ack_p99_ms cpu_cores_server" ;;
    pg-ratio) keys="pgbench_commits_per_s_mean stoa_committed_per_s ratio" ;;
    *) keys="" ;;
  esac
  line="$name ($(wc -l < "$f") runs):"
  for k in $keys; do line="$line $k=$(median "$f" ".$k")"; done
  echo "$line"
done
