//! The marketing presets end to end (GA4, Meta Conversions API, Customer.io, Braze): each
//! through the running server into a receiver on loopback (`base_url`), with every body
//! the vendor would get checked by its validator (tests/vendors/<vendor>.py: the vendor's
//! official SDK where a registry has one, else its documented rules), the Segment → vendor
//! mapping asserted, and the vendor's documented error answers: retried, or dead-lettered
//! with the answer.
#![allow(clippy::disallowed_methods)] // vendors refuse old events: the messages are dated now

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::receiver::{ReceivedRequest, Receiver, Reply};
use common::{Fanout, Settings};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const FAST_RETRY: &str = r#"retry = { initial_backoff = "100ms", max_backoff = "1s" }"#;

const EMAIL: &str = " Jane.Doe@Example.com";
const PHONE: &str = "+1 (555) 010-9999";
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0";

/// A recent timestamp (vendors refuse old events: GA4 72 hours, Meta 7 days), whole
/// milliseconds, and the same in microseconds.
fn now() -> (String, i64) {
    let ms = chrono::Utc::now().timestamp_millis();
    let at = chrono::DateTime::from_timestamp_millis(ms).unwrap();
    (at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), ms * 1000)
}

/// What a browser and a backend send through Segment: identify, a custom track, page,
/// screen, group, alias, an Order Completed with two products, a Product Added, and an
/// anonymous track. Ids are `<prefix>-<kind>`.
fn messages(prefix: &str, at: &str) -> Vec<Value> {
    let context = json!({
        "ip": "203.0.113.9",
        "userAgent": USER_AGENT,
        "page": {"url": "https://shop.example.com/checkout", "referrer": "https://search.example.com/", "title": "Checkout"},
        "traits": {"email": EMAIL, "phone": PHONE, "firstName": "Jane", "lastName": "Doe",
                   "address": {"city": "New York", "state": "NY", "postalCode": "10001"}},
        "location": {"country": "US", "latitude": 40.7, "longitude": -74.0}
    });
    let id = |kind: &str| format!("{prefix}-{kind}");
    vec![
        json!({"type": "identify", "messageId": id("identify"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "context": context,
               "traits": {"email": EMAIL, "firstName": "Jane", "lastName": "Doe", "phone": PHONE,
                          "gender": "female", "birthday": "1990-04-01T00:00:00.000Z",
                          "avatar": "https://cdn.example.com/jane.png", "plan": "pro",
                          "createdAt": "2024-01-02T03:04:05Z",
                          "address": {"city": "New York", "state": "NY", "postalCode": "10001"}}}),
        json!({"type": "track", "messageId": id("track"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "context": context, "event": "Video Played",
               "properties": {"title": "Intro", "seconds": 42}}),
        json!({"type": "page", "messageId": id("page"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "context": context, "name": "Checkout",
               "properties": {"url": "https://shop.example.com/checkout", "title": "Checkout",
                              "referrer": "https://search.example.com/", "path": "/checkout"}}),
        json!({"type": "screen", "messageId": id("screen"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "name": "Settings", "properties": {"tab": "privacy"}}),
        json!({"type": "group", "messageId": id("group"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "groupId": "g-1", "traits": {"name": "Acme", "plan": "enterprise"}}),
        json!({"type": "alias", "messageId": id("alias"), "userId": "u-1", "previousId": "a-1",
               "timestamp": at}),
        json!({"type": "track", "messageId": id("order"), "userId": "u-1", "anonymousId": "a-1",
        "timestamp": at, "context": context, "event": "Order Completed",
        "properties": {"order_id": "o-1", "total": 27.5, "revenue": 25, "shipping": 2.5,
                       "tax": 0, "currency": "usd", "coupon": "WELCOME",
                       "products": [
                           {"product_id": "p-1", "sku": "PEN-1", "name": "Pen", "price": 2.5,
                            "quantity": 2, "category": "Office", "brand": "Acme"},
                           {"product_id": "p-2", "name": "Paper", "price": 20, "quantity": 1}
                       ]}}),
        json!({"type": "track", "messageId": id("added"), "userId": "u-1", "anonymousId": "a-1",
               "timestamp": at, "context": context, "event": "Product Added",
               "properties": {"product_id": "p-1", "name": "Pen", "price": 2.5, "quantity": 2,
                              "currency": "USD"}}),
        json!({"type": "track", "messageId": id("anonymous"), "anonymousId": "a-2",
               "timestamp": at, "event": "Signed Up", "properties": {"plan": "trial"}}),
    ]
}

/// A `[[destinations]]` of `preset` at the receiver, with `extra` lines.
fn section(name: &str, preset: &str, r: &Receiver, extra: &str) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\npreset = \"{preset}\"\nbase_url = \"{}\"\n{FAST_RETRY}\n{extra}\n",
        r.url("")
    )
}

/// The Python of the vendors' venv (`scripts/test` makes it); fails, never skips, when
/// it is missing.
fn vendors_python() -> PathBuf {
    let python = std::env::var_os("FANOUT_VENDORS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vendors-venv/bin/python")
        });
    assert!(
        python.exists(),
        "the vendors' venv is missing: {} (run scripts/test, which installs \
         tests/vendors/requirements.txt into it)",
        python.display()
    );
    python
}

/// Runs tests/vendors/<vendor>.py over `bodies` and asserts it finds them valid.
fn validate(vendor: &str, bodies: &[Value], args: &[&str]) {
    assert!(!bodies.is_empty(), "no {vendor} body to validate");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/vendors/{vendor}.py"));
    let mut child = Command::new(vendors_python())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = bodies.iter().map(|b| format!("{b}\n")).collect();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{vendor}: {}\nbodies:\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bodies of every request answered 2xx.
fn delivered(requests: &[ReceivedRequest]) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.json().expect("a JSON body"))
        .collect()
}

