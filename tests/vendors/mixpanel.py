"""Mixpanel ingestion requests, checked against what the official SDK (PyPI mixpanel:
Mixpanel.import_data, people_set, group_set with its Consumer) builds for the same data,
and the documented rules: /import with service-account Basic auth and `project_id`
(strict mode), JSON arrays of at most 2000 records; each event with a name, `time` in
milliseconds, a `distinct_id` and an `$insert_id` of at most 36 letters, digits or `-`;
profile updates (/engage, /groups) carry the project token, not credentials."""

import base64
import json
import os
import re
import sys

# This file is named as the SDK's package: look it up in site-packages, not beside it.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

from mixpanel import Mixpanel  # noqa: E402
from common import check, query_of, requests  # noqa: E402

INSERT_ID = re.compile(r"^[A-Za-z0-9-]{1,36}$")
MS_RANGE = (1_000_000_000_000, 9_999_999_999_999)


class Captured:
    """A consumer keeping what the SDK would send, by endpoint."""

    def __init__(self):
        self.sent = []

    def send(self, endpoint, json_message, api_key=None, api_secret=None):
        self.sent.append((endpoint, json.loads(json_message)))


def sdk(token):
    consumer = Captured()
    return Mixpanel(token, consumer=consumer), consumer


def basic_user(request):
    header = request["headers"].get("authorization", "")
    check(number, header.startswith("Basic "), "no Basic authorization")
    user, _, secret = base64.b64decode(header[6:]).decode().partition(":")
    return user, secret


for number, request in requests():
    check(number, request["method"] == "POST", "not a POST")
    path, query, records = request["path"], query_of(request), request["body"]
    check(number, isinstance(records, list) and 0 < len(records) <= 2000, "not an array of 1 to 2000 records")
    if path == "/import":
        check(number, query.get("strict") == "1", "strict mode off")
        check(number, query.get("project_id"), "no project_id with service-account auth")
        user, secret = basic_user(request)
        check(number, user and secret, "service account user or secret empty")
        for i, event in enumerate(records):
            at = f"[{i}]"
            check(number, set(event) == {"event", "properties"}, f"{at}: keys {set(event)}")
            props = event["properties"]
            check(number, isinstance(event["event"], str) and event["event"], f"{at}: no event name")
            check(number, isinstance(props.get("distinct_id"), str), f"{at}: distinct_id")
            check(number, isinstance(props.get("time"), int) and MS_RANGE[0] <= props["time"] <= MS_RANGE[1], f"{at}: time in ms")
            check(number, INSERT_ID.match(props.get("$insert_id", "")), f"{at}: $insert_id {props.get('$insert_id')!r}")
            check(number, all(v is not None for v in props.values()), f"{at}: null properties")
            mp, consumer = sdk(props.get("token", "t"))
            mp.import_data(None, props["distinct_id"], event["event"], props["time"], props)
            endpoint, built = consumer.sent[0]
            check(number, endpoint == "imports", endpoint)
            # What the SDK sends for the same call is this event (the SDK adds its own
            # mp_lib / $lib_version only where the event has none).
            for key in ("mp_lib", "$lib_version"):
                if key not in props:
                    built["properties"].pop(key)
            check(number, built == event, f"{at}: the SDK builds {built}")
            if event["event"] == "$identify":
                check(number, props.get("$identified_id") and props.get("$anon_id"), f"{at}: $identify ids")
    elif path in ("/engage", "/groups"):
        check(number, "authorization" not in request["headers"], "credentials sent to a profile endpoint")
        for i, record in enumerate(records):
            at = f"[{i}]"
            check(number, isinstance(record.get("$token"), str) and record["$token"], f"{at}: no $token")
            check(number, isinstance(record.get("$set"), dict) and record["$set"], f"{at}: no $set")
            check(number, all(v is not None for v in record.values()), f"{at}: null values")
            mp, consumer = sdk(record["$token"])
            if path == "/engage":
                mp.people_set(record.get("$distinct_id"), record["$set"])
                extra = {"$ip"}
                reserved = {"created", "email", "firstName", "lastName", "name", "username", "phone"}
                check(number, not reserved & set(record["$set"]), f"{at}: Segment trait names not renamed")
            else:
                mp.group_set(record.get("$group_key"), record.get("$group_id"), record["$set"])
                extra = set()
            endpoint, built = consumer.sent[0]
            built.pop("$time")
            check(number, endpoint == ("people" if path == "/engage" else "groups"), endpoint)
            mine = {k: v for k, v in record.items() if k not in extra}
            check(number, built == mine, f"{at}: the SDK builds {built}")
            for key in ("$distinct_id", "$group_key", "$group_id"):
                if key in built:
                    check(number, isinstance(record.get(key), str) and record[key], f"{at}: {key}")
    else:
        check(number, False, f"path {path}")
