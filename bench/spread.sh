#!/usr/bin/env bash
# Delivery spread over instances (issue 32), everything on 127.0.0.1: a 3-node NATS
# cluster (JetStream, sync_interval always, the stream at 3 replicas), and for N = 1 and
# N = 3 fanout instances on a new stream each:
#  1. Fill: the webhook's receiver is down; wrk loads /v1/batch (100 events per request,
#     spread over USERS users, so over the partitions) through the instances in turn
#     until at least MESSAGES messages are accepted (fanout_events_total).
#  2. Drain: start the baseline `ack` server (reads each body, answers 200) as the
#     receiver; time until the destination's consumers have nothing pending nor
#     unacknowledged. Reports events/s, and per instance the messages it delivered and
#     its CPU (user + system, /proc/<pid>/stat) per delivered message during the drain.
# This 2-core machine cannot show 3x; the CPU per message shows the work is split.
# Usage: bench/spread.sh   (needs wrk, nats-server; builds fanout and the baseline)
# Env: MESSAGES (300000), COUNTS ("1 3": instance counts to run), USERS (10000),
#      BATCH (batch.max_events, 500), CONCURRENCY (2), ROUND (each wrk fill round, 5s),
#      PROFILE (release; debug for a quick smoke run with the debug build),
#      NATS_SERVER (nats-server; default FANOUT_NATS_VENV/bin/nats-server, else PATH),
#      FANOUT_CPUS (the CPUs the instances run on, taskset's list: 0; wrk and the receiver
#      run on CPU 1).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
MESSAGES=${MESSAGES:-300000} COUNTS=${COUNTS:-"1 3"} USERS=${USERS:-10000}
BATCH=${BATCH:-500} CONCURRENCY=${CONCURRENCY:-2} ROUND=${ROUND:-5s}
PROFILE=${PROFILE:-release} FANOUT_CPUS=${FANOUT_CPUS:-0} SINK_PORT=${SINK_PORT:-18090} BASE_PORT=${BASE_PORT:-18100}
NATS_SERVER=${NATS_SERVER:-${FANOUT_NATS_VENV:+$FANOUT_NATS_VENV/bin/nats-server}}
NATS_SERVER=${NATS_SERVER:-nats-server}
export USERS SEGMENT_LUA_DIR=${SEGMENT_LUA_DIR:-$shared/bench/wrk/}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if [ "$PROFILE" = release ]; then
  (cd "$root" && cargo build --release -q)
else
  (cd "$root" && cargo build -q)
fi
fanout_bin="$root/target/$PROFILE/fanout"
CARGO_TARGET_DIR="$root/target/baseline" cargo build --release -q --manifest-path "$shared/bench/baseline/Cargo.toml"

# The cluster: client ports BASE_PORT+0..2, routes +10..12, monitoring +20..22.
routes=""
for i in 0 1 2; do routes+="\"nats-route://127.0.0.1:$((BASE_PORT + 10 + i))\", "; done
servers=""
for i in 0 1 2; do
  cat >"$work/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((BASE_PORT + i))
http: 127.0.0.1:$((BASE_PORT + 20 + i))
jetstream { store_dir: "$work/n$i", sync_interval: always, max_file_store: 100GB }
cluster { name: spread_bench, listen: 127.0.0.1:$((BASE_PORT + 10 + i)), routes: [${routes%, }] }
CONF
  "$NATS_SERVER" -c "$work/n$i.conf" 2>"$work/n$i.log" &
  pids+=("$!")
  servers+="\"nats://127.0.0.1:$((BASE_PORT + i))\", "
done
for i in 0 1 2; do wait_port "$((BASE_PORT + i))"; done
until curl -sf "http://127.0.0.1:$((BASE_PORT + 20))/jsz" | grep -q '"leader": *"n'; do sleep 0.2; done

