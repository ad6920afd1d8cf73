# shellcheck shell=bash
# Shared by the bench scripts (source it): waiting for a server, reading its CPU time,
# and the part of a fanout config every bench run has.

# Waits (up to 5 s) until something listens on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# User + system CPU of process $1 so far, in clock ticks (divide by `getconf CLK_TCK`).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# [server] on 127.0.0.1:$1 with data in $2, and the one source `bench` (key WRITEKEY,
# as ../shared/bench/wrk sends); $3 is added to the source (e.g. `dedupe = { … }`),
# $4 to [server] (e.g. `max_in_flight = 4096`).
bench_config_head() {
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
data_dir = "$2"
${4:-}
[[sources]]
name = "bench"
write_keys = ["WRITEKEY"]
${3:-}
TOML
}

# A /proc/$1/status field in kB (VmRSS: resident now, VmHWM: peak resident).
proc_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

# Sum of the samples of Prometheus metric $2 in the scrape file $1 whose labels contain
# every further argument (e.g. 'destination="file"'); 0 when none match.
metric_sum() {
  local file=$1 name=$2; shift 2
  awk -v n="$name" -v want="$*" '
    /^#/ { next }
    { key = $1; base = key; sub(/\{.*/, "", base); if (base != n) next
      k = split(want, w, " "); ok = 1
      for (i = 1; i <= k; i++) if (index(key, w[i]) == 0) ok = 0
      if (ok) sum += $NF }
    END { printf "%.0f\n", sum }' "$file"
}
