#!/usr/bin/env bash
# Run a cargo-fuzz target until it has used a given amount of CPU time (not wall time), at
# nice 19, so that a run on a shared machine still gets its full budget (docs/fuzzing.md).
#
#   scripts/fuzz-cpu.sh TARGET [CPU_SECONDS]     # default 3600: one CPU-hour
#
# Needs the targets built first (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none
# --codegen-units 16). New inputs go to fuzz/corpus/TARGET, a crash to fuzz/artifacts/TARGET,
# libFuzzer's output to fuzz/logs/TARGET-<time>.log; the last lines printed are the final stats.
set -euo pipefail
target=${1:?usage: scripts/fuzz-cpu.sh TARGET [CPU_SECONDS]}
budget=${2:-3600}
cd "$(dirname "$0")/../fuzz"
bin=target/x86_64-unknown-linux-gnu/release/$target
[ -x "$bin" ] || { echo "no $bin: build the fuzz targets first" >&2; exit 2; }
mkdir -p "artifacts/$target" "corpus/$target" logs
log="logs/$target-$(date -u +%Y%m%dT%H%M%SZ).log"
tick=$(getconf CLK_TCK)
nice -n 19 "$bin" -max_len=65536 -timeout=10 -print_final_stats=1 \
  -artifact_prefix="artifacts/$target/" "corpus/$target" >"$log" 2>&1 &
pid=$!
cpu=0
while kill -0 "$pid" 2>/dev/null; do
  # utime + stime of the fuzzer process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
  cpu=$(awk -v t="$tick" '{printf "%d", ($14 + $15) / t}' "/proc/$pid/stat" 2>/dev/null || echo "$cpu")
  if [ "$cpu" -ge "$budget" ]; then
    kill -INT "$pid"
    break
  fi
  sleep 5
done
status=0
wait "$pid" || status=$?
echo "$target: ${cpu} CPU-seconds, libFuzzer exit status $status, log $log"
grep -E "stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added|Done|ERROR|SUMMARY" "$log" | tail -n 8 || true
