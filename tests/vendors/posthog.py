"""PostHog capture (/batch/) request bodies, checked against what the official Python SDK
(PyPI posthog: Client.capture, group_identify, alias) enqueues for the same call, and
the documented rules: `api_key` and a `batch` array; each event with a name, a string
`distinct_id`, an ISO 8601 `timestamp` and a UUID `uuid`; `$identify` carrying `$set`,
`$groupidentify` its group type, key and `$group_set`, `$create_alias` its `alias`."""

import os
import sys
from datetime import datetime
from uuid import UUID

# This file is named as the SDK's package: look it up in site-packages, not beside it.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

from posthog import Client  # noqa: E402
from common import check, requests  # noqa: E402

# What the SDK adds to every event's properties on its own (itself, the machine).
SDK_PROPERTIES = {
    "$lib", "$lib_version", "$is_server", "$geoip_disable", "$python_runtime",
    "$python_version", "$os", "$os_version", "$os_distro",
}


def enqueued(call):
    """The message the SDK builds for `call(client)`, without sending it."""
    client = Client("phc_validator", send=False, sync_mode=True)
    captured = []
    client._submit_event = lambda msg, lane, uuid: captured.append(msg) or uuid
    call(client)
    check(number, len(captured) == 1, "the SDK dropped the call (invalid arguments)")
    return captured[0]


def instant(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


for number, request in requests():
    check(number, request["method"] == "POST", "not a POST")
    check(number, request["path"] == "/batch/", f"path {request['path']}")
    body = request["body"]
    check(number, isinstance(body, dict), "the body is not an object")
    unknown = set(body) - {"api_key", "batch", "historical_migration", "sent_at"}
    check(number, not unknown, f"unknown top-level keys {unknown}")
    check(number, isinstance(body.get("api_key"), str) and body["api_key"], "no api_key")
    batch = body.get("batch")
    check(number, isinstance(batch, list) and batch, "no batch array")
    for i, event in enumerate(batch):
        at = f"batch[{i}]"
        unknown = set(event) - {"event", "distinct_id", "timestamp", "uuid", "properties"}
        check(number, not unknown, f"{at}: unknown keys {unknown}")
        name, props = event.get("event"), event.get("properties", {})
        check(number, isinstance(name, str) and name, f"{at}: no event name")
        check(number, isinstance(event.get("distinct_id"), str) and event["distinct_id"], f"{at}: distinct_id")
        check(number, isinstance(props, dict), f"{at}: properties")
        try:
            UUID(event["uuid"])
            when = instant(event["timestamp"])
        except (KeyError, ValueError) as e:
            check(number, False, f"{at}: uuid or timestamp: {e}")
        common = dict(timestamp=event["timestamp"], uuid=event["uuid"])
        if name == "$groupidentify":
            check(number, set(props) == {"$group_type", "$group_key", "$group_set"}, f"{at}: {set(props)}")
            msg = enqueued(lambda c: c.group_identify(
                props["$group_type"], props["$group_key"], props["$group_set"],
                distinct_id=event["distinct_id"], **common))
        elif name == "$create_alias":
            msg = enqueued(lambda c: c.alias(event["distinct_id"], props.get("alias"), **common))
        else:
            if name == "$identify":
                check(number, isinstance(props.get("$set"), dict), f"{at}: $identify without $set")
            msg = enqueued(lambda c: c.capture(
                name, distinct_id=event["distinct_id"], properties=props, **common))
        check(number, msg["event"] == name, f"{at}: the SDK sends event {msg['event']}")
        check(number, msg["distinct_id"] == event["distinct_id"], f"{at}: the SDK sends distinct_id {msg['distinct_id']}")
        check(number, msg["uuid"] == event["uuid"], f"{at}: the SDK replaced the uuid")
        check(number, instant(msg["timestamp"]) == when, f"{at}: the SDK sends timestamp {msg['timestamp']}")
        sent = msg.get("properties", {})
        added = {k for k in sent if k not in props}
        check(number, added <= SDK_PROPERTIES, f"{at}: the SDK adds {added - SDK_PROPERTIES}")
        mine = {k: v for k, v in sent.items() if k not in added}
        check(number, mine == props, f"{at}: the SDK sends properties {mine}")