fn sha256(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// GA4: one event per request to /mp/collect with the stream's id and secret as query;
/// page → page_view, Order Completed → purchase (value = total), Product Added →
/// add_to_cart, other tracks by name in snake_case; identify, screen, group and alias are
/// not sent. The Measurement Protocol answers 2xx even to events it drops, so its only
/// error answers are 5xx and 429: retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ga4_sends_recommended_events_and_retries_server_errors() {
    let r = Receiver::start().await;
    r.set_default(Reply::status(204));
    r.push_reply(Reply::status(503));
    r.push_reply(Reply::status(429).header("retry-after", "1"));
    let f = Fanout::start_with(Settings::default().section(&section(
        "ga4",
        "ga4",
        &r,
        r#"settings = { measurement_id = "G-TEST123", api_secret = "s3cret" }"#,
    )));
    let (at, micros) = now();
    f.send_batch(json!(messages("g", &at))).await;
    let requests = r.wait_until(WAIT, |rs| delivered(rs).len() >= 5).await;
    let bodies = delivered(&requests);
    assert_eq!(bodies.len(), 5, "{requests:#?}");
    let all: Vec<Value> = requests.iter().filter_map(|r| r.json()).collect();
    validate("ga4", &all, &[]);
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/mp/collect");
        assert_eq!(
            request.query.as_deref(),
            Some("api_secret=s3cret&measurement_id=G-TEST123")
        );
    }
    let refused: Vec<&ReceivedRequest> = requests.iter().filter(|r| !r.ok()).collect();
    let statuses: Vec<u16> = refused.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 429]);
    for request in refused {
        assert!(
            bodies.contains(&request.json().unwrap()),
            "a refused request is sent again until delivered"
        );
    }

    let event = |name: &str| -> Value {
        let body = bodies
            .iter()
            .find(|b| b["events"][0]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {bodies:#?}"));
        assert_eq!(body["events"].as_array().unwrap().len(), 1);
        body.clone()
    };
    let purchase = event("purchase");
    assert_eq!(purchase["client_id"], "a-1");
    assert_eq!(purchase["user_id"], "u-1");
    assert_eq!(purchase["timestamp_micros"], micros);
    assert_eq!(
        purchase["events"][0]["params"],
        json!({
            "transaction_id": "o-1", "value": 27.5, "currency": "USD", "coupon": "WELCOME",
            "shipping": 2.5, "tax": 0, "engagement_time_msec": 1,
            "items": [
                {"item_id": "p-1", "item_name": "Pen", "item_brand": "Acme",
                 "item_category": "Office", "price": 2.5, "quantity": 2},
                {"item_id": "p-2", "item_name": "Paper", "price": 20, "quantity": 1}
            ]
        })
    );
    assert_eq!(
        event("add_to_cart")["events"][0]["params"],
        json!({"currency": "USD", "engagement_time_msec": 1,
               "items": [{"item_id": "p-1", "item_name": "Pen", "price": 2.5, "quantity": 2}]})
    );
    assert_eq!(
        event("page_view")["events"][0]["params"],
        json!({"page_location": "https://shop.example.com/checkout",
               "page_referrer": "https://search.example.com/", "page_title": "Checkout",
               "engagement_time_msec": 1})
    );
    assert_eq!(
        event("video_played")["events"][0]["params"],
        json!({"title": "Intro", "seconds": 42, "engagement_time_msec": 1})
    );
    let anonymous = event("signed_up");
    assert_eq!(anonymous["client_id"], "a-2");
    assert!(anonymous.get("user_id").is_none());
}

/// Meta: the e-commerce events and page views in `data` batches to
/// /{version}/{pixel}/events with the token as Bearer; user data hashed as Meta's SDK
/// normalises (the validator recomputes em and ph from the plain values); 5xx retried; a
/// 400 invalid-parameter answer dead-letters the batch with the answer, a 400 throttling
/// answer (`retry_on`) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_sends_hashed_standard_events_and_dead_letters_invalid_ones() {
    let r = Receiver::start().await;
    r.set_default(Reply::json(
        200,
        r#"{"events_received":1,"fbtrace_id":"AbC"}"#,
    ));
    r.push_reply(Reply::status(503));
    let f = Fanout::start_with(
        Settings::default()
            .env("PRESETS_META_TOKEN", "EAAB-token")
            .section(&section(
                "meta",
                "meta_capi",
                &r,
                r#"settings = { pixel_id = "1234567890", access_token_env = "PRESETS_META_TOKEN", test_event_code = "TEST42" }"#,
            )),
    );
    let (at, micros) = now();
    f.send_batch(json!(messages("m", &at))).await;
    let events = |rs: &[ReceivedRequest]| -> Vec<Value> {
        delivered(rs)
            .iter()
            .flat_map(|b| b["data"].as_array().unwrap().clone())
            .collect()
    };
    let requests = r.wait_until(WAIT, |rs| events(rs).len() >= 3).await;
    let events = events(&requests);
    assert_eq!(events.len(), 3, "{requests:#?}");
    let all: Vec<Value> = requests.iter().filter_map(|r| r.json()).collect();
    validate("meta_capi", &all, &["--email", EMAIL, "--phone", PHONE]);
    assert_eq!(requests[0].status, 503, "retried, then delivered");
    for request in &requests {
        assert_eq!(request.path, "/v24.0/1234567890/events");
        assert_eq!(request.header("authorization"), Some("Bearer EAAB-token"));
        assert_eq!(request.json().unwrap()["test_event_code"], "TEST42");
    }
    let event = |name: &str| -> Value {
        events
            .iter()
            .find(|e| e["event_name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {events:#?}"))
            .clone()
    };
    let purchase = event("Purchase");
    assert_eq!(purchase["event_id"], "m-order");
    assert_eq!(purchase["event_time"], micros / 1_000_000);
    assert_eq!(purchase["action_source"], "website");
    assert_eq!(
        purchase["event_source_url"],
        "https://shop.example.com/checkout"
    );
    assert_eq!(
        purchase["user_data"],
        json!({
            "em": sha256("jane.doe@example.com"),
            "ph": sha256("15550109999"),
            "fn": sha256("jane"),
            "ln": sha256("doe"),
            "ct": sha256("newyork"),
            "st": sha256("ny"),
            "zp": sha256("10001"),
            "external_id": sha256("u-1"),
            "client_ip_address": "203.0.113.9",
            "client_user_agent": USER_AGENT,
        })
    );
    assert_eq!(
        purchase["custom_data"],
        json!({"currency": "USD", "value": 25, "order_id": "o-1",
               "contents": [{"id": "p-1", "quantity": 2, "item_price": 2.5},
                            {"id": "p-2", "quantity": 1, "item_price": 20}]})
    );
    assert_eq!(
        event("AddToCart")["custom_data"],
        json!({"currency": "USD", "value": 2.5, "content_ids": ["p-1"],
               "contents": [{"id": "p-1", "quantity": 2, "item_price": 2.5}]})
    );
    assert!(event("PageView").get("custom_data").is_none());

    // Meta's answer to an event it will never take (here: too old) is a 400 naming it.
    let answer = r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804003,"is_transient":false,"error_user_title":"Event Timestamp Too Old","fbtrace_id":"AbC"}}"#;
    r.push_reply(Reply::json(400, answer));
    let (at, _) = now();
    let order = messages("m2", &at).remove(6);
    f.send_batch(json!([order])).await;
    let rows = f.wait_dead_letters("meta", 1, WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["reason"], "rejected");
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["response"], answer);

    // Throttling is a 400 too, told apart by its error code: retried, then delivered.
    let throttled = r#"{"error":{"message":"(#17) User request limit reached","type":"OAuthException","is_transient":true,"code":17,"error_subcode":2446079,"fbtrace_id":"AbC"}}"#;
    r.push_reply(Reply::json(400, throttled));
    let (at, _) = now();
    f.send_batch(json!([messages("m3", &at).remove(6)])).await;
    let carries =
        |request: &ReceivedRequest| request.json().unwrap()["data"][0]["event_id"] == "m3-order";
    let requests = r
        .wait_until(WAIT, |rs| rs.iter().any(|r| r.ok() && carries(r)))
        .await;
    let statuses: Vec<u16> = requests
        .iter()
        .filter(|r| carries(r))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [400, 200]);
    assert_eq!(
        f.dead_letters("meta").await.len(),
        1,
        "only the invalid event"
    );
}

