"""Amplitude HTTP V2 (/2/httpapi) request bodies, checked with the official SDK's event
model (PyPI amplitude-analytics: amplitude.event.BaseEvent, whose EVENT_KEY_MAPPING lists
every key the API takes with its type) and the documented rules: an `api_key`, an
`events` array, each event with `event_type` and a `user_id` or `device_id` of at least
`options.min_id_length` characters (default 5), `time` in milliseconds."""

import os
import sys

# This file is named as the SDK's package: look it up in site-packages, not beside it.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

from amplitude.constants import IDENTIFY_EVENT  # noqa: E402
from amplitude.event import EVENT_KEY_MAPPING, BaseEvent  # noqa: E402
from common import check, requests  # noqa: E402

# Wire name → the SDK's attribute name (the SDK writes productId, revenueType).
ATTRIBUTE = {wire: attribute for attribute, (wire, _) in EVENT_KEY_MAPPING.items()}
# 2001-09-09 and 2286-11-20 in milliseconds: a time in seconds is far below.
MS_RANGE = (1_000_000_000_000, 9_999_999_999_999)

for number, request in requests():
    check(number, request["method"] == "POST", "not a POST")
    check(number, request["path"] == "/2/httpapi", f"path {request['path']}")
    body = request["body"]
    check(number, isinstance(body, dict), "the body is not an object")
    unknown = set(body) - {"api_key", "events", "options"}
    check(number, not unknown, f"unknown top-level keys {unknown}")
    check(number, isinstance(body.get("api_key"), str) and body["api_key"], "no api_key")
    events = body.get("events")
    check(number, isinstance(events, list) and events, "no events array")
    options = body.get("options") or {}
    min_id_length = options.get("min_id_length", 5)
    check(number, isinstance(min_id_length, int) and min_id_length > 0, "bad min_id_length")
    for i, wire in enumerate(events):
        at = f"events[{i}]"
        check(number, isinstance(wire, dict), f"{at} is not an object")
        unknown = set(wire) - set(ATTRIBUTE)
        check(number, not unknown, f"{at}: keys the API does not take: {unknown}")
        event = BaseEvent(event_type=wire.get("event_type"))
        for key, value in wire.items():
            attribute = ATTRIBUTE[key]
            # The SDK's own check: the key is an event field and its value has its type.
            check(
                number,
                event._verify_property(attribute, value),
                f"{at}.{key}: {value!r} is not a {EVENT_KEY_MAPPING[attribute][1].__name__}",
            )
            event[attribute] = value
        check(number, isinstance(wire.get("event_type"), str) and wire["event_type"], f"{at}: no event_type")
        ids = [wire.get("user_id"), wire.get("device_id")]
        check(number, any(ids), f"{at}: neither user_id nor device_id")
        for key in ("user_id", "device_id"):
            if wire.get(key) is not None:
                check(number, len(wire[key]) >= min_id_length, f"{at}.{key} shorter than {min_id_length}")
        if "time" in wire:
            check(number, MS_RANGE[0] <= wire["time"] <= MS_RANGE[1], f"{at}.time is not in milliseconds")
        if wire["event_type"] == IDENTIFY_EVENT:
            props = wire.get("user_properties")
            check(number, isinstance(props, dict) and props, f"{at}: $identify without user_properties")
            operations = {"$set", "$setOnce", "$add", "$append", "$prepend", "$unset", "$preInsert", "$postInsert", "$remove", "$clearAll"}
            check(number, set(props) <= operations, f"{at}: $identify user_properties must be operations, got {set(props)}")
        # What the SDK would send for it: the same keys (nothing dropped as invalid).
        sent = event.get_event_body()
        check(number, set(sent) == set(wire), f"{at}: the SDK would drop {set(wire) - set(sent)}")
