"""Validates Braze /users/track bodies by the rules Braze documents (braze.com/docs/api/
endpoints/user_data/post_user_track/ and the user attributes, event and purchase
objects): Braze publishes no REST SDK or schema on a registry, so these rules are the check.

stdin: one request body per line. Exit 0 when every body is valid, else 1 with the
reasons on stderr.
"""

import json
import re
from datetime import datetime

from common import check_bodies

MAX_PER_ARRAY = 75
IDENTIFIERS = {"external_id", "user_alias", "braze_id", "email", "phone"}
COMMON = IDENTIFIERS | {"app_id", "_update_existing_only"}
EVENT_KEYS = COMMON | {"name", "time", "properties"}
PURCHASE_KEYS = COMMON | {"product_id", "currency", "price", "quantity", "time", "properties"}
GENDERS = {"M", "F", "O", "N", "P"}
SUBSCRIBE = {"opted_in", "unsubscribed", "subscribed"}
STRING_ATTRIBUTES = {"first_name", "last_name", "email", "phone", "country", "home_city",
                     "language", "time_zone", "image_url"}
CURRENCY = re.compile(r"^[A-Z]{3}$")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def iso8601(where, value):
    if not isinstance(value, str):
        raise ValueError(f"{where}: an ISO 8601 string")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where}: not ISO 8601") from None


def identified(where, raw):
    given = IDENTIFIERS & set(raw)
    if not given:
        raise ValueError(f"{where}: needs one of external_id, user_alias, braze_id, email, phone")
    if "user_alias" in raw:
        alias = raw["user_alias"]
        if not isinstance(alias, dict) or set(alias) != {"alias_name", "alias_label"}:
            raise ValueError(f"{where}.user_alias: alias_name and alias_label")
        if "_update_existing_only" in raw and raw["_update_existing_only"] is not False:
            # An alias-only user is created only in "update and create" mode.
            raise ValueError(f"{where}: a user_alias needs _update_existing_only false")
    for key in ("external_id", "braze_id", "email", "phone"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            raise ValueError(f"{where}.{key}: a non-empty string")


def custom_key(where, key):
    if not isinstance(key, str) or key.startswith("$") or len(key) > 255:
        raise ValueError(f"{where} {key!r}: at most 255 characters, not starting with $")


def properties(where, props):
    if not isinstance(props, dict):
        raise ValueError(f"{where}: not an object")
    for key in props:
        custom_key(where, key)
    if len(json.dumps(props).encode()) > 50 * 1024:
        raise ValueError(f"{where}: larger than 50 KB")


def attribute(where, raw):
    identified(where, raw)
    for key, value in raw.items():
        if key in IDENTIFIERS or key in ("app_id", "_update_existing_only"):
            continue
        if key in STRING_ATTRIBUTES:
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}.{key}: a string or null")
        elif key == "dob":
            if value is not None and not (isinstance(value, str) and re.match(r"^\d{4}-\d{2}-\d{2}$", value)):
                raise ValueError(f"{where}.dob: YYYY-MM-DD")
        elif key == "gender":
            if value is not None and value not in GENDERS:
                raise ValueError(f"{where}.gender: one of M, F, O, N, P or null")
        elif key in ("email_subscribe", "push_subscribe"):
            if value not in SUBSCRIBE:
                raise ValueError(f"{where}.{key}: opted_in, unsubscribed or subscribed")
        elif key == "current_location":
            if not isinstance(value, dict) or not all(is_number(value.get(k)) for k in ("latitude", "longitude")):
                raise ValueError(f"{where}.current_location: latitude and longitude numbers")
        else:
            custom_key(f"{where} custom attribute", key)
            if isinstance(value, str) and len(value) > 255:
                raise ValueError(f"{where}.{key}: a string longer than 255 characters")


def event(where, raw):
    unknown = set(raw) - EVENT_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    identified(where, raw)
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ValueError(f"{where}.name: required")
    iso8601(f"{where}.time", raw.get("time"))
    if "properties" in raw:
        properties(f"{where}.properties", raw["properties"])


def purchase(where, raw):
    unknown = set(raw) - PURCHASE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    identified(where, raw)
    pid = raw.get("product_id")
    if not isinstance(pid, str) or not pid or len(pid) > 255:
        raise ValueError(f"{where}.product_id: a string of 1 to 255 characters")
    if not isinstance(raw.get("currency"), str) or not CURRENCY.match(raw["currency"]):
        raise ValueError(f"{where}.currency: an ISO 4217 code")
    if not is_number(raw.get("price")):
        raise ValueError(f"{where}.price: a number")
    if "quantity" in raw:
        q = raw["quantity"]
        if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 100:
            raise ValueError(f"{where}.quantity: an integer from 1 to 100")
    iso8601(f"{where}.time", raw.get("time"))
    if "properties" in raw:
        properties(f"{where}.properties", raw["properties"])


def check(line):
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError("body: not an object")
    unknown = set(body) - {"attributes", "events", "purchases"}
    if unknown:
        raise ValueError(f"body: unknown keys {sorted(unknown)}")
    if not body:
        raise ValueError("body: none of attributes, events, purchases")
    for key, validate in (("attributes", attribute), ("events", event), ("purchases", purchase)):
        if key in body:
            items = body[key]
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_PER_ARRAY:
                raise ValueError(f"{key}: 1 to {MAX_PER_ARRAY} objects")
            for i, raw in enumerate(items):
                if not isinstance(raw, dict):
                    raise ValueError(f"{key}[{i}]: not an object")
                validate(f"{key}[{i}]", raw)


def main():
    check_bodies(check)


if __name__ == "__main__":
    main()
