#!/usr/bin/env bash
# Destination-function figures (issue 28, "Speed"), everything on 127.0.0.1: fanout with
# one `kind = "function"` destination whose JavaScript `fetch`es to the baseline `ack`
# server (reads each body, answers 200), reached as https://sink.bench through
# `fetch_hosts`. For each variant in MODES:
#  1. Fill: ack is down (each call's fetch fails and is retried with backoff); wrk loads
#     /v1/batch (100 events per request) until about MESSAGES messages are queued.
#  2. Drain: start ack and time until the destination's cursor reaches the end of the
#     queue; reports events/s and fanout's CPU per event over the drain.
# Variants: `each`  onTrack(event) fetches once per event (one message per call, the
#                   default shape of a destination function);
#           `batch` onBatch(events) posts each batch of BATCH events in one fetch.
# fanout on CPU 0, wrk and ack on CPU 1.
# Usage: bench/function_destination.sh   (needs wrk; builds fanout and the baseline in release)
# Env: MESSAGES (100000), MODES ("each batch"), BATCH (onBatch's batch.max_events, 100; at
#      most 400), CONCURRENCY (2: a function's calls run one at a time on its thread; a
#      second batch waits ready behind the first), ORDERING (true), ROUND (each wrk fill
#      round, 5s), SCRIPT (the fill's wrk script; default the shared batch.lua, one user;
#      bench/wrk/batch_users.lua spreads the events over USERS),
#      FANOUT_BIN (a fanout binary instead of building the release one: smoke runs only,
#      a debug build's figures mean nothing).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
MESSAGES=${MESSAGES:-100000} MODES=${MODES:-each batch} BATCH=${BATCH:-100}
CONCURRENCY=${CONCURRENCY:-2} ORDERING=${ORDERING:-true} ROUND=${ROUND:-5s}
PORT=${PORT:-18080} SINK_PORT=${SINK_PORT:-18090} SCRIPT=${SCRIPT:-$shared/bench/wrk/batch.lua}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if [ -n "${FANOUT_BIN:-}" ]; then
  fanout_bin=$FANOUT_BIN
else
  (cd "$root" && cargo build --release -q)
  fanout_bin=$root/target/release/fanout
fi
CARGO_TARGET_DIR="$root/target/baseline" cargo build --release -q --manifest-path "$shared/bench/baseline/Cargo.toml"

# The function for variant $1, written to $2.
write_function() {
  case $1 in
    each) cat >"$2" <<'JS'
async function onTrack(event, settings) {
  const res = await fetch(settings.url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(event),
  });
  if (!res.ok) throw new RetryError('sink answered ' + res.status);
}
JS
    ;;
    batch) cat >"$2" <<'JS'
async function onBatch(events, settings) {
  const res = await fetch(settings.url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ batch: events }),
  });
  if (!res.ok) throw new RetryError('sink answered ' + res.status);
}
JS
    ;;
    *) echo "unknown mode $1 (each or batch)" >&2; return 1 ;;
  esac
}

# The saved cursor's distance from the end of the log, as /metrics reports it.
lag() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_queue_lag_bytes\{destination="fn"\}/ {printf "%d", $2}'; }

for mode in $MODES; do
  dir=$work/$mode
  mkdir -p "$dir/functions"
  write_function "$mode" "$dir/functions/fn.js"
  max_events=1
  [ "$mode" = batch ] && max_events=$BATCH
  { bench_config_head "$PORT" "$dir/data"; cat <<TOML
[[destinations]]
name = "fn"
kind = "function"
file = "functions/fn.js"
settings = { url = "https://sink.bench/v1/hook" }
fetch_hosts = { "sink.bench" = "http://127.0.0.1:$SINK_PORT" }
concurrency = $CONCURRENCY
ordering = $ORDERING
batch = { max_events = $max_events, linger = "50ms" }
retry = { initial_backoff = "100ms", max_backoff = "1s" }
TOML
  } >"$dir/config.toml"
  taskset -c 0 "$fanout_bin" --config "$dir/config.toml" 2>"$dir/log" &
  fanout=$!; pids+=("$fanout")
  wait_port "$PORT"

  # 1. Fill: wrk in rounds until the queue holds MESSAGES messages.
  sent=0
  while [ "$sent" -lt "$MESSAGES" ]; do
    taskset -c 1 wrk -t1 -c16 "-d$ROUND" --timeout 5s -s "$SCRIPT" "http://127.0.0.1:$PORT" >"$dir/wrk" 2>&1
    r=$(sed -n 's/^RESULT //p' "$dir/wrk")
    sent=$(( sent + $(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(int(r["events_per_s"]*r["duration_s"]))' "$r") ))
  done
  sleep 1

  # 2. Drain into the ack server.
  ADDR="127.0.0.1:$SINK_PORT" taskset -c 1 "$root/target/baseline/release/ack" >/dev/null 2>&1 &
  sink=$!; pids+=("$sink")
  start=$(date +%s.%N)
  t0=$(cpu_ticks "$fanout")
  until [ "$(lag)" = 0 ]; do sleep 0.1; done
  t1=$(cpu_ticks "$fanout")
  end=$(date +%s.%N)
  curl -s "http://127.0.0.1:$PORT/metrics" >"$dir/metrics"
  ok=$(metric_sum "$dir/metrics" fanout_deliveries_total 'destination="fn"' 'outcome="ok"')
  dead=$(metric_sum "$dir/metrics" fanout_deliveries_total 'destination="fn"' 'outcome="dead_lettered"')
  python3 - "$mode" "$sent" "$start" "$end" "$t0" "$t1" "$(getconf CLK_TCK)" "$ok" "$dead" "$max_events" <<'PY'
import sys
mode, sent, start, end, t0, t1, tck, ok, dead, batch = sys.argv[1:]
secs = float(end) - float(start)
cpu = (float(t1) - float(t0)) / float(tck)
# All deliveries happen in the drain: the sink was down before.
done = max(int(ok), 1)
print(f"{mode}: delivered {ok} messages (wrk sent ~{sent}; dead-lettered {dead}) in "
      f"{secs:.2f} s: {done / secs:.0f} events/s; fanout CPU {cpu:.2f} s = "
      f"{cpu / done * 1e6:.1f} µs per event (batch {batch})")
PY
  kill "$sink" "$fanout"; wait "$sink" "$fanout" 2>/dev/null || true
done
