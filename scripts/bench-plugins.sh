#!/usr/bin/env bash
# Node throughput with one no-op Wasm plugin on every room against the same node without
# plugins, measured in ONE run, alternating (none, noop, none, noop, ...) so that drift of this
# noisy machine hits both alike. Prints each run's committed/s, the medians and their ratio.
#
#   scripts/bench-plugins.sh                       # 3 pairs, 10 s each, stoa bench defaults
#   PAIRS=5 DURATION=20s scripts/bench-plugins.sh -- --rooms 64 --window 32
#
# Needs `target/release/stoa` (cargo build --release) and the wasm32-wasip2 target. Arguments
# after `--` go to `stoa bench throughput`.
set -euo pipefail
cd "$(dirname "$0")/.."
STOA="${STOA:-target/release/stoa}"
PAIRS="${PAIRS:-3}"
DURATION="${DURATION:-10s}"
[[ "${1:-}" == "--" ]] && shift
[[ -x "$STOA" ]] || { echo "$STOA not found: cargo build --release (or set STOA=…)" >&2; exit 1; }

(cd plugins && cargo build --release --target wasm32-wasip2 -p noop -q)
PLUGINS="$(mktemp -d)"
trap 'rm -rf "$PLUGINS"' EXIT
cp plugins/target/wasm32-wasip2/release/noop.wasm "$PLUGINS/noop.wasm"

run() { # $1 = none | noop, then the bench's arguments
  local mode="$1" extra=()
  shift
  if [[ "$mode" == noop ]]; then
    extra=(--server-set "plugins.dir=\"$PLUGINS\"" --server-set 'plugins.enabled=[{ name = "noop" }]')
  fi
  # committed/s, server CPU µs per message, cores used by other processes during the run
  "$STOA" bench throughput --duration "$DURATION" --format json "${extra[@]}" "$@" | python3 -c '
import json, sys
d = json.load(sys.stdin)
rate = d["committed_per_s"]
print(rate, 1e6 * d["cpu_cores_server"] / rate if rate else 0, d["cpu_cores_other"])'
}

none=(); noop=(); ratios=(); cpu=()
for i in $(seq "$PAIRS"); do
  read -r a a_us a_other < <(run none "$@")
  read -r b b_us b_other < <(run noop "$@")
  none+=("$a"); noop+=("$b")
  ratios+=("$(python3 -c "print(100*$b/$a)")"); cpu+=("$(python3 -c "print(100*$b_us/$a_us)")")
  printf 'pair %d: none %.0f/s (%.1f us server CPU/msg, other load %.2f cores)  noop plugin %.0f/s (%.1f us/msg, other %.2f)  throughput %.1f %%  CPU/msg %.1f %%\n' \
    "$i" "$a" "$a_us" "$a_other" "$b" "$b_us" "$b_other" "${ratios[-1]}" "${cpu[-1]}"
done
python3 - "${none[*]}" "${noop[*]}" "${ratios[*]}" "${cpu[*]}" <<'PY'
import statistics, sys
none, noop, ratios, cpu = ([float(x) for x in a.split()] for a in sys.argv[1:5])
a, b = statistics.median(none), statistics.median(noop)
print(f"medians: none {a:.0f}/s  noop plugin {b:.0f}/s  (ratio of medians {100*b/a:.1f} %)")
print(f"median of pair ratios: throughput {statistics.median(ratios):.1f} %  server CPU per message {statistics.median(cpu):.1f} %")
PY
