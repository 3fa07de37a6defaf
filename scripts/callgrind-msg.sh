#!/usr/bin/env bash
# Instructions the server executes per durable message, counted by callgrind: a figure that does
# not drift with the machine or its other load (issue 13). For each binary: a dev-mode server
# (SQLite FULL, loopback ports chosen here) runs under `valgrind --tool=callgrind` with
# instrumentation off; a warm-up `stoa bench latency` run sets up; then instrumentation is turned
# on for one measured run of SHORT and one of LONG seconds at RATE msg/s (100 rooms x 2
# occupants), each on a fresh server. Per message = (Ir(LONG) - Ir(SHORT)) / (acks(LONG) -
# acks(SHORT)): the set-up of the measured run (logins, joins) cancels out.
#
#   scripts/callgrind-msg.sh /work/stoa-before target/release/stoa
#   RATE=100 SHORT=5 LONG=10 scripts/callgrind-msg.sh BIN...
#
# Under valgrind the server runs tens of times slower, on one thread at a time: keep RATE low
# (100 msg/s is about half a core under callgrind), so this is the cost of a message committed
# nearly alone (about one message per transaction), not of one in a large batch. How many
# messages share a transaction still follows timing, so repeated runs differ by a few per cent
# (two runs of one binary: 236,271 and 239,157 per message): compare binaries over several runs.
set -euo pipefail
RATE="${RATE:-100}"
SHORT="${SHORT:-5}"
LONG="${LONG:-10}"
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
[[ $# -ge 1 ]] || { echo "usage: $0 STOA_BINARY..." >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One measured run: binary, seconds. Prints "acks Ir".
measure() {
  local bin="$1" secs="$2" dir client admin xmpp vpid
  dir="$(mktemp -d)"
  client="$(free_port)"; admin="$(free_port)"; xmpp="$(free_port)"
  STOA__NODE__DATA_DIR="$dir" STOA__LISTEN__CLIENT="127.0.0.1:$client" STOA__LISTEN__ADMIN="127.0.0.1:$admin" \
  STOA__XMPP__C2S="127.0.0.1:$xmpp" \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg.out" "$bin" serve > "$dir/serve.log" 2>&1 &
  vpid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$admin/health" >/dev/null 2>&1 && break; sleep 0.5; done
  curl -sf "http://127.0.0.1:$admin/health" >/dev/null || { echo "server did not start: $(tail -5 "$dir/serve.log")" >&2; kill "$vpid"; exit 1; }
  "$bin" bench latency --url "ws://127.0.0.1:$client/ws" --total-rate "$RATE" --duration 2s --warmup 1s --format json > "$dir/warm.json" 2>/dev/null
  callgrind_control -i on "$vpid" >/dev/null 2>&1
  "$bin" bench latency --url "ws://127.0.0.1:$client/ws" --total-rate "$RATE" --duration "${secs}s" --warmup 1s --format json > "$dir/run.json" 2>/dev/null
  callgrind_control -i off "$vpid" >/dev/null 2>&1
  callgrind_control -d "$vpid" >/dev/null 2>&1
  kill "$vpid"; wait "$vpid" 2>/dev/null || true
  python3 - "$dir" <<'PY'
import glob, json, re, sys
d = sys.argv[1]
acks = json.load(open(f"{d}/run.json"))["acks"]
ir = 0
for f in glob.glob(f"{d}/cg.out*"):
    for line in open(f, errors="replace"):
        m = re.match(r"totals: (\d+)", line)
        if m:
            ir += int(m.group(1))
print(acks, ir)
PY
  rm -rf "$dir"
}

for bin in "$@"; do
  read -r a1 i1 < <(measure "$bin" "$SHORT")
  read -r a2 i2 < <(measure "$bin" "$LONG")
  python3 -c "import sys; a1,i1,a2,i2=map(int,sys.argv[2:]); print(f'{sys.argv[1]}: {(i2-i1)/(a2-a1):,.0f} instructions per message ({a1} and {a2} acks, {i1:,} and {i2:,} instructions)')" "$bin" "$a1" "$i1" "$a2" "$i2"
done
