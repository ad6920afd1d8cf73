#!/usr/bin/env bash
# The S3 archive's rate (issue 29), everything on 127.0.0.1:
#  1. Fill: fanout with one `kind = "s3"` destination whose S3 server is not up yet; wrk
#     loads /v1/batch (100 events per request) until about MESSAGES messages are queued.
#  2. Drain: start s3s-fs (a real S3 server over a directory, checking SigV4) and time
#     until the destination's cursor reaches the end of the queue: events/s archived
#     (gzipped JSON lines, one object per batch) and fanout's CPU per event.
# fanout on CPU 0, wrk and s3s-fs on CPU 1.
# Usage: bench/archive.sh   (needs wrk and s3s-fs; builds fanout in release)
# Env: MESSAGES (1000000), BATCH_BYTES (batch.max_bytes, 64 MiB), LINGER (batch.linger,
#      1s: the last partial batch would otherwise wait the default minute),
#      ROUND (each wrk fill round, 5s), FANOUT_BIN (a fanout binary to use instead of
#      the release build, e.g. target/debug/fanout for a smoke run; its figures mean
#      nothing), FANOUT_S3S_FS (s3s-fs; default target/s3s-fs/bin/s3s-fs, which
#      scripts/test installs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
shared=${FANOUT_SHARED_DIR:-$root/../shared}
MESSAGES=${MESSAGES:-1000000} BATCH_BYTES=${BATCH_BYTES:-67108864} LINGER=${LINGER:-1s}
PORT=${PORT:-18080} S3_PORT=${S3_PORT:-18095} ROUND=${ROUND:-5s}
S3S_FS=${FANOUT_S3S_FS:-$root/target/s3s-fs/bin/s3s-fs}
[ -x "$S3S_FS" ] || { echo "no s3s-fs at $S3S_FS (scripts/test installs it)" >&2; exit 1; }
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

{ bench_config_head "$PORT" "$work/data"; cat <<TOML
[[destinations]]
name = "archive"
kind = "s3"
bucket = "events"
endpoint = "http://127.0.0.1:$S3_PORT"
region = "us-east-1"
access_key_id_env = "ARCHIVE_BENCH_KEY"
secret_access_key_env = "ARCHIVE_BENCH_SECRET"
batch = { max_bytes = $BATCH_BYTES, linger = "$LINGER" }
retry = { initial_backoff = "100ms", max_backoff = "1s" }
TOML
} >"$work/config.toml"
export ARCHIVE_BENCH_KEY=bench-key ARCHIVE_BENCH_SECRET=bench-secret
taskset -c 0 "$fanout_bin" --config "$work/config.toml" 2>"$work/log" &
fanout=$!; pids+=("$fanout")
wait_port "$PORT"

lag() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^fanout_queue_lag_bytes\{destination="archive"\}/ {printf "%d", $2}'; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$fanout/status"; }

# 1. Fill: wrk in rounds until the queue holds MESSAGES messages.
sent=0
while [ "$sent" -lt "$MESSAGES" ]; do
  taskset -c 1 wrk -t1 -c16 "-d$ROUND" --timeout 5s -s "$shared/bench/wrk/batch.lua" "http://127.0.0.1:$PORT" >"$work/wrk" 2>&1
  r=$(sed -n 's/^RESULT //p' "$work/wrk")
  sent=$(( sent + $(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(int(r["events_per_s"]*r["duration_s"]))' "$r") ))
done
sleep 1
echo "queued: ~$sent messages"

# 2. Drain into s3s-fs.
mkdir -p "$work/s3/events"
taskset -c 1 "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key bench-key \
  --secret-key bench-secret "$work/s3" >/dev/null 2>&1 &
pids+=("$!")
start=$(date +%s.%N)
t0=$(cpu_ticks "$fanout")
until [ "$(lag)" = 0 ]; do sleep 0.1; done
t1=$(cpu_ticks "$fanout")
secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
cpu_us=$(python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) / float(sys.argv[3]) / float(sys.argv[4]) * 1e6:.2f}')" "$t0" "$t1" "$(getconf CLK_TCK)" "$sent")
objects=$(find "$work/s3/events" -type f -name '*.gz' | wc -l)
gz_mb=$(du -sm "$work/s3/events" | cut -f1)
echo "archived $sent messages in $secs s: $(python3 -c "print(int($sent / $secs))") events/s into $objects objects ($gz_mb MiB gzipped; batch.max_bytes $BATCH_BYTES); fanout CPU $cpu_us µs/event; RSS after: $(rss_mb) MB"
