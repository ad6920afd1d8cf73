#!/usr/bin/env python3
"""Memory of fanout under a flood of idle connections (issue 13, defect 2), on 127.0.0.1.

Starts target/release/fanout on a fresh data dir, reads its RSS, opens N connections that
send nothing (or, with --requests, that each send one /v1/track and then stay open),
reads RSS while they are held, closes them all, and reads RSS again over --settle
seconds. Prints one JSON line per sample and a summary line.

Usage: bench/idle_connections.py [--connections 10000] [--settle 20] [--requests]
                                 [--env KEY=VALUE ...] [--server-arg ARG ...]
Env for the server may set allocator options, e.g. --env MIMALLOC_PURGE_DELAY=0.
"""
import argparse
import base64
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--settle", type=int, default=20)
    p.add_argument("--requests", action="store_true")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--config-extra", default="")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--traffic", type=int, default=0, help="seconds of requests afterwards")
    args = p.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix="fanout-idle.")
    port = free_port()
    config = f"""[server]
listen = "127.0.0.1:{port}"
data_dir = "{work}/data"
{args.config_extra}

[[sources]]
name = "bench"
write_keys = ["wk_bench"]

[[destinations]]
name = "out"
kind = "file"
path = "{work}/out.jsonl"
"""
    with open(f"{work}/config.toml", "w") as f:
        f.write(config)
    env = dict(os.environ, FANOUT_LOG="warn")
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    server = subprocess.Popen(
        [f"{ROOT}/target/release/fanout", "--config", f"{work}/config.toml", *args.server_arg],
        env=env, stdout=subprocess.DEVNULL, stderr=open(f"{work}/server.log", "w"))
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("fanout did not start")
            time.sleep(0.05)
    time.sleep(0.5)
    samples = []

    def sample(label):
        rec = {"at": label, "rss_mib": round(rss_kib(server.pid) / 1024, 1)}
        samples.append(rec)
        print(json.dumps(rec), flush=True)

    sample("idle")
    auth = base64.b64encode(b"wk_bench:").decode()
    body = b'{"userId":"u","event":"E"}'
    request = (f"POST /v1/track HTTP/1.1\r\nhost: x\r\nauthorization: Basic {auth}\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    held = []
    for i in range(args.connections):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as e:
            print(json.dumps({"connect_failed_at": i, "error": str(e)}), flush=True)
            break
        if args.requests:
            s.sendall(request)
            s.recv(4096)
        held.append(s)
    time.sleep(2)
    sample(f"holding {len(held)}")
    for s in held:
        s.close()
    held.clear()
    for t in range(args.settle):
        time.sleep(1)
        if t in (0, 4, args.settle - 1):
            sample(f"{t + 1}s after closing")
    if args.rounds > 1:
        for r in range(2, args.rounds + 1):
            for i in range(args.connections):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(2)
            sample(f"round {r}: holding {len(held)}")
            for s in held:
                s.close()
            held.clear()
            time.sleep(2)
            sample(f"round {r}: 2s after closing")
    if args.traffic:
        # Ordinary traffic afterwards, on a few kept-alive connections.
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        end = time.time() + args.traffic
        sent = 0
        while time.time() < end:
            for c in conns:
                c.sendall(request)
                c.recv(4096)
                sent += 1
        for c in conns:
            c.close()
        sample(f"after {sent} requests over {args.traffic}s")
        time.sleep(2)
        sample("2s after the traffic")
    server.terminate()
    server.wait()
    print(json.dumps({"summary": samples, "env": args.env}), flush=True)


if __name__ == "__main__":
    main()
