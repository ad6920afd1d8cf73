#!/usr/bin/env python3
"""When a server's slow requests happen: scrapes fanout's request-duration histogram every
INTERVAL seconds while load runs, and prints each window that had requests over 5 ms (as
`second:over 5 ms/over 10 ms`) and a summary. Periodic work shows up as a rhythm (a save
every 100 ms, a segment deleted every few seconds); p99 alone cannot tell these apart.

Run it during a wrk run against the server, pinned off the server's core, e.g.
  taskset -c 1 bench/tail_timeline.py --port 18090 --seconds 10
"""
import argparse
import re
import sys
import time
import urllib.request

BUCKET = re.compile(
    r'fanout_http_request_duration_seconds_bucket\{path="(?P<path>[^"]+)",le="(?P<le>[^"]+)"\} (?P<n>\d+)'
)


def snapshot(url, path):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts = {}
    for m in BUCKET.finditer(text):
        if m["path"] == path:
            counts[m["le"]] = int(m["n"])
    if "+Inf" not in counts:
        sys.exit(f"no request-duration histogram for {path} at {url} (no requests yet?)")
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--path", default="/v1/track", help="route template (default /v1/track)")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    a = p.parse_args()
    url = f"http://127.0.0.1:{a.port}/metrics"
    prev = snapshot(url, a.path)
    start = time.monotonic()
    total = over = over5 = over10 = windows = 0
    spikes = []
    while time.monotonic() - start < a.seconds:
        time.sleep(a.interval)
        cur = snapshot(url, a.path)
        d = {le: cur[le] - prev.get(le, 0) for le in cur}
        prev = cur
        n = d["+Inf"]
        slow = n - d["0.0025"], n - d["0.005"], n - d["0.01"]
        total += n
        over += slow[0]
        over5 += slow[1]
        over10 += slow[2]
        windows += 1 if slow[0] else 0
        if slow[1]:
            spikes.append(f"{time.monotonic() - start:.2f}:{slow[1]}/{slow[2]}")
    print("  ".join(spikes) or "no request over 5 ms")
    pct = lambda x: 100 * x / max(total, 1)
    print(
        f"requests {total}  >2.5 ms {over} ({pct(over):.2f} %) in {windows} of "
        f"{int(a.seconds / a.interval)} windows  >5 ms {over5} ({pct(over5):.2f} %)  >10 ms {over10}"
    )


if __name__ == "__main__":
    main()
