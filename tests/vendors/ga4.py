"""Validates Google Analytics 4 Measurement Protocol bodies (POST /mp/collect) by the
rules Google documents: there is no SDK or schema for it on a registry, and /mp/collect
answers 2xx even to events it drops, so these rules are the check.
(developers.google.com/analytics/devguides/collection/protocol/ga4/reference,
 .../sending-events#limitations, support.google.com/analytics/answer/13316687 for names.)

stdin: one request body per line. Exit 0 when every body is valid, else 1 with the
reasons on stderr.
"""

import json
import re
import time

from common import check_bodies

MAX_EVENTS = 25
MAX_BODY = 130 * 1024
MAX_PARAMS = 25
MAX_USER_PROPERTIES = 25
MAX_ITEMS = 200
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
BODY_KEYS = {"client_id", "app_instance_id", "user_id", "timestamp_micros", "user_properties",
             "consent", "non_personalized_ads", "events", "user_location", "ip_override",
             "device", "user_data", "validation_behavior"}
RESERVED_EVENTS = {
    "ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query", "ad_reward",
    "adunit_exposure", "app_background", "app_clear_data", "app_exception", "app_install",
    "app_remove", "app_store_refund", "app_store_subscription_cancel",
    "app_store_subscription_convert", "app_store_subscription_renew", "app_update",
    "app_upgrade", "dynamic_link_app_open", "dynamic_link_app_update",
    "dynamic_link_first_open", "error", "first_open", "first_visit", "in_app_purchase",
    "notification_dismiss", "notification_foreground", "notification_open",
    "notification_receive", "os_update", "session_start", "session_start_with_rollout",
    "user_engagement"}
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
RESERVED_USER_PROPERTIES = {"first_open_time", "first_visit_time", "last_deep_link_referrer",
                            "user_id", "first_open_after_install"}
# Longer values than 100 characters are allowed for these parameters.
LONG_PARAMS = {"page_location": 1000, "page_referrer": 420, "page_title": 300}
# Recommended events whose monetary value needs a currency.
MONETARY = {"purchase", "refund", "add_to_cart", "remove_from_cart", "view_cart",
            "begin_checkout", "add_payment_info", "add_shipping_info", "view_item",
            "add_to_wishlist", "generate_lead"}
ITEMS_REQUIRED = {"purchase", "refund", "add_to_cart", "remove_from_cart", "view_cart",
                  "begin_checkout", "view_item", "add_to_wishlist"}


def name_ok(name, limit, what):
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{what} {name!r}: letters, digits and underscores, from a letter")
    if len(name) > limit:
        raise ValueError(f"{what} {name!r}: longer than {limit}")
    if name.startswith(RESERVED_PREFIXES):
        raise ValueError(f"{what} {name!r}: a reserved prefix")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar(where, value, limit=100):
    if is_number(value):
        return
    if isinstance(value, str):
        if len(value) > limit:
            raise ValueError(f"{where}: longer than {limit} characters")
        return
    raise ValueError(f"{where}: a parameter value is a string or a number")


def item(where, raw):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not an object")
    if "item_id" not in raw and "item_name" not in raw:
        raise ValueError(f"{where}: needs item_id or item_name")
    for key, value in raw.items():
        name_ok(key, 40, f"{where} parameter")
        scalar(f"{where}.{key}", value)
    for key in ("price", "quantity", "discount", "index"):
        if key in raw and not is_number(raw[key]):
            raise ValueError(f"{where}.{key}: not a number")


def event(where, raw):
    if not isinstance(raw, dict) or set(raw) - {"name", "params"}:
        raise ValueError(f"{where}: an object of name and params")
    name = raw.get("name")
    name_ok(name, 40, f"{where} name")
    if name in RESERVED_EVENTS:
        raise ValueError(f"{where} name {name!r}: reserved")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{where}.params: not an object")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"{where}.params: more than {MAX_PARAMS}")
    for key, value in params.items():
        name_ok(key, 40, f"{where} parameter")
        if key == "items":
            if not isinstance(value, list) or len(value) > MAX_ITEMS:
                raise ValueError(f"{where}.params.items: a list of at most {MAX_ITEMS}")
            for i, it in enumerate(value):
                item(f"{where}.params.items[{i}]", it)
        else:
            scalar(f"{where}.params.{key}", value, LONG_PARAMS.get(key, 100))
    if name in MONETARY and "value" in params:
        if not is_number(params["value"]):
            raise ValueError(f"{where}.params.value: not a number")
        currency = params.get("currency")
        if not isinstance(currency, str) or not re.match(r"^[A-Z]{3}$", currency):
            raise ValueError(f"{where}.params.currency: an ISO 4217 code is needed with value")
    if name in ITEMS_REQUIRED and not params.get("items"):
        raise ValueError(f"{where}.params.items: required for {name}")
    if name in ("purchase", "refund") and not isinstance(params.get("transaction_id"), str):
        raise ValueError(f"{where}.params.transaction_id: required for {name}")


def check(line, now_us):
    if len(line.encode()) > MAX_BODY:
        raise ValueError(f"body: larger than {MAX_BODY} bytes")
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError("body: not an object")
    unknown = set(body) - BODY_KEYS
    if unknown:
        raise ValueError(f"body: unknown keys {sorted(unknown)}")
    if not isinstance(body.get("client_id"), str) or not body["client_id"]:
        raise ValueError("client_id: required (a web stream's), a string")
    if "user_id" in body and (not isinstance(body["user_id"], str) or len(body["user_id"]) > 256):
        raise ValueError("user_id: a string of at most 256 characters")
    if "timestamp_micros" in body:
        t = body["timestamp_micros"]
        if not isinstance(t, int) or isinstance(t, bool):
            raise ValueError("timestamp_micros: not an integer")
        # Up to 72 hours back; not in the future.
        if not now_us - 72 * 3600 * 10**6 <= t <= now_us + 60 * 10**6:
            raise ValueError("timestamp_micros: more than 72 hours back or in the future")
    events = body.get("events")
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS:
        raise ValueError(f"events: 1 to {MAX_EVENTS}")
    for i, raw in enumerate(events):
        event(f"events[{i}]", raw)
    props = body.get("user_properties", {})
    if not isinstance(props, dict) or len(props) > MAX_USER_PROPERTIES:
        raise ValueError(f"user_properties: an object of at most {MAX_USER_PROPERTIES}")
    for key, value in props.items():
        name_ok(key, 24, "user property")
        if key in RESERVED_USER_PROPERTIES:
            raise ValueError(f"user property {key!r}: reserved")
        if not isinstance(value, dict) or set(value) != {"value"}:
            raise ValueError(f"user_properties.{key}: an object {{value}}")
        scalar(f"user_properties.{key}.value", value["value"], 36)


def main():
    now_us = int(time.time() * 10**6)
    check_bodies(lambda body: check(body, now_us))


if __name__ == "__main__":
    main()