/// Customer.io: every Segment call as a Track API v2 batch entry (identify → person
/// identify, track → event, page, screen, group → object, alias → merge) with Basic
/// site_id:api_key; 429 with Retry-After retried; a 400 dead-letters the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customerio_sends_every_call_in_v2_batches() {
    let r = Receiver::start().await;
    r.push_reply(Reply::status(429).header("retry-after", "1"));
    let f = Fanout::start_with(
        Settings::default()
            .env("PRESETS_CIO_KEY", "cio-key")
            .section(&section(
                "cio",
                "customerio",
                &r,
                r#"settings = { site_id = "site-1", api_key_env = "PRESETS_CIO_KEY" }"#,
            )),
    );
    let (at, micros) = now();
    let seconds = micros / 1_000_000;
    f.send_batch(json!(messages("c", &at))).await;
    let entries = |rs: &[ReceivedRequest]| -> Vec<Value> {
        delivered(rs)
            .iter()
            .flat_map(|b| b["batch"].as_array().unwrap().clone())
            .collect()
    };
    let requests = r.wait_until(WAIT, |rs| entries(rs).len() >= 9).await;
    let entries = entries(&requests);
    assert_eq!(entries.len(), 9, "{requests:#?}");
    let all: Vec<Value> = requests.iter().filter_map(|r| r.json()).collect();
    validate("customerio", &all, &[]);
    assert_eq!(requests[0].status, 429, "retried, then delivered");
    for request in &requests {
        assert_eq!(request.path, "/api/v2/batch");
        // base64("site-1:cio-key")
        assert_eq!(
            request.header("authorization"),
            Some("Basic c2l0ZS0xOmNpby1rZXk=")
        );
    }
    let entry = |action: &str, name: Option<&str>| -> Value {
        entries
            .iter()
            .find(|e| e["action"] == action && name.is_none_or(|n| e["name"] == n))
            .unwrap_or_else(|| panic!("no {action} {name:?} in {entries:#?}"))
            .clone()
    };
    assert_eq!(
        entry("identify", None),
        json!({
            "type": "person", "action": "identify", "identifiers": {"id": "u-1"},
            "timestamp": seconds,
            "attributes": {"email": EMAIL, "firstName": "Jane", "lastName": "Doe",
                           "phone": PHONE, "gender": "female",
                           "birthday": "1990-04-01T00:00:00.000Z",
                           "avatar": "https://cdn.example.com/jane.png", "plan": "pro",
                           "address": {"city": "New York", "state": "NY", "postalCode": "10001"},
                           "created_at": 1704164645, "anonymous_id": "a-1"}
        })
    );
    assert_eq!(
        entry("event", Some("Order Completed"))["identifiers"],
        json!({"id": "u-1"})
    );
    assert_eq!(entry("event", Some("Order Completed"))["id"], "c-order");
    assert_eq!(
        entry("event", Some("Video Played")),
        json!({"type": "person", "action": "event", "identifiers": {"id": "u-1"},
               "name": "Video Played", "id": "c-track", "timestamp": seconds,
               "attributes": {"title": "Intro", "seconds": 42}})
    );
    assert_eq!(
        entry("event", Some("Signed Up"))["identifiers"],
        json!({"anonymous_id": "a-2"})
    );
    assert_eq!(
        entry("page", None)["name"],
        "https://shop.example.com/checkout"
    );
    assert_eq!(entry("screen", None)["name"], "Settings");
    assert_eq!(
        entry("identify", None)["type"],
        "person",
        "the person identify, not the object"
    );
    let object = entries.iter().find(|e| e["type"] == "object").unwrap();
    assert_eq!(
        object,
        &json!({"type": "object", "action": "identify",
                "identifiers": {"object_type_id": "1", "object_id": "g-1"},
                "timestamp": seconds,
                "attributes": {"name": "Acme", "plan": "enterprise"},
                "cio_relationships": [{"identifiers": {"id": "u-1"}}]})
    );
    assert_eq!(
        entry("merge", None),
        json!({"type": "person", "action": "merge", "primary": {"id": "u-1"},
               "secondary": {"id": "a-1"}})
    );

    let answer =
        r#"{"errors":[{"reason":"invalid","field":"identifiers","message":"must have an id"}]}"#;
    r.push_reply(Reply::json(400, answer));
    let (at, _) = now();
    f.send_batch(json!([messages("c2", &at).remove(1)])).await;
    let rows = f.wait_dead_letters("cio", 1, WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["response"], answer);
}

