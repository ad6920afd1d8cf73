"""Validates Customer.io Track API v2 batch bodies (POST /api/v2/batch) by the rules
Customer.io documents (docs.customer.io/integrations/api/track/, "batch"): no registry
package models Track v2 (PyPI customerio speaks v1), so these rules are the check.

stdin: one request body per line. Exit 0 when every body is valid, else 1 with the
reasons on stderr.
"""

import json
import time

from common import check_bodies

MAX_BATCH = 500 * 1024  # bytes per request
MAX_ENTRY = 32 * 1024  # bytes per call in the batch
MAX_ATTRIBUTE_NAME = 150  # bytes
PERSON_ACTIONS = {"identify", "delete", "event", "screen", "page", "add_relationships",
                  "delete_relationships", "add_device", "delete_device", "merge",
                  "suppress", "unsuppress"}
OBJECT_ACTIONS = {"identify", "identify_anonymous", "delete", "add_relationships",
                  "delete_relationships"}
PERSON_IDS = {"id", "email", "cio_id"}
COMMON = {"type", "action", "identifiers", "timestamp"}
ALLOWED = {
    ("person", "identify"): COMMON | {"attributes", "cio_relationships"},
    ("person", "event"): COMMON | {"name", "id", "attributes"},
    ("person", "page"): COMMON | {"name", "id", "attributes"},
    ("person", "screen"): COMMON | {"name", "id", "attributes"},
    ("person", "merge"): {"type", "action", "primary", "secondary"},
    ("object", "identify"): COMMON | {"attributes", "cio_relationships"},
    ("object", "identify_anonymous"): COMMON | {"attributes", "cio_relationships"},
}


def one_identifier(where, ids, allowed):
    if not isinstance(ids, dict) or len(ids) != 1 or not set(ids) <= allowed:
        raise ValueError(f"{where}: exactly one of {sorted(allowed)}")
    value = next(iter(ids.values()))
    if not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{where}: a non-empty string or number")


def attributes(where, attrs):
    if not isinstance(attrs, dict):
        raise ValueError(f"{where}: not an object")
    for key in attrs:
        if len(key.encode()) > MAX_ATTRIBUTE_NAME:
            raise ValueError(f"{where}: a name longer than {MAX_ATTRIBUTE_NAME} bytes")


def entry(where, raw, now):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not an object")
    if len(json.dumps(raw, separators=(",", ":")).encode()) > MAX_ENTRY:
        raise ValueError(f"{where}: larger than {MAX_ENTRY} bytes")
    kind, action = raw.get("type"), raw.get("action")
    if kind == "person" and action not in PERSON_ACTIONS:
        raise ValueError(f"{where}: person action {action!r} unknown")
    if kind == "object" and action not in OBJECT_ACTIONS:
        raise ValueError(f"{where}: object action {action!r} unknown")
    allowed = ALLOWED.get((kind, action))
    if allowed is None:
        raise ValueError(f"{where}: type {kind!r} with action {action!r} is not sent")
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if "timestamp" in raw:
        t = raw["timestamp"]
        # Unix seconds, not milliseconds.
        if not isinstance(t, int) or isinstance(t, bool) or not 0 < t <= now + 600:
            raise ValueError(f"{where}.timestamp: Unix seconds, not in the future")
    if action == "merge":
        one_identifier(f"{where}.primary", raw.get("primary"), PERSON_IDS)
        one_identifier(f"{where}.secondary", raw.get("secondary"), PERSON_IDS)
        return
    if kind == "person":
        # Segment's Customer.io destination sends anonymous activity as anonymous_id.
        anonymous = {"anonymous_id"} if action in ("event", "page", "screen") else set()
        one_identifier(f"{where}.identifiers", raw.get("identifiers"), PERSON_IDS | anonymous)
    else:
        ids = raw.get("identifiers")
        if not isinstance(ids, dict) or set(ids) != {"object_type_id", "object_id"}:
            raise ValueError(f"{where}.identifiers: object_type_id and object_id")
        for key in ids:
            if not isinstance(ids[key], str) or not ids[key]:
                raise ValueError(f"{where}.identifiers.{key}: a non-empty string")
        for i, rel in enumerate(raw.get("cio_relationships", [])):
            rel_ids = rel.get("identifiers") if isinstance(rel, dict) else None
            allowed_ids = PERSON_IDS | ({"anonymous_id"} if action == "identify_anonymous" else set())
            one_identifier(f"{where}.cio_relationships[{i}].identifiers", rel_ids, allowed_ids)
    if action in ("event", "page", "screen"):
        if not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ValueError(f"{where}.name: required, a string")
        if "id" in raw and not isinstance(raw["id"], str):
            raise ValueError(f"{where}.id: a string")
    if "attributes" in raw:
        attributes(f"{where}.attributes", raw["attributes"])


def check(line, now):
    if len(line.encode()) > MAX_BATCH:
        raise ValueError(f"body: larger than {MAX_BATCH} bytes")
    body = json.loads(line)
    if not isinstance(body, dict) or set(body) != {"batch"}:
        raise ValueError("body: an object with only `batch`")
    if not isinstance(body["batch"], list) or not body["batch"]:
        raise ValueError("batch: a non-empty array")
    for i, raw in enumerate(body["batch"]):
        entry(f"batch[{i}]", raw, now)


def main():
    now = int(time.time())
    check_bodies(lambda body: check(body, now))


if __name__ == "__main__":
    main()
