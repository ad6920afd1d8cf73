#!/usr/bin/env bash
# Ingest benchmark of fanout against the `parse` baseline (issue 8). Everything on 127.0.0.1.
#
# For every wrk script x connection count, each server in turn (fanout, then parse) is started
# fresh and pinned to SERVER_CPU: fanout with a new data dir, one `file` destination and dedupe
# on. A 2 s wrk warm-up (not counted) is followed by the measured run. wrk runs pinned to
# CLIENT_CPU with one thread. Afterwards the script reads the server's CPU time and RSS and stops
# the server by PID. For fanout it also checks that the file destination kept up: its lag when
# the load stops, then, once it has drained, lines delivered vs messages accepted. The output is
# a table with req/s, events/s, p50/p99, server CPU, CPU µs/req, RSS and fanout ÷ parse next to
# the issue's targets. A sidecar section adds idle RSS, stripped binary size and start → first 200.
#
# batch_gzip.lua re-sends one body, so its messageIds repeat. fanout therefore takes it on a
# second source with dedupe off (write key WRITEKEY_NODEDUPE). Otherwise every request after the
# first would go down the duplicate path.
#
# Servers: `fanout` (the local log), `fanout_nats1` and `fanout_nats3` (the same fanout on the
# NATS JetStream backend: one node, or three nodes with replicas = 3; every node with
# `sync_interval: always`, so each 200 is fsynced on a quorum; the nodes are not pinned and share
# both CPUs), `parse` (the baseline), `parse_append` (the baseline answering after an append
# and fdatasync on a writer thread, every COMMIT_MS (default 10): the durable floor).
# NATS rows also show events/s ÷ the local backend's.
#
# Usage: bench/run.sh               the table (3 scripts x 2 conns x 2 servers x (2 s + DURATION),
#                                   plus fanout's drains: about 5 min) and the sidecar section
#        LONG=600s bench/run.sh     only the long run: batch.lua at 64 connections for that long,
#                                   sampling fanout's RSS and queue lag every LONG_EVERY seconds
#                                   (LONG_DEDUPE=0: on the dedupe-off source)
# Env:   DURATION (15s)  CONNS ("16 64")  SCRIPTS ("track batch batch_gzip")
#        SERVERS ("fanout parse"; add fanout_nats1 fanout_nats3 parse_append)  NATS_SERVER (nats-server
#        binary; default target/nats-venv/bin/nats-server, which scripts/test installs)  PORT (18080)  SERVER_CPU (0)  CLIENT_CPU (1)
#        SKIP_BUILD=1 (use the binaries already built)  FANOUT_BIN (another fanout binary, e.g.
#        a copy of an earlier build, to compare; implies nothing about SKIP_BUILD)  SIDECAR=0 (skip the sidecar section)
#        VIEWER=1 (fanout runs with one live-view viewer attached: curl reading
#        /debugger/events on CLIENT_CPU for the whole run)
#        DRAIN_TIMEOUT (60, seconds to wait for the file destination)  LONG_EVERY (10, seconds)
# Output: bench/results/<UTC timestamp>/: table.md, results.jsonl (one raw record per run),
#         sidecar.json, long.* (LONG mode), logs/ (wrk output, /metrics scrapes, server logs).
set -euo pipefail
case ${1:-} in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
wrk_dir=$shared/bench/wrk
fanout_bin=${FANOUT_BIN:-$root/target/release/fanout}
parse_bin=$shared/bench/baseline/target/release/parse
parse_append_bin=$shared/bench/baseline/target/release/parse_append

DURATION=${DURATION:-15s}
CONNS=${CONNS:-"16 64"}
SCRIPTS=${SCRIPTS:-"track batch batch_gzip"}
SERVERS=${SERVERS:-"fanout parse"}
NATS_SERVER=${NATS_SERVER:-$root/target/nats-venv/bin/nats-server}
PORT=${PORT:-18080}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
SIDECAR=${SIDECAR:-1}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60}
LONG=${LONG:-}
LONG_EVERY=${LONG_EVERY:-10}
CLK_TCK=$(getconf CLK_TCK)

work=$(mktemp -d /tmp/fanout-bench.XXXXXX)
out=$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)
py=$work/bench.py
SPID= # the server this script started, if one runs
NPIDS=() # the NATS nodes of a fanout_nats* run
VPID= # the live-view viewer of a VIEWER=1 run
VIEWER=${VIEWER:-0}
CPID= # the background wrk of the long run, if one runs

