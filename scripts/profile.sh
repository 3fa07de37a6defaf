#!/usr/bin/env bash
# Where the server's CPU goes under a fixed message rate: runs `stoa bench latency` at a fixed
# total rate (default 8,000 msg/s, 100 rooms x 2 occupants, SQLite FULL) and samples the server
# process with `perf record` (the software cpu-clock event: this VM has no hardware counters)
# during the measured window, then prints the time by thread name and by symbol.
#
#   cargo build --profile profiling && scripts/profile.sh
#   STOA=target/release/stoa RATE=16000 SECONDS_=8 scripts/profile.sh -- --store postgres://...
#
# The release build keeps its symbols (no line tables: flat profile by function); the
# `profiling` build adds line tables. Arguments after `--` go to `stoa bench latency`.
# Needs `perf` (linux-perf) and kernel.perf_event_paranoid <= 2 for one's own processes.
set -euo pipefail
cd "$(dirname "$0")/.."
STOA="${STOA:-target/profiling/stoa}"
RATE="${RATE:-8000}"
SECONDS_="${SECONDS_:-8}"
[[ "${1:-}" == "--" ]] && shift
[[ -x "$STOA" ]] || { echo "$STOA not found: cargo build --profile profiling (or set STOA=…)" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
OUT="$(mktemp -d)"
trap '[[ -n "${KEEP:-}" ]] && cp "$OUT/perf.data" "$KEEP"; rm -rf "$OUT"' EXIT

# The bench warms up for 2 s before its window; sample inside the window.
"$STOA" bench latency --total-rate "$RATE" --duration "$((SECONDS_ + 4))s" --format json "$@" > "$OUT/summary.json" 2> "$OUT/bench.err" &
bench=$!
server=""
for _ in $(seq 100); do
  server="$(pgrep -P "$bench" -f " serve" || true)"
  [[ -n "$server" ]] && break
  sleep 0.1
done
[[ -n "$server" ]] || { echo "no server process found: $(tail -3 "$OUT/bench.err")" >&2; kill "$bench" 2>/dev/null; exit 1; }
sleep 4
perf record -e cpu-clock -F 1999 -p "$server" -o "$OUT/perf.data" -- sleep "$SECONDS_" 2> "$OUT/perf.err"
wait "$bench"
python3 - "$OUT/summary.json" "$SECONDS_" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rate = d["committed_per_s"]
print(f"load: {rate:.0f} msg/s committed, {d['deliveries_per_s']:.0f} deliveries/s, e2e p50 {d['e2e_p50_ms']:.2f} / p99 {d['e2e_p99_ms']:.2f} ms, "
      f"server {d['cpu_cores_server']:.2f} cores = {1e6 * d['cpu_cores_server'] / rate:.1f} us of CPU per message")
PY
echo
echo "== server CPU by thread (perf samples, % of the server's)"
perf report -i "$OUT/perf.data" --stdio --sort comm 2> /dev/null | grep -E '^ +[0-9]' | sed -E 's/[ -]+$//' | head -15
echo
echo "== top functions (% of the server's samples)"
perf report -i "$OUT/perf.data" --stdio --sort dso,symbol 2> /dev/null | grep -E '^ +[0-9]' | sed -E 's/[ -]+$//' | head -40
