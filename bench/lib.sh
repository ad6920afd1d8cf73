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
# as ../shared/bench/wrk sends); $3 is added to the source (e.g. `dedupe = { … }`).
bench_config_head() {
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
data_dir = "$2"
[[sources]]
name = "bench"
write_keys = ["WRITEKEY"]
${3:-}
TOML
}