# ---------------------------------------------------------------- process control ---

# Exits, like the interrupt, through cleanup: nothing this script started outlives it.
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$CPID" ]; then kill "$CPID" 2>/dev/null || true; wait "$CPID" 2>/dev/null || true; fi
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# True while $1 runs (a zombie does not count: it has exited and waits to be reaped).
alive() { [ -r "/proc/$1/status" ] && [ "$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null)" != Z ]; }

port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "127.0.0.1:$PORT is already in use (set PORT)" >&2
    exit 1
  fi
}

# Waits for the server just started; on failure shows its log ($1).
wait_up() {
  if ! wait_port "$PORT" || ! alive "$SPID"; then
    echo "the server did not come up; its log:" >&2
    tail -20 "$1" >&2
    exit 1
  fi
}

# fanout's bench config in $1: source `bench` (WRITEKEY, dedupe on, default memory backend),
# source `bench_nodedupe` (WRITEKEY_NODEDUPE, dedupe off) for batch_gzip, one file destination.
# max_in_flight well above 64 connections, so no run is shed with 429s.
fanout_config() {
  bench_config_head "$PORT" "$1/data" "" 'max_in_flight = 4096
shutdown_grace = "10s"'
  if [ "$VIEWER" = 1 ]; then printf '[admin]\ntoken_env = "FANOUT_BENCH_ADMIN"\n\n'; fi
  cat <<TOML
[[sources]]
name = "bench_nodedupe"
write_keys = ["WRITEKEY_NODEDUPE"]
dedupe = { enabled = false }

[[destinations]]
name = "file"
kind = "file"
path = "$1/out.jsonl"
TOML
}

start_fanout() { # run dir
  mkdir -p "$1"
  fanout_config "$1" >"$1/config.toml"
  port_free
  FANOUT_BENCH_ADMIN=bench-admin taskset -c "$SERVER_CPU" "$fanout_bin" --config "$1/config.toml" 2>"$1/server.log" &
  SPID=$!
  wait_up "$1/server.log"
  start_viewer
}

# With VIEWER=1: one viewer of the live view for the whole run, reading everything.
start_viewer() {
  [ "$VIEWER" = 1 ] || return 0
  taskset -c "$CLIENT_CPU" curl -sN -H "Authorization: Bearer bench-admin" \
    "http://127.0.0.1:$PORT/debugger/events" >/dev/null &
  VPID=$!
}

# NATS nodes for a fanout_nats* run: $2 of them in $1, clustered when more than one, on ports
# above PORT; waits until JetStream has a leader. Sets NATS_URLS (a TOML array). Not to be
# called in a subshell: NPIDS must reach stop_nats.
start_nats() { # run dir, nodes
  local dir=$1 n=$2 i routes="" urls=""
  for i in $(seq "$n"); do routes+="nats://127.0.0.1:$((PORT + 200 + i)),"; done
  for i in $(seq "$n"); do
    mkdir -p "$dir/nats$i"
    {
      echo "server_name: n$i"
      echo "listen: 127.0.0.1:$((PORT + 100 + i))"
      echo "http: 127.0.0.1:$((PORT + 300 + i))"
      echo "jetstream { store_dir: \"$dir/nats$i\", sync_interval: always }"
      if [ "$n" -gt 1 ]; then
        echo "cluster { name: bench, listen: 127.0.0.1:$((PORT + 200 + i)), routes: [${routes%,}] }"
      fi
    } >"$dir/nats$i.conf"
    "$NATS_SERVER" -c "$dir/nats$i.conf" >"$dir/nats$i.log" 2>&1 &
    NPIDS+=($!)
    urls+="\"nats://127.0.0.1:$((PORT + 100 + i))\","
  done
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$((PORT + 301))/healthz?js-enabled-only=true" >/dev/null 2>&1 &&
      { [ "$n" = 1 ] || curl -sf "http://127.0.0.1:$((PORT + 301))/jsz" | grep -q '"leader"'; } && break
    sleep 0.1
  done
  NATS_URLS="[${urls%,}]"
}

