#!/usr/bin/env bash
# What the dedupe stage adds to /v1/batch (100 events, unique messageIds): the same
# wrk run against fanout with dedupe on and off for the source, alternating, REPEATS
# times each. Server pinned to CPU 0, wrk to CPU 1; everything on 127.0.0.1.
# Usage: bench/dedupe-overhead.sh   (after cargo build --release; needs wrk)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
wrk_dir=${FANOUT_SHARED_DIR:-$root/../shared}/bench/wrk
REPEATS=${REPEATS:-3} DURATION=${DURATION:-15s} CONNS=${CONNS:-64} PORT=${PORT:-18080}
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

run() { # dedupe_enabled
  rm -rf "$work/data"
  { bench_config_head "$PORT" "$work/data" "dedupe = { enabled = $1 }"; cat <<TOML
[[destinations]]
name = "file"
kind = "file"
path = "$work/data/out.jsonl"
TOML
  } >"$work/config.toml"
  taskset -c 0 "$root/target/release/fanout" --config "$work/config.toml" 2>"$work/log" &
  pid=$!
  wait_port "$PORT"
  local t0 t1
  t0=$(cpu_ticks "$pid")
  taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --timeout 5s -s "$wrk_dir/batch.lua" "http://127.0.0.1:$PORT" >"$work/wrk" 2>&1
  t1=$(cpu_ticks "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  python3 - "$1" "$t0" "$t1" "$(getconf CLK_TCK)" "$(sed -n 's/^RESULT //p' "$work/wrk")" <<'PY'
import json, sys
on, t0, t1, tck, r = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])
cpu = (t1 - t0) / tck
print("| %-5s | %7.0f | %9.0f | %6.1f | %6.1f | %5.1f | %6.0f |" % (
    on, r["rps"], r["events_per_s"], r["p50_us"] / 1e3, r["p99_us"] / 1e3, cpu, cpu * 1e6 / (r["rps"] * r["duration_s"])))
PY
}

echo "| dedupe | req/s | events/s | p50 ms | p99 ms | server CPU s | server CPU µs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for _ in $(seq "$REPEATS"); do run true; run false; done
