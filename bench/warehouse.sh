#!/usr/bin/env bash
# Warehouse loading figures (issue 29), everything on 127.0.0.1: fanout with one
# `kind = "postgres"` destination loading a local PostgreSQL (a fresh cluster in a
# temporary directory, run as the `postgres` user when root); wrk posts /v1/batch
# (100 track events per request) at 64 connections for DURATION, then the script waits
# until the destination's cursor reaches the end of the queue.
# Reports: ingest rate (wrk), the lag left when wrk stopped, rows per second into the
# warehouse (rows in `tracks` over the time from the first request to the drain), and
# fanout's CPU per event (user + system over the whole run / rows; ingest included).
# MODE=drain instead fills the queue with Postgres stopped (the destination retrying),
# then starts it and reports the drain alone: rows/s and fanout's CPU per event for the
# destination (no ingest in it).
# MODE=paced offers a steady RATE events/s instead (bench/wrk/batch_paced.lua: each
# connection pauses between requests) and samples the lag every second: a destination
# that keeps up holds it at a few batches; one that does not grows it for the whole run.
# fanout on CPU 0, wrk on CPU 1, Postgres unpinned.
# Usage: bench/warehouse.sh   (needs wrk and Debian's postgresql; builds fanout in release)
# Env: MODE (live, drain or paced; live), RATE (paced: events/s offered, 50000), DURATION (wrk's run, 20s), BATCH (batch.max_events, 10000), CONCURRENCY (2),
#      CONNECTIONS (wrk's, 64), PG_BIN (directory of initdb/pg_ctl; default the newest
#      /usr/lib/postgresql/*/bin), FANOUT_BIN (a fanout binary to run instead of building
#      the release one: for a smoke run only, a debug build's figures mean nothing),
#      KEEP (set: print fanout's log and wrk's output at the end).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
MODE=${MODE:-live} RATE=${RATE:-50000} DURATION=${DURATION:-20s} BATCH=${BATCH:-10000} CONCURRENCY=${CONCURRENCY:-2}
CONNECTIONS=${CONNECTIONS:-64} PORT=${PORT:-18080} PG_PORT=${PG_PORT:-15432}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -f "$shared/bench/wrk/batch.lua" ] || { echo "no $shared/bench/wrk/batch.lua (set FANOUT_SHARED_DIR)" >&2; exit 1; }
[ -x "$PG_BIN/initdb" ] || { echo "no initdb in '$PG_BIN' (apt-get install postgresql, or set PG_BIN)" >&2; exit 1; }
work=$(mktemp -d)
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$work"; as_pg=(runuser -u postgres --); fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap "cat \"$work/log\" \"$work/wrk\" >&2; cleanup" EXIT

if [ -z "${FANOUT_BIN:-}" ]; then
  (cd "$root" && cargo build --release -q)
  FANOUT_BIN=$root/target/release/fanout
fi

"${as_pg[@]}" "$PG_BIN/initdb" -D "$work/pg" -U postgres --auth=trust -E UTF8 >/dev/null
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $work" start >/dev/null
pg_ctl_() { "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w "$@" >/dev/null; }
psql_q() { psql -qtA "postgres://postgres@127.0.0.1:$PG_PORT/postgres" -c "$1"; }

mkdir -p "$work/data"
{ bench_config_head "$PORT" "$work/data"; cat <<TOML
[[destinations]]
name = "warehouse"
kind = "postgres"
url_env = "WAREHOUSE_URL"
concurrency = $CONCURRENCY
batch = { max_events = $BATCH, linger = "200ms" }
retry = { initial_backoff = "100ms", max_backoff = "1s" }
TOML
} >"$work/config.toml"
WAREHOUSE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres?sslmode=disable" \
  taskset -c 0 "$FANOUT_BIN" --config "$work/config.toml" 2>"$work/log" &
fanout=$!; pids+=("$fanout")
wait_port "$PORT"

lag() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_queue_lag_bytes\{destination="warehouse"\}/ {printf "%d", $2}'; }

[ "$MODE" = drain ] && pg_ctl_ -m fast stop
start=$(date +%s.%N)
t0=$(cpu_ticks "$fanout")
script=$shared/bench/wrk/batch.lua
if [ "$MODE" = paced ]; then
  # Each of the connections sends one 100-event request every PAUSE_MS.
  export PAUSE_MS=${PAUSE_MS:-$((1000 * CONNECTIONS * 100 / RATE))} SEGMENT_LUA_DIR=$shared/bench/wrk/
  script=$root/bench/wrk/batch_paced.lua
  (while sleep 1; do lag; echo; done) >"$work/lags" &
  pids+=("$!")
fi
taskset -c 1 wrk -t1 "-c$CONNECTIONS" "-d$DURATION" --timeout 5s -s "$script" \
  "http://127.0.0.1:$PORT" >"$work/wrk" 2>&1
ingest=$(sed -n 's/^RESULT //p' "$work/wrk")
lag_after_wrk=$(lag)
if [ "$MODE" = paced ]; then
  kill "${pids[-1]}"
  echo "lag each second while wrk ran (MiB): $(awk '$1 != "" {printf "%.1f ", $1 / 1048576}' "$work/lags")"
fi
if [ "$MODE" = drain ]; then
  # The log's dirty pages written back first: the kernel's writeback would otherwise
  # share the cores with the drain and move its figures by 10-20 %.
  sync
  pg_ctl_ -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $work" start
  start=$(date +%s.%N)
  t0=$(cpu_ticks "$fanout")
  s0=$(awk '{print $15}' "/proc/$fanout/stat")
fi
until [ "$(lag)" = 0 ]; do sleep 0.1; done
t1=$(cpu_ticks "$fanout")
s1=$(awk '{print $15}' "/proc/$fanout/stat")
secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
rows=$(psql_q "SELECT count(*) FROM bench.tracks")
dead=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_deliveries_total\{.*outcome="dead_lettered"/ {s += $2} END {printf "%d", s}')
python3 - "$ingest" "$lag_after_wrk" "$secs" "$rows" "$t0" "$t1" "$(getconf CLK_TCK)" "$dead" "$MODE" "${s0:-0}" "${s1:-0}" <<'PY'
import json, sys
ingest, lag, secs, rows, t0, t1, tck, dead, mode, s0, s1 = sys.argv[1:]
what = "load alone: the drain" if mode == "drain" else "ingest + load"
r = json.loads(ingest) if ingest else {}
rows, secs = int(rows), float(secs)
cpu = (float(t1) - float(t0)) / float(tck)
print(f"ingest: {r.get('events_per_s', 0):.0f} events/s for {r.get('duration_s', 0):.1f} s (wrk); "
      f"lag when wrk stopped: {int(lag or 0) / 1048576:.1f} MiB")
print(f"warehouse: {rows} rows in tracks in {secs:.2f} s = {rows / secs:.0f} events/s; "
      f"fanout CPU {cpu:.2f} s = {cpu / max(rows, 1) * 1e6:.2f} us/event ({what}); "
      f"dead-lettered: {dead}")
if mode == "drain":
    system = (float(s1) - float(s0)) / float(tck)
    print(f"of which system (kernel) {system / max(rows, 1) * 1e6:.2f} us/event")
PY