start_fanout_nats() { # run dir, nodes
  mkdir -p "$1"
  port_free
  start_nats "$1" "$2"
  { fanout_config "$1"; printf '\n[queue]\nbackend = "nats"\nservers = %s\nreplicas = %s\n' "$NATS_URLS" "$2"; } \
    >"$1/config.toml"
  taskset -c "$SERVER_CPU" "$fanout_bin" --config "$1/config.toml" 2>"$1/server.log" &
  SPID=$!
  wait_up "$1/server.log"
}
start_fanout_nats1() { start_fanout_nats "$1" 1; }
start_fanout_nats3() { start_fanout_nats "$1" 3; }

start_parse() { # run dir
  mkdir -p "$1"
  port_free
  ADDR="127.0.0.1:$PORT" taskset -c "$SERVER_CPU" "$parse_bin" >"$1/server.log" 2>&1 &
  SPID=$!
  wait_up "$1/server.log"
}

start_parse_append() { # run dir
  mkdir -p "$1"
  port_free
  ADDR="127.0.0.1:$PORT" APPEND_PATH="$1/events.jsonl" taskset -c "$SERVER_CPU" "$parse_append_bin" \
    >"$1/server.log" 2>&1 &
  SPID=$!
  wait_up "$1/server.log"
}

# SIGTERM (fanout shuts down gracefully), SIGKILL after 20 s.
stop_server() {
  if [ -n "$VPID" ]; then kill "$VPID" 2>/dev/null || true; wait "$VPID" 2>/dev/null || true; VPID=; fi
  [ -n "$SPID" ] || return 0
  kill -TERM "$SPID" 2>/dev/null || true
  for _ in $(seq 200); do alive "$SPID" || break; sleep 0.1; done
  kill -KILL "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
  SPID=
  stop_nats
}

stop_nats() {
  local pid
  for pid in "${NPIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${NPIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  NPIDS=()
}

# ------------------------------------------------------------------------ measuring ---

# wrk with script $1, $2 connections, for $3, output to $4 (and `time`'s wall/user/sys to $4.time).
run_wrk() {
  local key=WRITEKEY
  [ "$1" = batch_gzip ] && key=WRITEKEY_NODEDUPE
  local TIMEFORMAT='%R %U %S'
  { time env WRITE_KEY="$key" taskset -c "$CLIENT_CPU" wrk -t1 -c"$2" -d"$3" --timeout 5s \
      -s "$wrk_dir/$1.lua" "http://127.0.0.1:$PORT" >"$4" 2>&1 || true; } 2>"$4.time"
}

scrape() { # file: fanout's /metrics
  curl -sf --max-time 5 -o "$1" "http://127.0.0.1:$PORT/metrics" || { echo "GET /metrics failed" >&2; exit 1; }
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }

# What the file destination still owes, from a /metrics scrape: the local log's lag in bytes,
# or (NATS) messages pending or unacknowledged at its consumers (those gauges lag by up to 2 s,
# so also: fewer delivered than accepted counts as owed).
file_lag() { # scrape file
  local f=$1 lag accepted ok
  lag=$(( $(metric_sum "$f" fanout_queue_lag_bytes 'destination="file"') +
    $(metric_sum "$f" fanout_queue_consumer_pending 'destination="file"') +
    $(metric_sum "$f" fanout_queue_consumer_ack_pending 'destination="file"') ))
  accepted=$(metric_sum "$f" fanout_events_total 'outcome="accepted"')
  ok=$(metric_sum "$f" fanout_deliveries_total 'destination="file"' 'outcome="ok"')
  if [ "$ok" -lt "$accepted" ] && [ "$lag" = 0 ]; then lag=$((accepted - ok)); fi
  echo "$lag"
}

# After a fanout run: the file destination's lag when the load stopped, then wait until it is 0
# (or DRAIN_TIMEOUT) and count what was delivered. Prints key=value pairs for `bench.py record`.
drain() { # run dir, tag
  local dir=$1 tag=$2 lag start t0 drained=0 lines=0
  scrape "$out/logs/$tag.metrics.end.txt"
  start=$(now); t0=$(cpu_ticks "$SPID")
  lag=$(file_lag "$out/logs/$tag.metrics.end.txt")
  while :; do
    if [ "$lag" = 0 ]; then drained=1; break; fi
    if awk -v s="$(elapsed "$start")" -v m="$DRAIN_TIMEOUT" 'BEGIN {exit !(s >= m)}'; then break; fi
    sleep 0.2
    scrape "$dir/metrics.txt"
    lag=$(file_lag "$dir/metrics.txt")
  done
  echo "drained=$drained" "drain_s=$(elapsed "$start")" "drain_ticks=$(( $(cpu_ticks "$SPID") - t0 ))"
  scrape "$out/logs/$tag.metrics.drained.txt"
  [ -f "$dir/out.jsonl" ] && lines=$(wc -l <"$dir/out.jsonl")
  echo "lines=$lines" "rss_after_kb=$(proc_kb "$SPID" VmRSS)" \
    "metrics_end=$out/logs/$tag.metrics.end.txt" "metrics_drained=$out/logs/$tag.metrics.drained.txt"
}

