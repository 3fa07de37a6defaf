#!/usr/bin/env bash
# The merge benchmark of docs/benchmarks.md: two PostgreSQL sources of ROOMS rooms × MESSAGES
# messages each (every room in both, so every room is a union of two histories), merged into a
# third database with `stoa db merge`; prints messages/s and the peak RSS (GNU time).
#
#   scripts/bench-merge.sh [ROOMS] [MESSAGES]      (default 1000 × 1000)
#
# Needs psql, GNU time, a release build (target/release/stoa or $STOA) and
# STOA_BENCH_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres). The three databases
# are created and dropped.
set -euo pipefail
ROOMS=${1:-1000}
MESSAGES=${2:-1000}
ADMIN=${STOA_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
STOA=${STOA:-${CARGO_TARGET_DIR:-target}/release/stoa}
BASE=${ADMIN%/*}
tag=$$
dbs=(stoa_mb_a_$tag stoa_mb_b_$tag stoa_mb_t_$tag)
cleanup() { for d in "${dbs[@]}"; do psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null; done; }
trap cleanup EXIT
for d in "${dbs[@]}"; do psql -q "$ADMIN" -c "CREATE DATABASE $d" >/dev/null; done

fill() { # db node offset_ms
    STOA__STORE__URL="$BASE/$1" "$STOA" migrate >/dev/null
    psql -q "$BASE/$1" <<SQL
INSERT INTO rooms (address, config, public, home_node, host_node, epoch, last_seq, last_ts, created_at)
SELECT 'room' || r || '@conference.localhost', '{}', true, '$2', '$2', 1, $MESSAGES, 1700000000000 + $MESSAGES * 2 + $3, 0 FROM generate_series(1, $ROOMS) r;
INSERT INTO messages (room_id, seq, id, sender, nick, body, client_msg_id, epoch, created_at)
SELECT rm.id, s, '$2-' || rm.id || '-' || s, 'user' || (s % 17), 'nick' || (s % 17),
       'message ' || s || ' of a benchmark room, about the length of a chat line', '$2-' || s, 1,
       1700000000000 + s * 2 + $3
FROM rooms rm, generate_series(1, $MESSAGES) s;
ANALYZE;
SQL
}
fill "${dbs[0]}" 1a 0
fill "${dbs[1]}" 1b 1
total=$((2 * ROOMS * MESSAGES))
start=$(date +%s.%N)
/usr/bin/time -f 'peak RSS %M KiB, %e s wall, %U s user, %S s system' \
    "$STOA" db merge --source "$BASE/${dbs[0]}" --source "$BASE/${dbs[1]}" --target "$BASE/${dbs[2]}" \
    --migrate-target --yes --format json >/tmp/bench-merge-$tag.json
end=$(date +%s.%N)
python3 - "$total" "$start" "$end" /tmp/bench-merge-$tag.json <<'PY'
import json, sys
total, start, end, path = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
job = json.load(open(path))
secs = end - start
print(f"{total} messages read, {job['counts']['messages']} written in {secs:.1f} s: {total / secs:,.0f} messages/s; "
      f"state {job['state']}, verification ok: {job['verification']['ok']}")
PY
rm -f /tmp/bench-merge-$tag.json
