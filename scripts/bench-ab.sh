#!/usr/bin/env bash
# Two server builds side by side, in ONE run, alternated (A, B, A, B, ...), so that the drift
# of this noisy machine hits both alike: throughput on SQLite and on PostgreSQL, fan-out,
# latency at a fixed 8,000 msg/s, and (not by default) the same on PostgreSQL
# (`latency-postgres`), latency at half the saturation that the same run probes first
# (`halfsat-sqlite`), a pair's failover of 10,000 rooms with
# 1,000 clients on PostgreSQL (`failover-postgres`) and the cluster's forwarding overhead
# (`cluster`: seven nodes, one overhead round of DURATION), and the cluster's failover of pair
# 2's 10,000 rooms under the load of three pairs (`cluster-failover`: p50 and max; DURATION does
# not apply to it or to `failover-postgres`, whose run is as long as its failover and fallback
# take). One load generator ($BENCH, `stoa bench`) drives both; only
# the spawned server differs (`--server-bin`). Prints every run, then per figure the medians of
# A and B and the median of the pair ratios (B over A).
#
#   A=/tmp/stoa-before B=target/release/stoa scripts/bench-ab.sh
#   PAIRS=5 DURATION=20s MODES="throughput-sqlite latency-sqlite" A=… B=… scripts/bench-ab.sh
#   PAIRS=4 DURATION=8s MODES="failover-postgres cluster" A=… B=… scripts/bench-ab.sh
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

# One run: mode, server binary. Prints the headline figure, a second figure (the server CPU per
# message in µs for the load modes) and a line of detail.
run() {
  local mode="$1" server="$2" args=() db=""
  case "$mode" in
    throughput-sqlite) args=(throughput --duration "$DURATION") ;;
    throughput-postgres) db="stoa_ab_$(date +%s%N)"; args=(throughput --store "$PGURL/$db" --duration "$DURATION") ;;
    fanout-sqlite) args=(fanout --duration "$DURATION") ;;
    latency-sqlite) args=(latency --total-rate 8000 --duration "$DURATION") ;;
    halfsat-sqlite) args=(latency --duration "$DURATION") ;;
    latency-postgres) db="stoa_ab_$(date +%s%N)"; args=(latency --store "$PGURL/$db" --total-rate 8000 --duration "$DURATION") ;;
    failover-postgres) db="stoa_ab_$(date +%s%N)"; args=(failover --store "$PGURL/$db" --rooms 10000 --clients 1000 --cycles 1) ;;
    cluster) args=(cluster --failover-rooms 0 --rounds 1 --duration "$DURATION") ;;
    cluster-failover) args=(cluster --rounds 1 --duration 2s) ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  [[ -n "$db" ]] && createdb -h 127.0.0.1 -U postgres "$db"
  "$BENCH" bench "${args[@]}" --server-bin "$server" --format json > "$OUT/run.json" 2> "$OUT/run.err" \
    || { echo "bench failed: $(tail -3 "$OUT/run.err")" >&2; [[ -n "$db" ]] && dropdb -h 127.0.0.1 -U postgres --if-exists "$db"; exit 1; }
  [[ -n "$db" ]] && dropdb -h 127.0.0.1 -U postgres --if-exists "$db"
  python3 - "$mode" "$OUT/run.json" <<'PY'
import json, sys
mode, d = sys.argv[1], json.load(open(sys.argv[2]))
if mode in ("failover-postgres", "cluster-failover"):
    head, second = d["failover_ms_p50"], d["failover_ms_max"]
    detail = f"max {second} ms, detect {d['detect_ms']} ms, {d['acked']} acked, {d['acked_lost']} lost, {d['duplicates']} dup"
elif mode == "cluster":
    head, second = d["forwarded_cpu_ratio"], d["forwarded_e2e_p99_ms"]
    detail = (f"net µs/msg forwarded {d['forwarded_net_cpu_us_per_msg']:.0f} local {d['local_net_cpu_us_per_msg']:.0f}, "
              f"e2e p99 forwarded {second:.2f} local {d['local_e2e_p99_ms']:.2f} ms")
else:
    rate = d["committed_per_s"]
    second = 1e6 * d["cpu_cores_server"] / rate if rate else 0
    head = {"fanout-sqlite": d["deliveries_per_s"], "latency-sqlite": d["e2e_p99_ms"], "halfsat-sqlite": d["e2e_p99_ms"], "latency-postgres": d["e2e_p99_ms"]}.get(mode, rate)
    detail = f"p50 {d['e2e_p50_ms']:.2f} ms, {second:.1f} µs server CPU/msg, other {d['cpu_cores_other']:.2f} cores"
print(head, second, detail)
PY
}

declare -A unit=([throughput-sqlite]="msg/s" [throughput-postgres]="msg/s" [fanout-sqlite]="deliveries/s" [latency-sqlite]="ms p99" [halfsat-sqlite]="ms p99" [latency-postgres]="ms p99" [failover-postgres]="ms p50" [cluster-failover]="ms p50" [cluster]="forwarded/local CPU")
declare -A second=([failover-postgres]="failover max" [cluster-failover]="failover max" [cluster]="forwarded e2e p99")
for mode in $MODES; do
  echo "== $mode ($DURATION each, $PAIRS pairs, A=$A B=$B)"
  figs_a=(); figs_b=(); sec_a=(); sec_b=()
  for i in $(seq "$PAIRS"); do
    read -r fa sa da < <(run "$mode" "$A")
    read -r fb sb db < <(run "$mode" "$B")
    figs_a+=("$fa"); figs_b+=("$fb"); sec_a+=("$sa"); sec_b+=("$sb")
    echo "pair $i: A $fa ${unit[$mode]} ($da)  B $fb ${unit[$mode]} ($db)"
  done
  python3 - "${second[$mode]:-server CPU per message}" "${figs_a[*]}" "${figs_b[*]}" "${sec_a[*]}" "${sec_b[*]}" <<'PY'
import statistics, sys
label = sys.argv[1]
fa, fb, sa, sb = ([float(x) for x in s.split()] for s in sys.argv[2:6])
med = statistics.median
ratios = [b / a for a, b in zip(fa, fb) if a]
seconds = [b / a for a, b in zip(sa, sb) if a]
print(f"medians: A {med(fa):.3f}  B {med(fb):.3f}  (B/A of medians {100 * med(fb) / med(fa):.1f} %)")
print(f"median of pair ratios B/A: figure {100 * med(ratios):.1f} %  {label} {100 * med(seconds):.1f} %")
PY
done