# One cell of the table: a fresh server, warm-up, measured run, figures, stop, clean up.
measure() { # server script conns
  local server=$1 script=$2 c=$3 tag="$1.$2.c$3" dir="$work/$1.$2.c$3" t0 t1 rss hwm
  local extra=()
  "start_$server" "$dir"
  run_wrk "$script" "$c" 2s "$dir/warmup.log" # connections, caches, the first queue segment
  t0=$(cpu_ticks "$SPID")
  run_wrk "$script" "$c" "$DURATION" "$out/logs/$tag.wrk.log"
  if ! alive "$SPID"; then echo "$server died during the run; its log:" >&2; tail -20 "$dir/server.log" >&2; exit 1; fi
  t1=$(cpu_ticks "$SPID")
  rss=$(proc_kb "$SPID" VmRSS) hwm=$(proc_kb "$SPID" VmHWM)
  if [[ $server == fanout* ]]; then
    # shellcheck disable=SC2207 # drain prints key=value words without spaces
    extra=($(drain "$dir" "$tag"))
  fi
  stop_server
  cp "$dir/server.log" "$out/logs/$tag.server.log"
  for f in "$dir"/nats*.log; do [ -f "$f" ] && cp "$f" "$out/logs/$tag.$(basename "$f")"; done
  python3 "$py" record server="$server" script="$script" conns="$c" duration="$DURATION" \
    wrk_log="$out/logs/$tag.wrk.log" t0="$t0" t1="$t1" clk_tck="$CLK_TCK" rss_kb="$rss" \
    hwm_kb="$hwm" "${extra[@]}" >>"$out/results.jsonl"
  rm -rf "$dir"
}

# Idle RSS, binary size, start → first 200; written to sidecar.json.
sidecar() {
  local stripped="$work/fanout.stripped" idle_rss idle_hwm
  cp "$fanout_bin" "$stripped"
  strip "$stripped"
  start_fanout "$work/idle"
  sleep 1 # let start-up settle (threads, first segment) without any request
  idle_rss=$(proc_kb "$SPID" VmRSS) idle_hwm=$(proc_kb "$SPID" VmHWM)
  stop_server
  cp "$work/idle/server.log" "$out/logs/idle.server.log"
  mkdir -p "$work/start"
  fanout_config "$work/start" >"$work/start/config.toml"
  port_free
  python3 "$py" sidecar bin="$fanout_bin" stripped="$stripped" idle_rss_kb="$idle_rss" \
    idle_hwm_kb="$idle_hwm" config="$work/start/config.toml" data="$work/start" port="$PORT" \
    server_cpu="$SERVER_CPU" client_cpu="$CLIENT_CPU" runs=5 log="$out/logs/startup.server.log" \
    >"$out/sidecar.json"
}

