#!/usr/bin/env bash
# Two server builds side by side, in ONE run, alternated (A, B, A, B, ...), so that the drift
# of this noisy machine hits both alike: throughput on SQLite and on PostgreSQL, fan-out, and
# latency at a fixed 8,000 msg/s. One load generator ($BENCH, `stoa bench`) drives both; only
# the spawned server differs (`--server-bin`). Prints every run, then per figure the medians of
# A and B and the median of the pair ratios (B over A).
#
#   A=/tmp/stoa-before B=target/release/stoa scripts/bench-ab.sh
#   PAIRS=5 DURATION=20s MODES="throughput-sqlite latency-sqlite" A=… B=… scripts/bench-ab.sh
#
# A and B are `stoa` release binaries (e.g. build an older commit in a git worktree and copy
# its target/release/stoa away). Give that worktree its own CARGO_TARGET_DIR, or touch
# migrations/src/*.rs before building: cargo keys workspace path crates by their path relative to
# the workspace, so a target dir shared between checkouts can keep another checkout's `migration`
# crate as fresh (a binary without its own migrations; seen 2026-12-05). PostgreSQL runs need a local server at 127.0.0.1:5432 (user
# postgres, trust); each run gets a fresh database, dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
A="${A:?set A to the first stoa binary (before)}"
B="${B:?set B to the second stoa binary (after)}"
BENCH="${BENCH:-$B}"
PAIRS="${PAIRS:-3}"
DURATION="${DURATION:-10s}"
MODES="${MODES:-throughput-sqlite throughput-postgres fanout-sqlite latency-sqlite}"
PGURL="postgres://postgres@127.0.0.1:5432"
for bin in "$A" "$B" "$BENCH"; do [[ -x "$bin" ]] || { echo "$bin is not an executable" >&2; exit 1; }; done
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# One run: mode, server binary. Prints the headline figure, the server CPU per message (µs)
# and the cores other processes used meanwhile.
run() {
  local mode="$1" server="$2" args=() db=""
  case "$mode" in
    throughput-sqlite) args=(throughput) ;;
    throughput-postgres) db="stoa_ab_$(date +%s%N)"; args=(throughput --store "$PGURL/$db") ;;
    fanout-sqlite) args=(fanout) ;;
    latency-sqlite) args=(latency --total-rate 8000) ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  [[ -n "$db" ]] && createdb -h 127.0.0.1 -U postgres "$db"
  "$BENCH" bench "${args[@]}" --server-bin "$server" --duration "$DURATION" --format json > "$OUT/run.json" 2> "$OUT/run.err" \
    || { echo "bench failed: $(tail -3 "$OUT/run.err")" >&2; [[ -n "$db" ]] && dropdb -h 127.0.0.1 -U postgres --if-exists "$db"; exit 1; }
  [[ -n "$db" ]] && dropdb -h 127.0.0.1 -U postgres --if-exists "$db"
  python3 - "$mode" "$OUT/run.json" <<'PY'
import json, sys
mode, d = sys.argv[1], json.load(open(sys.argv[2]))
rate = d["committed_per_s"]
us = 1e6 * d["cpu_cores_server"] / rate if rate else 0
head = {"fanout-sqlite": d["deliveries_per_s"], "latency-sqlite": d["e2e_p99_ms"]}.get(mode, rate)
print(head, us, d["cpu_cores_other"], d["e2e_p50_ms"])
PY
}

declare -A unit=([throughput-sqlite]="msg/s" [throughput-postgres]="msg/s" [fanout-sqlite]="deliveries/s" [latency-sqlite]="ms p99")
for mode in $MODES; do
  echo "== $mode ($DURATION each, $PAIRS pairs, A=$A B=$B)"
  figs_a=(); figs_b=(); cpu_a=(); cpu_b=()
  for i in $(seq "$PAIRS"); do
    read -r fa ua oa pa < <(run "$mode" "$A")
    read -r fb ub ob pb < <(run "$mode" "$B")
    figs_a+=("$fa"); figs_b+=("$fb"); cpu_a+=("$ua"); cpu_b+=("$ub")
    printf 'pair %d: A %.1f %s (p50 %.2f ms, %.1f us server CPU/msg, other %.2f cores)  B %.1f %s (p50 %.2f ms, %.1f us/msg, other %.2f)\n' \
      "$i" "$fa" "${unit[$mode]}" "$pa" "$ua" "$oa" "$fb" "${unit[$mode]}" "$pb" "$ub" "$ob"
  done
  python3 - "$mode" "${figs_a[*]}" "${figs_b[*]}" "${cpu_a[*]}" "${cpu_b[*]}" <<'PY'
import statistics, sys
mode = sys.argv[1]
fa, fb, ca, cb = ([float(x) for x in s.split()] for s in sys.argv[2:6])
med = statistics.median
ratios = [b / a for a, b in zip(fa, fb) if a]
cpu = [b / a for a, b in zip(ca, cb) if a]
print(f"medians: A {med(fa):.1f}  B {med(fb):.1f}  (B/A of medians {100 * med(fb) / med(fa):.1f} %)")
print(f"median of pair ratios B/A: figure {100 * med(ratios):.1f} %  server CPU per message {100 * med(cpu):.1f} %")
PY
done
