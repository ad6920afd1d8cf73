"""What every vendor validator shares: the requests on stdin, and failing with a reason.

A validator (tests/vendors/<vendor>.py) reads JSON lines on stdin, one request each:
{"method", "path", "query", "headers": {name: value}, "body": <JSON or null>}. It exits 0
when every request is what the vendor takes, else non-zero with the reason on stderr.
"""

import json
import sys


def requests():
    """The requests on stdin, each with its line number (1-based) for error messages."""
    for number, line in enumerate(sys.stdin, 1):
        if line.strip():
            yield number, json.loads(line)


def check_bodies(check_body):
    """For the validators that read one request body per line (GA4, Meta, Customer.io,
    Braze): runs `check_body(line)` on each, which raises ValueError with the reason;
    exits 1 listing every body refused."""
    errors = []
    for n, line in enumerate(sys.stdin):
        if not line.strip():
            continue
        try:
            check_body(line.strip())
        except ValueError as e:
            errors.append(f"body {n}: {e}")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)


def fail(number, reason):
    print(f"request {number}: {reason}", file=sys.stderr)
    sys.exit(1)


def check(number, condition, reason):
    if not condition:
        fail(number, reason)


def query_of(request):
    """The query string as a dict (last value wins)."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl(request.get("query") or "", keep_blank_values=True))
