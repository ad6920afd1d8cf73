"""Validates Meta Conversions API request bodies with Meta's official SDK
(PyPI facebook-business: its serverside Event, UserData, CustomData and Content models
and its Normalize rules).

stdin: one request body per line (`{"data": [...], ...}`). Options:
  --email TEXT / --phone TEXT: the plain values the messages carried; every event's
  user_data.em / .ph must equal the SDK's normalised SHA-256 of them.
Exit 0 when every body is valid, else 1 with the reasons on stderr.
"""

import argparse
import json
import re
import time

from facebook_business.adobjects.serverside.action_source import ActionSource
from facebook_business.adobjects.serverside.content import Content
from facebook_business.adobjects.serverside.custom_data import CustomData
from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.normalize import Normalize
from facebook_business.adobjects.serverside.user_data import UserData

from common import check_bodies

MAX_EVENTS = 1000  # per request (Conversions API docs, "Send requests")
MAX_AGE = 7 * 24 * 3600  # events older than seven days are refused
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# user_data keys Meta asks to be hashed (customer information parameters).
HASHED = {"em", "ph", "fn", "ln", "ct", "st", "zp", "country", "db", "ge"}
PLAIN = {"client_ip_address", "client_user_agent", "fbc", "fbp", "subscription_id",
         "fb_login_id", "lead_id", "external_id"}
# UserData's constructor arguments for the hashed keys (lists).
USER_DATA_ARGS = {"em": "emails", "ph": "phones", "fn": "first_names", "ln": "last_names",
                  "ct": "cities", "st": "states", "zp": "zip_codes",
                  "country": "country_codes", "db": "dates_of_birth"}
CUSTOM_TYPED = {"value", "net_revenue", "currency", "content_name", "content_category",
                "content_ids", "contents", "content_type", "order_id", "predicted_ltv",
                "num_items", "status", "search_string", "item_number"}


def as_list(value):
    return value if isinstance(value, list) else [value]


def user_data(raw):
    unknown = set(raw) - HASHED - PLAIN
    if unknown:
        raise ValueError(f"user_data: unknown keys {sorted(unknown)}")
    if not raw:
        raise ValueError("user_data: no customer information parameter")
    args = {}
    for key, arg in USER_DATA_ARGS.items():
        if key in raw:
            values = as_list(raw[key])
            for v in values:
                if not isinstance(v, str) or not HEX64.match(v):
                    raise ValueError(f"user_data.{key}: not a lower-case SHA-256 hex digest")
            args[arg] = values
    if "external_id" in raw:
        for v in as_list(raw["external_id"]):
            if not isinstance(v, str) or not v:
                raise ValueError("user_data.external_id: not a non-empty string")
        args["external_ids"] = as_list(raw["external_id"])
    for key in ("client_ip_address", "client_user_agent", "fbc", "fbp"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise ValueError(f"user_data.{key}: not a string")
            args[key] = raw[key]
    return UserData(**args)


def content(i, raw):
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        raise ValueError(f"custom_data.contents[{i}]: needs a string id")
    unknown = set(raw) - {"id", "quantity", "item_price", "title", "description", "brand",
                          "category", "delivery_category"}
    if unknown:
        raise ValueError(f"custom_data.contents[{i}]: unknown keys {sorted(unknown)}")
    if "quantity" in raw and (not isinstance(raw["quantity"], int) or isinstance(raw["quantity"], bool)):
        raise ValueError(f"custom_data.contents[{i}].quantity: not an integer")
    if "item_price" in raw and (not isinstance(raw["item_price"], (int, float)) or isinstance(raw["item_price"], bool)):
        raise ValueError(f"custom_data.contents[{i}].item_price: not a number")
    return Content(product_id=raw["id"], quantity=raw.get("quantity"),
                   item_price=raw.get("item_price"))


def custom_data(raw):
    if not isinstance(raw, dict):
        raise ValueError("custom_data: not an object")
    data = CustomData()
    # The SDK's setters check the types (value a number, currency a string…).
    for key in CUSTOM_TYPED - {"contents"}:
        if key in raw:
            setattr(data, key, raw[key])
    if "contents" in raw:
        data.contents = [content(i, c) for i, c in enumerate(raw["contents"])]
    custom = {k: v for k, v in raw.items() if k not in CUSTOM_TYPED}
    if custom:
        data.custom_properties = custom
    return data


def event(raw, now):
    unknown = set(raw) - set(Event.param_types)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    for key in ("event_name", "event_time", "action_source", "user_data"):
        if key not in raw:
            raise ValueError(f"missing {key}")
    if not isinstance(raw["event_name"], str) or not raw["event_name"]:
        raise ValueError("event_name: not a non-empty string")
    built = Event(event_name=raw["event_name"], event_time=raw["event_time"])
    if not now - MAX_AGE <= raw["event_time"] <= now + 600:
        raise ValueError("event_time: more than seven days old or in the future")
    built.action_source = ActionSource(raw["action_source"])
    for key in ("event_id", "event_source_url"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise ValueError(f"{key}: not a string")
            setattr(built, key, raw[key])
    built.user_data = user_data(raw["user_data"])
    if "custom_data" in raw:
        built.custom_data = custom_data(raw["custom_data"])
    if raw["action_source"] == "website":
        # Required for website events (server event parameters).
        if "client_user_agent" not in raw["user_data"]:
            raise ValueError("action_source website needs user_data.client_user_agent")
        if "event_source_url" not in raw:
            raise ValueError("action_source website needs event_source_url")
    normal = built.normalize()
    # What the SDK would send is what was sent (hashed values pass through untouched).
    for key in HASHED & set(raw["user_data"]):
        if sorted(normal["user_data"][key]) != sorted(set(as_list(raw["user_data"][key]))):
            raise ValueError(f"user_data.{key}: differs from the SDK's normalisation")
    if "custom_data" in raw and "currency" in raw["custom_data"]:
        if normal["custom_data"]["currency"] != raw["custom_data"]["currency"].lower():
            raise ValueError("custom_data.currency: not an ISO 4217 code")
    return normal


def check(body, expect, now):
    if not isinstance(body, dict):
        raise ValueError("body: not an object")
    unknown = set(body) - {"data", "test_event_code"}
    if unknown:
        raise ValueError(f"body: unknown keys {sorted(unknown)}")
    data = body.get("data")
    if not isinstance(data, list) or not 1 <= len(data) <= MAX_EVENTS:
        raise ValueError(f"data: needs 1 to {MAX_EVENTS} events")
    for i, raw in enumerate(data):
        try:
            event(raw, now)
            for key, plain in expect.items():
                if key in raw["user_data"] and raw["user_data"][key] != Normalize.normalize_field(key, plain):
                    raise ValueError(f"user_data.{key}: not the SDK's hash of {plain!r}")
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"data[{i}]: {e}") from None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--email")
    parser.add_argument("--phone")
    args = parser.parse_args()
    expect = {k: v for k, v in (("em", args.email), ("ph", args.phone)) if v}
    now = int(time.time())
    check_bodies(lambda body: check(json.loads(body), expect, now))


if __name__ == "__main__":
    main()