/// Braze: identify → attributes with Braze's standard names, Order Completed → one
/// purchase per product, other tracks → custom events (anonymous ones on an alias-only
/// user), Bearer REST key; page, screen, group and alias are not sent. 429 retried; a 400
/// dead-letters the batch with Braze's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braze_sends_attributes_purchases_and_events() {
    let r = Receiver::start().await;
    r.set_default(Reply::json(201, r#"{"message":"success"}"#));
    r.push_reply(
        Reply::json(429, r#"{"message":"rate limited"}"#).header("x-ratelimit-reset", "1"),
    );
    let f = Fanout::start_with(
        Settings::default()
            .env("PRESETS_BRAZE_KEY", "braze-key")
            .section(&section(
                "braze",
                "braze",
                &r,
                r#"settings = { api_key_env = "PRESETS_BRAZE_KEY", app_id = "app-1" }"#,
            )),
    );
    let (at, _) = now();
    f.send_batch(json!(messages("b", &at))).await;
    let items = |rs: &[ReceivedRequest], key: &str| -> Vec<Value> {
        delivered(rs)
            .iter()
            .flat_map(|b| b[key].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let requests = r
        .wait_until(WAIT, |rs| {
            !items(rs, "attributes").is_empty()
                && items(rs, "purchases").len() >= 2
                && items(rs, "events").len() >= 3
        })
        .await;
    let all: Vec<Value> = requests.iter().filter_map(|r| r.json()).collect();
    validate("braze", &all, &[]);
    assert_eq!(requests[0].status, 429, "retried, then delivered");
    for request in &requests {
        assert_eq!(request.path, "/users/track");
        assert_eq!(request.header("authorization"), Some("Bearer braze-key"));
    }
    // fanout writes times as it stores them: RFC 3339, milliseconds, UTC.
    let time = at.clone();
    assert_eq!(
        items(&requests, "attributes"),
        [json!({
            "external_id": "u-1", "email": EMAIL, "first_name": "Jane", "last_name": "Doe",
            "phone": PHONE, "gender": "F", "dob": "1990-04-01", "home_city": "New York",
            "country": "US", "image_url": "https://cdn.example.com/jane.png",
            "current_location": {"latitude": 40.7, "longitude": -74.0},
            "plan": "pro", "createdAt": "2024-01-02T03:04:05Z",
            "address": {"city": "New York", "state": "NY", "postalCode": "10001"}
        })]
    );
    let order_properties = json!({"order_id": "o-1", "total": 27.5, "revenue": 25,
                                  "shipping": 2.5, "tax": 0, "currency": "usd",
                                  "coupon": "WELCOME"});
    assert_eq!(
        items(&requests, "purchases"),
        [
            json!({"external_id": "u-1", "app_id": "app-1", "product_id": "p-1", "price": 2.5,
                   "quantity": 2, "currency": "USD", "time": time,
                   "properties": order_properties}),
            json!({"external_id": "u-1", "app_id": "app-1", "product_id": "p-2", "price": 20,
                   "quantity": 1, "currency": "USD", "time": time,
                   "properties": order_properties}),
        ]
    );
    let events = items(&requests, "events");
    let names: Vec<&str> = events.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names.len(),
        3,
        "page, screen, group, alias are not sent: {names:?}"
    );
    let played = events.iter().find(|e| e["name"] == "Video Played").unwrap();
    assert_eq!(
        played,
        &json!({"external_id": "u-1", "app_id": "app-1", "name": "Video Played", "time": time,
                "properties": {"title": "Intro", "seconds": 42}})
    );
    let anonymous = events.iter().find(|e| e["name"] == "Signed Up").unwrap();
    assert_eq!(
        anonymous["user_alias"],
        json!({"alias_name": "a-2", "alias_label": "anonymous_id"})
    );
    assert_eq!(anonymous["_update_existing_only"], false);
    assert!(anonymous.get("external_id").is_none());

    let answer = r#"{"message":"Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.","errors":[]}"#;
    r.push_reply(Reply::json(400, answer));
    let (at, _) = now();
    f.send_batch(json!([messages("b2", &at).remove(1)])).await;
    let rows = f.wait_dead_letters("braze", 1, WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["response"], answer);
}
