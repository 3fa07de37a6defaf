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
  "$STOA" bench throughput --duration "$DURATION" --format json "${extra[@]}" "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["committed_per_s"])'
}

none=(); noop=()
for i in $(seq "$PAIRS"); do
  a="$(run none "$@")"; b="$(run noop "$@")"
  none+=("$a"); noop+=("$b")
  printf 'pair %d: none %.0f/s  noop plugin %.0f/s  (%.1f %%)\n' "$i" "$a" "$b" "$(python3 -c "print(100*$b/$a)")"
done
python3 - "${none[*]}" "${noop[*]}" <<'PY'
import statistics, sys
none = [float(x) for x in sys.argv[1].split()]
noop = [float(x) for x in sys.argv[2].split()]
a, b = statistics.median(none), statistics.median(noop)
print(f"median: none {a:.0f}/s  noop plugin {b:.0f}/s  ratio {100*b/a:.1f} %")
PY