# LONG mode: batch.lua at 64 connections for $LONG; every LONG_EVERY s fanout's RSS, dedupe
# window size and queue lag. The dedupe window grows by ~28 bytes per key up to max_entries
# (10 M, ~290 MB) by design: LONG_DEDUPE=0 sends to the dedupe-off source to see the rest alone.
# The output file is emptied at each sample (`truncate`, fanout appends) or ~1 GB a second
# of delivered lines would fill the disk; deliveries are counted from /metrics instead.
long_run() {
  local dir="$work/long" samples="$out/long.samples.tsv" start key=WRITEKEY
  [ "${LONG_DEDUPE:-1}" = 0 ] && key=WRITEKEY_NODEDUPE
  start_fanout "$dir"
  printf 't_s\trss_kb\thwm_kb\tdedupe_keys\tlag_bytes\theld_bytes\tdelivered_ok\n' >"$samples"
  sample() {
    scrape "$dir/metrics.txt"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(elapsed "$start")" "$(proc_kb "$SPID" VmRSS)" \
      "$(proc_kb "$SPID" VmHWM)" "$(metric_sum "$dir/metrics.txt" fanout_dedupe_keys)" \
      "$(metric_sum "$dir/metrics.txt" fanout_queue_lag_bytes 'destination="file"')" \
      "$(metric_sum "$dir/metrics.txt" fanout_queue_held_bytes)" \
      "$(metric_sum "$dir/metrics.txt" fanout_deliveries_total 'destination="file"' 'outcome="ok"')" \
      | tee -a "$samples"
    : >"$dir/out.jsonl"
  }
  start=$(now)
  env WRITE_KEY="$key" taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d"$LONG" --timeout 5s \
    -s "$wrk_dir/batch.lua" "http://127.0.0.1:$PORT" >"$out/logs/long.wrk.log" 2>&1 &
  CPID=$!
  while sleep "$LONG_EVERY" && alive "$CPID"; do sample; done
  wait "$CPID" || true
  CPID=
  sample # just after the load
  sleep "$LONG_EVERY"
  sample # one more interval later: has the queue drained, has RSS come down?
  stop_server
  cp "$dir/server.log" "$out/logs/long.server.log"
  python3 "$py" long samples="$samples" wrk_log="$out/logs/long.wrk.log" key="$key" | tee "$out/long.md"
}

# ------------------------------------------------------------------------- set-up ---

need() { # command, Debian package
  command -v "$1" >/dev/null && return 0
  echo "installing $2 (for $1)" >&2
  apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
}

build() {
  [ "$SKIP_BUILD" = 1 ] && return 0
  (cd "$root" && cargo build --release -q)
  (cd "$shared/bench/baseline" && cargo build --release -q) # its own target/, outside our repo
}

meta() {
  local rev dirty=""
  rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  git -C "$root" --no-optional-locks diff --quiet HEAD 2>/dev/null || dirty=" + uncommitted changes"
  {
    echo "# fanout bench $(date -u +%Y-%m-%dT%H:%M:%SZ), git $rev$dirty"
    echo "# host: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(uname -r)"
    echo "# server on CPU $SERVER_CPU, wrk -t1 on CPU $CLIENT_CPU; duration $DURATION after a 2 s warm-up;" \
      "conns [$CONNS], scripts [$SCRIPTS], servers [$SERVERS], live-view viewer: $VIEWER"
  } | tee "$out/meta.txt"
}

main() {
  need wrk wrk; need taskset util-linux; need curl curl; need strip binutils; need python3 python3
  if [[ " $SERVERS " == *" fanout_nats"* ]] && ! [ -x "$NATS_SERVER" ]; then
    echo "no nats-server at $NATS_SERVER (run scripts/test once, or set NATS_SERVER)" >&2; exit 1
  fi
  build
  for b in "$fanout_bin" "$parse_bin"; do [ -x "$b" ] || { echo "missing $b (build it, or unset SKIP_BUILD)" >&2; exit 1; }; done
  mkdir -p "$out/logs"
  write_py
  fanout_config "$work/check" >"$work/check.toml"
  "$fanout_bin" check --config "$work/check.toml" >/dev/null
  meta
  if [ -n "$LONG" ]; then long_run; echo "results: $out"; return; fi
  if [ "$SIDECAR" = 1 ]; then sidecar; fi
  local script c server
  for script in $SCRIPTS; do
    for c in $CONNS; do
      for server in $SERVERS; do measure "$server" "$script" "$c"; done
    done
  done
  python3 "$py" table results="$out/results.jsonl" sidecar="$out/sidecar.json" meta="$out/meta.txt" \
    | tee "$out/table.md"
  echo "results: $out"
}

# ------------------------------------------------------------- figures and tables ---

# The Python half: one record per run, the tables, the start-up timing. Arguments are key=value.
write_py() {
  cat >"$py" <<'PY'
import base64, json, os, re, shutil, signal, socket, statistics, subprocess, sys, time

def args():
    return dict(a.split("=", 1) for a in sys.argv[2:])

SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)')

def scrape(path):
    """Prometheus text -> [(name, {label: value}, value)]."""
    out = []
    for line in open(path):
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(re.findall(r'(\w+)="([^"]*)"', m[2] or "")), float(m[3])))
    return out

def msum(samples, name, **labels):
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in labels.items()))

