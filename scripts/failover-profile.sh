#!/usr/bin/env bash
# What a cluster failover waits for, from the kill (issue 14): runs `stoa bench cluster` once
# (one short overhead round, then the failover of pair 2's 10,000 rooms) and, at the bench's
# `cluster: kill -9 of 2a now` line, samples for SECONDS_ seconds
#   - every process's CPU (the seven nodes by id, PostgreSQL's processes summed, the bench),
#     from /proc every SAMPLE seconds, as cores per interval (tick counts of 100 Hz: a 0.1 s
#     interval reads in steps of 0.1; samples that add up to more than the machine's cores mean
#     saturation) -> OUT/cpu.txt;
#   - with PGACT=1, PostgreSQL's running statements and what they wait on (pg_stat_activity of
#     the bench's databases, every 30 ms) -> OUT/pgact.txt;
#   - with PERF=1, a `perf record -g` of the backup node 2b -> OUT/perf-2b.data;
# then prints the bench's figures and the backup's takeover timeline from its log (the nodes
# log at `info`; the bench's files are kept, their folder named at the end).
#
#   STOA=target/release/stoa scripts/failover-profile.sh
#   STOA=… SAMPLE=0.05 PGACT=1 OUT=/tmp/fo scripts/failover-profile.sh -- --clients 2000
#
# Arguments after `--` go to `stoa bench cluster`. PostgreSQL as for the bench (--pg-url).
set -euo pipefail
cd "$(dirname "$0")/.."
STOA="${STOA:-target/release/stoa}"
OUT="${OUT:-$(mktemp -d)}"
SAMPLE="${SAMPLE:-0.1}"
SECONDS_="${SECONDS_:-4}"
[[ "${1:-}" == "--" ]] && shift
[[ -x "$STOA" ]] || { echo "$STOA not found: cargo build --release (or set STOA=…)" >&2; exit 1; }
mkdir -p "$OUT"

cat > "$OUT/sample.py" <<'PY'
import os, re, sys, time
interval, duration, bench = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
hz = os.sysconf("SC_CLK_TCK")
def processes():
    found = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        name = None
        if len(cmd) > 2 and cmd[1] == b"serve":
            ids = [m.group(1).decode() for c in cmd if (m := re.search(rb"/(\w+)\.toml$", c))]
            name = ids[0] if ids else None
        elif cmd and cmd[0].startswith(b"postgres"):
            name = "pg"
        elif int(p) == bench:
            name = "bench"
        if name:
            found.setdefault(name, []).append(int(p))
    return found
def ticks(pids):
    total = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total
procs = processes()
names = sorted(procs)
before = {n: ticks(procs[n]) for n in names}
start = time.time()
print("ms    " + " ".join(f"{n:>6}" for n in names) + "    sum")
while time.time() - start < duration:
    time.sleep(interval)
    procs["pg"] = processes().get("pg", [])  # backends come and go
    now = {n: ticks(procs.get(n, [])) for n in names}
    cores = [(now[n] - before[n]) / hz / interval for n in names]
    print(f"{(time.time() - start) * 1000:5.0f} " + " ".join(f"{c:6.2f}" for c in cores) + f" {sum(cores):6.2f}", flush=True)
    before = now
PY

at_kill() {
  local bench p2b
  bench="$(pgrep -n -f 'bench cluster' || echo 0)"
  python3 "$OUT/sample.py" "$SAMPLE" "$SECONDS_" "$bench" > "$OUT/cpu.txt" &
  if [[ "${PGACT:-0}" == 1 ]]; then
    echo "SELECT clock_timestamp()::time, state, wait_event_type, wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), 70)
          FROM pg_stat_activity WHERE datname LIKE 'stoa_bench%' AND state <> 'idle' \\watch 0.03" \
      | timeout "$SECONDS_" psql -U postgres -h 127.0.0.1 -At > "$OUT/pgact.txt" 2>&1 &
  fi
  if [[ "${PERF:-0}" == 1 ]]; then
    p2b="$(pgrep -f '/2b\.toml' | head -1)"
    perf record -g -F 999 -p "$p2b" -o "$OUT/perf-2b.data" -- sleep "$SECONDS_" > /dev/null 2>&1 &
  fi
}

"$STOA" bench cluster --rounds 1 --duration 2s --format json --server-bin "$STOA" --keep \
  --server-env STOA__LOG__LEVEL=info "$@" > "$OUT/bench.json" 2> "$OUT/bench.err" &
bench_job=$!
# Follow the bench's lines as they come, for the kill.
( tail -n +1 -f "$OUT/bench.err" --pid "$bench_job" | while IFS= read -r line; do
    if [[ "$line" == *"kill -9 of 2a now"* ]]; then at_kill; fi
  done ) &
wait "$bench_job" || { echo "the bench failed: $(tail -5 "$OUT/bench.err")" >&2; exit 1; }
sleep "$SECONDS_"
wait

grep -v 'clients joined' "$OUT/bench.err" | grep -v '^\s*$' || true
python3 - "$OUT/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["failover_ms_p50", "failover_ms_max", "detect_ms", "resent_found", "appends_redone", "rooms_followed", "acked_lost", "duplicates", "forwarded_cpu_ratio"]
print({k: d.get(k) for k in keys})
print("p50 by client node:", {n: v["p50"] for n, v in d.get("failover_ms_by_client_node", {}).items()})
PY
kept="$(sed -n 's/^bench files kept in //p' "$OUT/bench.err")"
if [[ -n "$kept" && -f "$kept/2b.log" ]]; then
  echo "2b's takeover (its log):"
  grep -E 'node link down node=2a|taking over|fenced and taken over|active rooms activated' "$kept/2b.log" | cut -c1-200
fi
echo "outputs in $OUT: cpu.txt$([[ ${PGACT:-0} == 1 ]] && echo ", pgact.txt")$([[ ${PERF:-0} == 1 ]] && echo ", perf-2b.data"); the nodes' files in $kept"
