#!/usr/bin/env bash
# Interleaved A/B of fanout builds on one wrk script: round after round, each binary in turn
# is started fresh (new data dir, one file destination, dedupe on; batch_gzip on a second
# source with dedupe off) pinned to SERVER_CPU, warmed up 2 s, then measured with
# `wrk -t1 -c$CONNS` pinned to CLIENT_CPU. One line per run: req/s, p99, the server's CPU per
# request and the file destination's lag when the load stops. Run-to-run spread on this VM is
# ±10 %: compare medians over several rounds, never one run.
#
# Usage: bench/interleave.sh ROUNDS SCRIPT BIN...     e.g. bench/interleave.sh 3 track /tmp/fanout-before target/release/fanout
# Env:   DURATION (8s)  CONNS (64)  PORT (18090)  SERVER_CPU (0)  CLIENT_CPU (1)
#        A BIN may be a wrapper script that sets environment variables and execs fanout.
set -euo pipefail
case ${1:-} in -h | --help | "") sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
wrk_dir=${FANOUT_SHARED_DIR:-$root/../shared}/bench/wrk
rounds=$1 script=$2
shift 2
DURATION=${DURATION:-8s} CONNS=${CONNS:-64} PORT=${PORT:-18090}
SERVER_CPU=${SERVER_CPU:-0} CLIENT_CPU=${CLIENT_CPU:-1}
key=WRITEKEY
[ "$script" = batch_gzip ] && key=WRITEKEY_NODEDUPE
for _ in $(seq "$rounds"); do
  for bin in "$@"; do
    dir=$(mktemp -d /tmp/fanout-interleave.XXXXXX)
    {
      bench_config_head "$PORT" "$dir/data" "" 'max_in_flight = 4096'
      printf '[[sources]]\nname = "nodedupe"\nwrite_keys = ["WRITEKEY_NODEDUPE"]\ndedupe = { enabled = false }\n\n'
      printf '[[destinations]]\nname = "file"\nkind = "file"\npath = "%s/out.jsonl"\n' "$dir"
    } >"$dir/config.toml"
    taskset -c "$SERVER_CPU" "$bin" --config "$dir/config.toml" 2>"$dir/server.log" &
    pid=$!
    wait_port "$PORT" || { cat "$dir/server.log"; exit 1; }
    run() { WRITE_KEY=$key taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"$1" --latency -s "$wrk_dir/$script.lua" "http://127.0.0.1:$PORT"; }
    run 2s >/dev/null
    before=$(cpu_ticks "$pid")
    out=$(run "$DURATION")
    after=$(cpu_ticks "$pid")
    lag=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_queue_lag_bytes/ {s += $NF} END {printf "%.1f", s / 1e6}')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    echo "$out" | awk -v bin="$(basename "$bin")" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v lag="$lag" '
      /Requests\/sec/ {rps = $2} $1 == "99%" {p99 = $2} /requests in/ {n = $1}
      END {printf "%-24s %8.0f req/s  p99 %8s  %6.1f CPU us/req  lag %s MB\n", bin, rps, p99, ticks / hz * 1e6 / n, lag}'
    sleep 1
  done
done