def wrk_result(path):
    lines = [l[7:] for l in open(path) if l.startswith("RESULT ")]
    if not lines:
        sys.exit(f"no RESULT line in {path}:\n" + open(path).read()[-2000:])
    return json.loads(lines[-1])

def record():
    a = args()
    w = wrk_result(a["wrk_log"])
    wall, cu, cs = map(float, open(a["wrk_log"] + ".time").read().split())
    tck = float(a["clk_tck"])
    r = {"server": a["server"], "script": a["script"], "conns": int(a["conns"]),
         "duration": a["duration"],
         "write_key": "WRITEKEY_NODEDUPE" if a["script"] == "batch_gzip" else "WRITEKEY",
         "server_cpu_s": (int(a["t1"]) - int(a["t0"])) / tck, "client_cpu_s": cu + cs,
         "wall_s": wall, "rss_kb": int(a["rss_kb"]), "hwm_kb": int(a["hwm_kb"]), "wrk": w}
    r["cpu_us_per_req"] = r["server_cpu_s"] * 1e6 / max(w["requests"], 1)
    if a["server"].startswith("fanout"):
        r["dedupe"] = a["script"] != "batch_gzip"
        end, drained = scrape(a["metrics_end"]), scrape(a["metrics_drained"])
        statuses = {}
        for n, l, v in drained:
            if n == "fanout_http_requests_total" and l.get("path", "").startswith("/v1"):
                statuses[l["status"]] = statuses.get(l["status"], 0) + int(v)
        r["delivery"] = {
            "lag_end_bytes": int(msum(end, "fanout_queue_lag_bytes", destination="file")),
            "held_end_bytes": int(msum(end, "fanout_queue_held_bytes")),
            "drained": a["drained"] == "1", "drain_s": float(a["drain_s"]),
            "drain_cpu_s": int(a["drain_ticks"]) / tck,
            "accepted": int(msum(drained, "fanout_events_total", outcome="accepted")),
            "duplicate": int(msum(drained, "fanout_events_total", outcome="duplicate")),
            "rejected": int(msum(drained, "fanout_events_total", outcome="rejected")),
            "delivered_ok": int(msum(drained, "fanout_deliveries_total", destination="file", outcome="ok")),
            "lines": int(a["lines"]), "rss_after_kb": int(a["rss_after_kb"]),
            "http_status": statuses}
    print(json.dumps(r))
    errs = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
    line = ("%-6s %-10s c%-3d %8.0f req/s %9.0f ev/s  p50 %6.2f  p99 %6.2f ms  srvCPU %3.0f%%  "
            "wrkCPU %3.0f%%  %6.1f µs/req  RSS %5.1f MB  non2xx %d  errs %d" % (
        r["server"], r["script"], r["conns"], w["rps"], w["events_per_s"], w["p50_us"] / 1e3,
        w["p99_us"] / 1e3, 100 * r["server_cpu_s"] / w["duration_s"], 100 * r["client_cpu_s"] / wall,
        r["cpu_us_per_req"], r["rss_kb"] / 1024, w["err_status"], errs))
    if "delivery" in r:
        d = r["delivery"]
        line += "  | lag at end %.1f MB, %s in %.1f s, accepted %d, lines %d" % (
            d["lag_end_bytes"] / 2**20, "drained" if d["drained"] else "NOT drained", d["drain_s"],
            d["accepted"], d["lines"])
    print(line, file=sys.stderr)

# Issue 8's targets at 64 connections: (fanout ÷ parse at least, p99 below ms or None).
TARGETS = {"batch": (0.7, 50.0), "track": (0.4, 5.0), "batch_gzip": (0.6, None)}