# Instance $2 of the run on stream $1: its config, listening on 18080 + $2.
config() {
  bench_config_head "$((18080 + $2))" "$work/$1-$2"
  cat <<TOML
[queue]
backend = "nats"
servers = [${servers%, }]
stream = "$1"
replicas = 3

[[destinations]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:$SINK_PORT/v1/hook"
concurrency = $CONCURRENCY
batch = { max_events = $BATCH, linger = "50ms" }
retry = { initial_backoff = "100ms", max_backoff = "1s" }
TOML
}

# Sum of metric $2 (labels $3…) over the instances listening on ports in $1.
sum_metric() {
  local ports=$1 name=$2 total=0; shift 2
  for port in $ports; do
    curl -s "http://127.0.0.1:$port/metrics" >"$work/scrape"
    total=$((total + $(metric_sum "$work/scrape" "$name" "$@")))
  done
  echo "$total"
}

for count in $COUNTS; do
  stream="spread_n$count"
  ports="" instances=()
  for i in $(seq 0 $((count - 1))); do
    config "$stream" "$i" >"$work/$stream-$i.toml"
    taskset -c "$FANOUT_CPUS" "$fanout_bin" --config "$work/$stream-$i.toml" 2>"$work/$stream-$i.log" &
    instances+=("$!"); pids+=("$!"); ports+="$((18080 + i)) "
  done
  # Start-up on a new stream takes a few seconds (stream, consumers, buckets at R3).
  for port in $ports; do until wait_port "$port" 2>/dev/null; do :; done; done
  # Every instance sees the others (and so holds its share) before the fill.
  for port in $ports; do
    until [ "$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^fanout_queue_instances / {print $2}')" = "$count" ]; do sleep 0.2; done
  done

  # 1. Fill, through the instances in turn.
  sent=0 turn=0 ports_array=($ports)
  while [ "$sent" -lt "$MESSAGES" ]; do
    port=${ports_array[$((turn % count))]}; turn=$((turn + 1))
    taskset -c 1 wrk -t1 -c16 "-d$ROUND" --timeout 5s -s "$root/bench/wrk/batch_users.lua" "http://127.0.0.1:$port" >"$work/wrk" 2>&1
    sent=$(sum_metric "$ports" fanout_events_total 'outcome="accepted"')
  done
  # Requests wrk left in flight at its end are still stored: count them too.
  sleep 2
  sent=$(sum_metric "$ports" fanout_events_total 'outcome="accepted"')

  # 2. Drain into the ack receiver.
  declare -A cpu0=() ok0=()
  for i in $(seq 0 $((count - 1))); do
    cpu0[$i]=$(cpu_ticks "${instances[$i]}")
    ok0[$i]=$(sum_metric "$((18080 + i))" fanout_deliveries_total 'destination="hook"' 'outcome="ok"')
  done
  ADDR="127.0.0.1:$SINK_PORT" taskset -c 1 "$root/target/baseline/release/ack" >/dev/null 2>&1 &
  sink=$!; pids+=("$sink")
  start=$(date +%s.%N)
  first=${ports_array[0]}
  until [ "$(sum_metric "$ports" fanout_deliveries_total 'destination="hook"' 'outcome="ok"')" -ge "$sent" ] &&
        [ "$(sum_metric "$first" fanout_queue_consumer_pending 'destination="hook"')" = 0 ] &&
        [ "$(sum_metric "$first" fanout_queue_consumer_ack_pending 'destination="hook"')" = 0 ]; do
    sleep 0.2
  done
  secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
  delivered=0 lines=""
  for i in $(seq 0 $((count - 1))); do
    ok=$(( $(sum_metric "$((18080 + i))" fanout_deliveries_total 'destination="hook"' 'outcome="ok"') - ok0[$i] ))
    ticks=$(( $(cpu_ticks "${instances[$i]}") - cpu0[$i] ))
    delivered=$((delivered + ok))
    lines+=$(python3 -c "import sys; ok, t, hz = map(float, sys.argv[1:4]); print(f'  instance {sys.argv[4]}: {int(ok)} delivered, CPU {t / hz:.2f} s, {1e6 * t / hz / ok if ok else 0:.1f} us per message')" "$ok" "$ticks" "$(getconf CLK_TCK)" "$i")$'\n'
  done
  echo "$count instance(s): drained $sent accepted messages ($delivered deliveries) to the webhook in $secs s: $(python3 -c "print(int($delivered / $secs))") events/s (batch $BATCH, concurrency $CONCURRENCY, 3-node cluster, R3)"
  printf '%s' "$lines"
  kill "$sink" "${instances[@]}" 2>/dev/null || true
  wait "$sink" "${instances[@]}" 2>/dev/null || true
  unset cpu0 ok0
done
