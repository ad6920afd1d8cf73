#!/usr/bin/env python3
"""Sustained identify + event delivery to a Klaviyo-shaped receiver (issue 16).

Starts a receiver on 127.0.0.1 that behaves like Klaviyo's API as far as delivery cares:
per-endpoint limits (burst per second and steady per minute, fixed windows; a 429 with
Retry-After past them, RateLimit-* headers otherwise), /api/profile-import,
/api/profile-bulk-import-jobs (taken at once, reported complete at the second status read),
/api/event-bulk-create-jobs and /api/events; it keeps every profile as Klaviyo would (later
non-null values win). Then starts a release fanout with one klaviyo destination pointed at
it, sends USERS users x ROUNDS identifies (the `plan` trait changing each round) and as many
track events, as /v1/batch requests of BATCH messages, and waits until every event arrived
and every profile holds its last round's plan. Prints one JSON line of figures.

Usage: bench/klaviyo_profiles.py [--users 1000] [--rounds 5] [--batch 500] [--timeout 120]
       [--fanout target/release/fanout]   (build it first: cargo build --release)
Everything runs on 127.0.0.1; the load is bounded by the counts above and the timeout.
"""
import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LIMITS = {  # endpoint: (burst per second, steady per minute), Klaviyo's documented limits
    "/api/events": (350, 3500),
    "/api/event-bulk-create-jobs": (10, 150),
    "/api/profile-bulk-import-jobs": (10, 150),
    "/api/profile-import": (75, 750),
    "job reads": (350, 3500),
}


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.windows = {}
        self.profiles = {}
        self.jobs = {}
        self.events = set()
        self.requests = {}
        self.too_many = 0
        self.profile_rows = 0

    def take(self, endpoint):
        burst, steady = LIMITS[endpoint]
        now = time.monotonic()
        second, minute = int(now), int(now // 60)
        w = self.windows.setdefault(endpoint, [second, 0, minute, 0])
        if w[0] != second:
            w[0], w[1] = second, 0
        if w[2] != minute:
            w[2], w[3] = minute, 0
        if w[3] >= steady:
            return None, 60 - int(now) % 60
        if w[1] >= burst:
            return None, 1
        w[1] += 1
        w[3] += 1
        if burst - w[1] <= steady - w[3]:
            return {"RateLimit-Limit": burst, "RateLimit-Remaining": burst - w[1], "RateLimit-Reset": 1}, 0
        return {"RateLimit-Limit": steady, "RateLimit-Remaining": steady - w[3],
                "RateLimit-Reset": 60 - int(now) % 60}, 0

    def apply(self, attributes):
        key = attributes.get("external_id") or attributes.get("email")
        if not key:
            return
        self.profile_rows += 1
        profile = self.profiles.setdefault(key, {})
        for k, v in attributes.items():
            if v is None:
                continue
            if k == "properties":
                profile.setdefault("properties", {}).update(v)
            else:
                profile[k] = v


STATE = State()


class Klaviyo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", "application/vnd.api+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_one(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0].rstrip("/")
        endpoint = "job reads" if method == "GET" else path
        if endpoint not in LIMITS:
            return self.answer(404, {"errors": [{"status": 404, "code": "not_found"}]})
        with STATE.lock:
            STATE.requests[endpoint] = STATE.requests.get(endpoint, 0) + 1
            headers, retry = STATE.take(endpoint)
            if headers is None:
                STATE.too_many += 1
                return self.answer(429, {"errors": [{"status": 429, "code": "throttled"}]},
                                   {"Retry-After": retry})
            body = json.loads(raw) if raw else None
            if method == "GET":
                job_id = path.rsplit("/", 1)[-1]
                if path.endswith("/import-errors"):
                    return self.answer(200, {"data": [], "links": {"next": None}}, headers)
                job = STATE.jobs.get(job_id)
                if job is None:
                    return self.answer(404, {"errors": [{"status": 404}]}, headers)
                job["reads"] += 1
                done = job["reads"] > 1
                return self.answer(200, {"data": {"type": "profile-bulk-import-job", "id": job_id,
                    "attributes": {"status": "complete" if done else "processing",
                                   "total_count": job["total"], "completed_count": job["total"] if done else 0,
                                   "failed_count": 0, "created_at": "2026-11-29T00:00:00+00:00"}}}, headers)
            if path == "/api/profile-import":
                STATE.apply(body["data"]["attributes"])
                return self.answer(201, {"data": {"type": "profile", "id": "p"}}, headers)
            if path == "/api/profile-bulk-import-jobs":
                rows = body["data"]["attributes"]["profiles"]["data"]
                for row in rows:
                    STATE.apply(row["attributes"])
                job_id = "job%d" % (len(STATE.jobs) + 1)
                STATE.jobs[job_id] = {"total": len(rows), "reads": 0}
                return self.answer(202, {"data": {"type": "profile-bulk-import-job", "id": job_id,
                                                  "attributes": {"status": "queued"}}}, headers)
            if path == "/api/event-bulk-create-jobs":
                for item in body["data"]["attributes"]["events-bulk-create"]["data"]:
                    for event in item["attributes"]["events"]["data"]:
                        STATE.events.add(event["attributes"]["unique_id"])
                return self.answer(202, {"data": {"type": "event-bulk-create-job", "id": "e"}}, headers)
            STATE.events.add(body["data"]["attributes"]["unique_id"])
            return self.answer(202, None, headers)

    def do_POST(self):
        self.handle_one("POST")

    def do_GET(self):
        self.handle_one("GET")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body):
    request = urllib.request.Request(
        "http://127.0.0.1:%d/v1/batch" % port, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(b"WRITEKEY:").decode()})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200, answer.status


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--users", type=int, default=1000)
    a.add_argument("--rounds", type=int, default=5)
    a.add_argument("--batch", type=int, default=500)
    a.add_argument("--timeout", type=float, default=120)
    a.add_argument("--fanout", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "fanout"))
    args = a.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Klaviyo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tempfile.mkdtemp(prefix="fanout-klaviyo-bench.")
    port = free_port()
    with open(os.path.join(work, "config.toml"), "w") as c:
        c.write('[server]\nlisten = "127.0.0.1:%d"\ndata_dir = "%s/data"\n\n'
                '[[sources]]\nname = "bench"\nwrite_keys = ["WRITEKEY"]\n\n'
                '[[destinations]]\nname = "kl"\nkind = "klaviyo"\napi_key_env = "KLAVIYO_KEY"\n'
                'base_url = "http://127.0.0.1:%d"\n' % (port, work, server.server_address[1]))
    log = open(os.path.join(work, "fanout.log"), "w")
    fanout = subprocess.Popen([args.fanout, "--config", os.path.join(work, "config.toml")],
                              stderr=log, env=dict(os.environ, KLAVIYO_KEY="pk_bench"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        messages = []
        for r in range(args.rounds):
            for u in range(args.users):
                messages.append({"type": "identify", "messageId": "id-%d-%d" % (r, u), "userId": "user-%d" % u,
                                 "traits": {"email": "user-%d@example.com" % u, "plan": "plan-%d" % r}})
                messages.append({"type": "track", "messageId": "ev-%d-%d" % (r, u), "userId": "user-%d" % u,
                                 "event": "Viewed Plan", "properties": {"round": r}})
        events = {m["messageId"] for m in messages if m["type"] == "track"}
        final = "plan-%d" % (args.rounds - 1)
        started = time.monotonic()
        for i in range(0, len(messages), args.batch):
            post(port, {"batch": messages[i:i + args.batch]})
        sent = time.monotonic() - started
        done_at = None
        while time.monotonic() - started < args.timeout:
            with STATE.lock:
                events_in = len(events & STATE.events)
                final_profiles = sum(1 for u in range(args.users)
                                     if STATE.profiles.get("user-%d" % u, {}).get("properties", {}).get("plan") == final)
            if events_in == len(events) and final_profiles == args.users:
                done_at = time.monotonic() - started
                break
            time.sleep(0.05)
        with STATE.lock:
            figures = {
                "users": args.users, "rounds": args.rounds, "batch": args.batch,
                "messages": len(messages), "ingest_s": round(sent, 2),
                "all_delivered_s": round(done_at, 2) if done_at else None,
                "events_delivered": len(events & STATE.events), "events": len(events),
                "profiles_final": final_profiles, "profile_rows_received": STATE.profile_rows,
                "events_per_s": round(len(events) / done_at) if done_at else None,
                "profiles_per_s": round(args.users * args.rounds / done_at) if done_at else None,
                "requests": STATE.requests, "answered_429": STATE.too_many,
            }
        print(json.dumps(figures))
        return 0 if done_at else 1
    finally:
        fanout.send_signal(signal.SIGTERM)
        try:
            fanout.wait(20)
        except subprocess.TimeoutExpired:
            fanout.kill()
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
