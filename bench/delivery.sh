#!/usr/bin/env bash
# Delivery engine figures (issue 5), everything on 127.0.0.1:
#  1. Fill: fanout with one webhook destination whose receiver is down; wrk loads
#     /v1/batch (100 events per request) until about MESSAGES messages are queued.
#     Reports fanout's RSS with that backlog behind the dead destination.
#  2. Drain: start the baseline `ack` server (reads each body, answers 200) as the
#     receiver and time until the destination's cursor reaches the end of the queue:
#     delivery throughput to a fast local receiver, in events/s.
# fanout on CPU 0, wrk and the receiver on CPU 1.
# (The ack server answers any POST /v1/*, hence the webhook path.)
# Usage: bench/delivery.sh   (needs wrk; builds fanout and the baseline in release)
# Env: MESSAGES (1000000), BATCH (batch.max_events, 500), CONCURRENCY (2),
#      ORDERING (true), ROUND (each wrk fill round, 5s),
#      KIND (webhook, or klaviyo: the same events translated and sent as Klaviyo bulk jobs
#      to the ack server, paced by Klaviyo's built-in limits; compare fanout CPU s; or
#      http: `kind = "http"` rendering a 7-field body per event into an `events` batch),
#      SCRIPT (the fill's wrk script; default the shared batch.lua, whose events all carry
#      one anonymousId, i.e. one user; bench/wrk/batch_users.lua spreads them over USERS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
MESSAGES=${MESSAGES:-1000000} BATCH=${BATCH:-500} CONCURRENCY=${CONCURRENCY:-2}
ORDERING=${ORDERING:-true} PORT=${PORT:-18080} SINK_PORT=${SINK_PORT:-18090}
ROUND=${ROUND:-5s} KIND=${KIND:-webhook} SCRIPT=${SCRIPT:-$shared/bench/wrk/batch.lua}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

(cd "$root" && cargo build --release -q)
CARGO_TARGET_DIR="$root/target/baseline" cargo build --release -q --manifest-path "$shared/bench/baseline/Cargo.toml"

{ bench_config_head "$PORT" "$work/data"; cat <<TOML
[[destinations]]
name = "hook"
$(if [ "$KIND" = klaviyo ]; then
  printf 'kind = "klaviyo"\napi_key_env = "KLAVIYO_BENCH_KEY"\nbase_url = "http://127.0.0.1:%s/v1"\n' "$SINK_PORT"
elif [ "$KIND" = http ]; then
  printf 'kind = "http"\nurl = "http://127.0.0.1:%s/v1/events"\n' "$SINK_PORT"
  printf '%s\n' 'body = { event = "{{ event }}", user_id = "{{ userId }}", device_id = "{{ anonymousId }}", insert_id = "{{ messageId }}", time = "{{ timestamp | unix_ms }}", revenue = "{{ properties.revenue | default(0) | number }}", properties = "{{ properties }}" }'
else
  printf 'kind = "webhook"\nurl = "http://127.0.0.1:%s/v1/hook"\n' "$SINK_PORT"
fi)
concurrency = $CONCURRENCY
ordering = $ORDERING
batch = { max_events = $BATCH, linger = "50ms"$(if [ "$KIND" = http ]; then printf ', body = { events = "{{ batch }}" }'; fi) }
retry = { initial_backoff = "100ms", max_backoff = "1s" }
TOML
} >"$work/config.toml"
KLAVIYO_BENCH_KEY=pk_bench taskset -c 0 "$root/target/release/fanout" --config "$work/config.toml" 2>"$work/log" &
fanout=$!; pids+=("$fanout")
wait_port "$PORT"

queue_end() { # end position of the log: newest segment's base + its length
  local last; last=$(ls "$work/data/queue" | sort -n | tail -1)
  echo $(( 10#${last%%.*} + $(stat -c %s "$work/data/queue/$last") ))
}
# The saved cursor's distance from the end of the log, as /metrics reports it.
lag() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_queue_lag_bytes\{destination="hook"\}/ {printf "%d", $2}'; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$fanout/status"; }

# 1. Fill: wrk in rounds of 5 s until the queue holds MESSAGES messages.
sent=0
while [ "$sent" -lt "$MESSAGES" ]; do
  taskset -c 1 wrk -t1 -c16 "-d$ROUND" --timeout 5s -s "$SCRIPT" "http://127.0.0.1:$PORT" >"$work/wrk" 2>&1
  r=$(sed -n 's/^RESULT //p' "$work/wrk")
  sent=$(( sent + $(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(int(r["events_per_s"]*r["duration_s"]))' "$r") ))
done
sleep 2
echo "queued: ~$sent messages, $(( $(queue_end) / 1048576 )) MiB of log; fanout RSS with the dead destination: $(rss_mb) MB"

# 2. Drain into the ack receiver.
ADDR="127.0.0.1:$SINK_PORT" taskset -c 1 "$root/target/baseline/release/ack" >/dev/null 2>&1 &
pids+=("$!")
start=$(date +%s.%N)
t0=$(cpu_ticks "$fanout")
until [ "$(lag)" = 0 ]; do sleep 0.1; done
t1=$(cpu_ticks "$fanout")
secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
cpu=$(python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) / float(sys.argv[3]):.2f}')" "$t0" "$t1" "$(getconf CLK_TCK)")
echo "drained $sent messages to $KIND in $secs s: $(python3 -c "print(int($sent / $secs))") events/s (batch $BATCH, concurrency $CONCURRENCY, ordering $ORDERING, $(basename "$SCRIPT")); fanout CPU $cpu s; RSS after: $(rss_mb) MB"