def table():
    a = args()
    rows = [json.loads(l) for l in open(a["results"])] if os.path.exists(a["results"]) else []
    parse = {(r["script"], r["conns"]): r for r in rows if r["server"] == "parse"}
    local = {(r["script"], r["conns"]): r for r in rows if r["server"] == "fanout"}
    print(open(a["meta"]).read().rstrip().replace("# ", "", 1).replace("\n# ", "  \n"))
    print()
    if rows:
        print("| script | conns | server | req/s | events/s | p50 ms | p99 ms | server CPU s | CPU µs/req "
              "| wrk CPU % | RSS MB end / peak | fanout ÷ parse events/s | by CPU µs/req | target (issue 8; NATS: issue 15) "
              "| err_status | other errs |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        w = r["wrk"]
        name = r["script"]
        if r["server"].startswith("fanout"):
            name += " (dedupe off)" if not r.get("dedupe", True) else " (dedupe on)"
        ratio = cpu_ratio = target = "—"
        p = parse.get((r["script"], r["conns"]))
        l = local.get((r["script"], r["conns"]))
        if r["server"].startswith("fanout") and p:
            x = w["events_per_s"] / p["wrk"]["events_per_s"]
            ratio = "%.2f" % x
            cpu_ratio = "%.2f" % (p["cpu_us_per_req"] / r["cpu_us_per_req"])
            t = TARGETS.get(r["script"])
            if r["server"] == "fanout" and t and r["conns"] == 64:
                p99 = w["p99_us"] / 1e3
                ok = x >= t[0] and (t[1] is None or p99 < t[1])
                target = "≥ %.1f×%s: %s" % (t[0], ", p99 < %g ms" % t[1] if t[1] else "",
                                            "met" if ok else "**missed**")
        if r["server"].startswith("fanout_nats") and l and r["script"] != "track":
            # Issue 15's target: the NATS backend at >= 0.5 x the local one's events/s.
            x = w["events_per_s"] / l["wrk"]["events_per_s"]
            target = "÷ local %.2f (≥ 0.5: %s)" % (x, "met" if x >= 0.5 else "**missed**")
        errs = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
        print("| %s | %d | %s | %.0f | %.0f | %.2f | %.2f | %.2f | %.1f | %.0f | %.1f / %.1f | %s | %s | %s | %d | %d |" % (
            name, r["conns"], r["server"], w["rps"], w["events_per_s"], w["p50_us"] / 1e3,
            w["p99_us"] / 1e3, r["server_cpu_s"], r["cpu_us_per_req"],
            100 * r["client_cpu_s"] / r["wall_s"], r["rss_kb"] / 1024, r["hwm_kb"] / 1024,
            ratio, cpu_ratio, target, w["err_status"], errs))
    if rows:
        print("\nServer CPU s: the server's user+sys time during the measured run (all threads, delivery"
              " included). CPU µs/req is the figure independent of the client: wrk CPU % near 100 means"
              " wrk, not the server, set req/s (track). \"by CPU µs/req\" = parse µs/req ÷ fanout µs/req,"
              " the ratio if both servers were CPU-bound. batch_gzip re-sends one gzipped body (messageIds"
              " repeat), so fanout takes it on a source with dedupe off; track and batch run with dedupe on.")
    fan = [r for r in rows if "delivery" in r]
    if fan:
        print("\n### Delivery (fanout's file destination)\n")
        print("| script | conns | lag at end of load MB | queue held MB | drained | drain s | drain CPU s "
              "| accepted | delivered lines | deliveries ok | duplicates | RSS MB end / after drain | HTTP statuses |")
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in fan:
            d = r["delivery"]
            st = ", ".join("%s×%d" % kv for kv in sorted(d["http_status"].items()))
            print("| %s | %d | %.1f | %.1f | %s | %.1f | %.2f | %d | %d | %d | %d | %.1f / %.1f | %s |" % (
                r["script"], r["conns"], d["lag_end_bytes"] / 2**20, d["held_end_bytes"] / 2**20,
                "yes" if d["drained"] else "**no**", d["drain_s"], d["drain_cpu_s"], d["accepted"],
                d["lines"], d["delivered_ok"], d["duplicate"], r["rss_kb"] / 1024,
                d["rss_after_kb"] / 1024, st))
        print("\nLag: bytes between the destination's saved cursor and the end of the queue when wrk stops"
              " (warm-up included in the counts). Delivered lines should equal accepted once drained.")
    if os.path.exists(a["sidecar"]):
        s = json.load(open(a["sidecar"]))
        st = s["startup"]
        print("\n### Sidecar figures\n")
        print("| figure | value | target |\n|---|---|---|")
        print("| idle RSS 1 s after start | %.1f MB (peak %.1f) | ≤ 15 MB |" % (
            s["idle_rss_kb"] / 1024, s["idle_hwm_kb"] / 1024))
        print("| stripped release binary | %.1f MB (unstripped %.1f MB) | ≤ 25 MB |" % (
            s["stripped_bytes"] / 1e6, s["binary_bytes"] / 1e6))
        print("| exec → first 200 on /v1/track | median %.1f ms (%s) | ≤ 100 ms |" % (
            st["median_ms"], ", ".join("%.1f" % x for x in st["runs_ms"])))
        print("| of which exec → port accepts | median %.1f ms (%s) | |" % (
            st["median_connect_ms"], ", ".join("%.1f" % x for x in st["first_connect_ms"])))
        if st["other_statuses"]:
            print("\nAnswers other than 200 seen while starting: %s" % st["other_statuses"])

def startup(a):
    """exec → first 200 on /v1/track, `runs` times, each on an empty data dir."""
    scpu, runs, port = int(a["server_cpu"]), int(a["runs"]), int(a["port"])
    os.sched_setaffinity(0, {int(a["client_cpu"])})
    body = b'{"userId":"u1","event":"Bench Start"}'
    req = (b"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Basic " + base64.b64encode(b"WRITEKEY:") + b"\r\nConnection: close\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    times, connects, attempts, other = [], [], [], {}
    for i in range(runs):
        shutil.rmtree(a["data"] + "/data", ignore_errors=True)
        with open("%s.%d" % (a["log"], i), "wb") as log:
            t0 = time.perf_counter()
            p = subprocess.Popen([a["bin"], "--config", a["config"]], stdout=subprocess.DEVNULL,
                                 stderr=log, preexec_fn=lambda: os.sched_setaffinity(0, {scpu}))
            try:
                n, connected = 0, None
                while True:  # a tight loop of connection attempts
                    n += 1
                    if p.poll() is not None:
                        sys.exit("fanout exited during start-up; see %s.%d" % (a["log"], i))
                    if time.perf_counter() - t0 > 10:
                        sys.exit("no 200 within 10 s of start")
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                            connected = connected or time.perf_counter()
                            s.sendall(req)
                            buf = b""
                            while b"\r\n" not in buf:
                                chunk = s.recv(256)
                                if not chunk:
                                    break
                                buf += chunk
                    except OSError:
                        continue
                    status = buf.split(b" ", 2)[1].decode() if buf.count(b" ") >= 2 else "?"
                    if status == "200":
                        times.append((time.perf_counter() - t0) * 1e3)
                        connects.append((connected - t0) * 1e3)
                        attempts.append(n)
                        break
                    other[status] = other.get(status, 0) + 1
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return {"runs_ms": times, "median_ms": statistics.median(times), "attempts": attempts,
            "first_connect_ms": connects, "median_connect_ms": statistics.median(connects),
            "other_statuses": other}

def sidecar():
    a = args()
    print(json.dumps({"binary_bytes": os.path.getsize(a["bin"]),
                      "stripped_bytes": os.path.getsize(a["stripped"]),
                      "idle_rss_kb": int(a["idle_rss_kb"]), "idle_hwm_kb": int(a["idle_hwm_kb"]),
                      "startup": startup(a)}))

def long():
    a = args()
    rows = [l.rstrip("\n").split("\t") for l in open(a["samples"])][1:]
    w = wrk_result(a["wrk_log"])
    rss = [int(r[1]) / 1024 for r in rows]
    lag = [int(r[4]) / 2**20 for r in rows]
    print("long run: batch.lua, 64 connections, dedupe %s, %.0f s: %.0f req/s, %.0f events/s, "
          "p50 %.2f ms, p99 %.2f ms, err_status %d" % (
              "off" if a["key"] == "WRITEKEY_NODEDUPE" else "on", w["duration_s"], w["rps"],
              w["events_per_s"], w["p50_us"] / 1e3, w["p99_us"] / 1e3, w["err_status"]))
    print("fanout RSS MB over %d samples: min %.1f, max %.1f, last %.1f (peak VmHWM %.1f); "
          "file lag MB: max %.1f, last %.1f\n" % (len(rows), min(rss), max(rss), rss[-1],
                                                   int(rows[-1][2]) / 1024, max(lag), lag[-1]))
    print("| t s | RSS MB | peak MB | dedupe keys | file lag MB | queue held MB | delivered ok |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| %s | %.1f | %.1f | %s | %.1f | %.1f | %s |" % (
            r[0], int(r[1]) / 1024, int(r[2]) / 1024, r[3], int(r[4]) / 2**20, int(r[5]) / 2**20, r[6]))
    print("\nThe last two samples are taken just after the load and one interval later.")

{"record": record, "table": table, "sidecar": sidecar, "long": long}[sys.argv[1]]()
PY
}

main "$@"
