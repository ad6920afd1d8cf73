//! The `klaviyo` destination against a Klaviyo-shaped receiver on loopback
//! (`tests/common/klaviyo.rs`): what arrives for each Segment call (sent by the official
//! Python client or over HTTP), per-event and bulk requests, the order events, revision
//! 2023-01-24's flat bodies, 429 with Retry-After, a 400 for one event in a batch, messages
//! without a profile identifier, a wrong API key. Every test ends by checking every request
//! it caused: the headers, and each body against Klaviyo's own SDK models (seed 002's shape
//! for 2023-01-24).
//!
//! The tests run on a multi-threaded runtime so the receiver keeps answering while a test
//! blocks (starting fanout, running its CLI).
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::clients::run_python;
use common::klaviyo::{
    error_body, path_of, reply, Event, Klaviyo, API_KEY, BULK, CURRENT, EVENTS, FLAT, KEY_ENV,
    PROFILE_IMPORT, PROFILE_JOBS,
};
use common::receiver::ReceivedRequest;
use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

/// Fast retries, so a test sees several attempts within a second or two.
const FAST_RETRY: &str = r#"{ initial_backoff = "100ms", max_backoff = "1s" }"#;

/// A fanout with the file destination `out` and the Klaviyo destination `kl` sending to `k`
/// with the key `key`; `extra` are more `key = value` lines (raw TOML) for `kl`.
fn start_with_key(k: &Klaviyo, key: &str, extra: &[(&str, &str)]) -> Fanout {
    let mut lines = vec![
        ("name", "\"kl\"".to_string()),
        ("kind", "\"klaviyo\"".to_string()),
        ("api_key_env", format!("\"{KEY_ENV}\"")),
        ("base_url", format!("\"{}\"", k.base_url())),
        ("retry", FAST_RETRY.to_string()),
    ];
    if k.revision() != CURRENT {
        lines.push(("revision", format!("\"{}\"", k.revision())));
    }
    for (key, value) in extra {
        lines.retain(|(k, _)| k != key);
        lines.push((key, value.to_string()));
    }
    let mut section = String::from("[[destinations]]\n");
    for (key, value) in lines {
        section.push_str(&format!("{key} = {value}\n"));
    }
    Fanout::start_with(Settings::default().section(&section).env(KEY_ENV, key))
}

fn start(k: &Klaviyo, extra: &[(&str, &str)]) -> Fanout {
    start_with_key(k, API_KEY, extra)
}

/// Posts `messages` to `/v1/batch` in requests of at most 500, asserting each 200.
async fn send(f: &Fanout, messages: &[Value]) {
    for chunk in messages.chunks(500) {
        let body = json!({"batch": chunk});
        assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
    }
}

fn track(id: &str, user: &str, event: &str, properties: Value) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": event, "properties": properties})
}

/// `n` tracks `{tag}-{i}` over `users` users.
fn tracks(tag: &str, n: usize, users: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            track(
                &format!("{tag}-{i}"),
                &format!("{tag}-user-{}", i % users),
                "Delivered",
                json!({"i": i}),
            )
        })
        .collect()
}

fn id_set<'a>(ids: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
    ids.into_iter().map(str::to_string).collect()
}

fn dead_ids(rows: &[Value]) -> HashSet<String> {
    rows.iter()
        .map(|r| {
            r["message"]["messageId"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Waits until the file destination holds `n` messages; returns them by messageId.
async fn stored(f: &Fanout, n: usize) -> HashMap<String, Value> {
    let lines = f.wait_delivered(n).await;
    assert_eq!(lines.len(), n, "the file destination got {lines:#?}");
    lines
        .into_iter()
        .map(|m| (m["messageId"].as_str().unwrap().to_string(), m))
        .collect()
}

/// Waits until every unique_id in `wanted` arrived and `f`'s Klaviyo destination has
/// settled everything (nothing more will come), and checks every request received with
/// the SDK models.
async fn arrive_valid(f: &Fanout, k: &Klaviyo, wanted: &HashSet<String>, timeout: Duration) {
    let missing = k.wait_for_unique_ids(wanted, timeout).await;
    assert!(missing.is_empty(), "missing {missing:?}\n{}", k.summary());
    f.wait_settled("kl").await;
    k.assert_valid().await;
}

/// The messageIds of `messages`.
fn message_ids(messages: &[Value]) -> HashSet<String> {
    id_set(messages.iter().map(|m| m["messageId"].as_str().unwrap()))
}

/// Fails unless every request went to `path`.
fn assert_only_path(k: &Klaviyo, path: &str) {
    assert!(
        k.requests()
            .iter()
            .all(|r| r.path.trim_end_matches('/') == path),
        "only POST {path}:\n{}",
        k.summary()
    );
}

/// A JSON number as f64 (25 and 25.0 alike).
fn number(value: &Option<Value>) -> Option<f64> {
    value
        .as_ref()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")))
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .to_utc()
}

/// The event's `time` is the stored message's corrected `timestamp`, cut to the second.
fn assert_time_from(event: &Event, message: &Value) {
    let sent = time(event.time.as_deref().expect("the event has a time"));
    let corrected = time(message["timestamp"].as_str().expect("stored timestamp"));
    let want = DateTime::from_timestamp(corrected.timestamp(), 0).unwrap();
    assert_eq!(
        sent, want,
        "time of {:?}: sent {:?}, stored timestamp {}",
        event.unique_id, event.time, message["timestamp"]
    );
}

/// The only event with `unique_id`, failing when there are none or several.
fn the_event<'a>(events: &'a [Event], unique_id: &str) -> &'a Event {
    let found: Vec<&Event> = events
        .iter()
        .filter(|e| e.unique_id.as_deref() == Some(unique_id))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "events with unique_id {unique_id}: {found:#?}"
    );
    found[0]
}

/// Fails when some unique_id arrived in more than one 2xx-answered event.
fn assert_each_once(k: &Klaviyo) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in k.unique_ids() {
        *counts.entry(id).or_default() += 1;
    }
    let repeated: Vec<_> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(repeated.is_empty(), "sent more than once: {repeated:?}");
}

fn ok_requests(k: &Klaviyo, path: &str) -> Vec<ReceivedRequest> {
    k.requests()
        .into_iter()
        .filter(|r| r.ok() && r.path.trim_end_matches('/') == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_arrive_as_events_and_profile_upserts() {
    let k = Klaviyo::start(CURRENT).await;
    // Names as sent: the standard names have their own tests. The script's alias links
    // anon-123 to user-1: without enrich_identity = false, identity stitching would send
    // its anonymous track as user-1's (tests/identity.rs covers that).
    let f = start(
        &k,
        &[("ecommerce_names", "false"), ("enrich_identity", "false")],
    );
    run_python(&f, &[]).await;

    // track (Order Completed, revenue 42.5), identify, page, screen, group, alias, and an
    // anonymous track with the messageId fixed-msg-id-0.
    let stored = stored(&f, 7).await;
    let of_type = |t: &str| -> Vec<&Value> { stored.values().filter(|m| m["type"] == t).collect() };
    let id = |m: &Value| m["messageId"].as_str().unwrap().to_string();
    let order = of_type("track")
        .into_iter()
        .find(|m| m["event"] == "Order Completed")
        .expect("the order track");
    let page = of_type("page")[0];
    let screen = of_type("screen")[0];
    let alias = of_type("alias")[0];
    let signed_up = &stored["fixed-msg-id-0"];
    let wanted = id_set([order, page, screen, signed_up].map(|m| m["messageId"].as_str().unwrap()));
    let missing = k
        .wait_for_unique_ids(&wanted, Duration::from_secs(20))
        .await;
    assert!(missing.is_empty(), "missing {missing:?}\n{}", k.summary());
    k.wait(
        "the identify and group profile upserts",
        Duration::from_secs(20),
        |k| k.profiles().len() >= 2,
    )
    .await;
    // Everything settled: anything more (the alias, a repeat) would have come by now.
    f.wait_settled("kl").await;
    k.assert_valid().await;

    let events = k.events();
    assert_eq!(events.len(), 4, "track, page, screen, track: {events:#?}");
    assert_each_once(&k);
    assert!(!k.unique_ids().contains(&id(alias)), "the alias was sent");

    let e = the_event(&events, &id(order));
    assert_eq!(e.metric, "Order Completed");
    assert_eq!(
        number(&e.value),
        Some(42.5),
        "value from properties.revenue"
    );
    assert_eq!(e.value_currency.as_deref(), Some("USD"));
    assert_eq!(
        e.properties,
        json!({"revenue": 42.5, "currency": "USD", "i": 0})
    );
    assert_eq!(e.profile, json!({"external_id": "user-1"}));
    assert_time_from(e, order);

    let e = the_event(&events, &id(page));
    assert_eq!(e.metric, "Viewed Page");
    assert_eq!(
        e.properties,
        json!({"url": "https://example.com/docs/qs", "name": "Quickstart", "category": "Docs"})
    );
    assert_eq!(e.value, None);
    assert_eq!(e.profile, json!({"external_id": "user-1"}));
    assert_time_from(e, page);

    let e = the_event(&events, &id(screen));
    assert_eq!(e.metric, "Viewed Screen");
    assert_eq!(
        e.properties,
        json!({"tab": "privacy", "name": "Profile", "category": "Settings"})
    );
    assert_time_from(e, screen);
    // The client's own timestamp (2024-01-02T03:04:05.678Z), corrected by a few ms at most.
    assert_eq!(
        e.time.as_deref().map(time),
        Some(time("2024-01-02T03:04:05Z"))
    );

    let e = the_event(&events, "fixed-msg-id-0");
    assert_eq!(e.metric, "Signed Up");
    assert_eq!(e.properties, json!({"k": "v"}));
    assert_eq!(e.profile, json!({"anonymous_id": "anon-123"}));
    assert_time_from(e, signed_up);

    let profiles = k.profiles();
    assert_eq!(profiles.len(), 2, "identify and group: {profiles:#?}");
    assert!(
        profiles.contains(&json!({
            "email": "u1@example.com", "external_id": "user-1", "properties": {"plan": "pro"}
        })),
        "the identify's upsert: {profiles:#?}"
    );
    assert!(
        profiles.contains(&json!({"external_id": "user-1", "organization": "Acme"})),
        "the group's upsert: {profiles:#?}"
    );
    assert_eq!(
        f.dead_letters("kl").await,
        Vec::<Value>::new(),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_false_sends_one_request_per_event() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[
            ("bulk", "false"),
            ("batch", r#"{ max_events = 100, linger = "300ms" }"#),
        ],
    );
    let sent = tracks("one", 10, 4);
    send(&f, &sent).await;
    arrive_valid(&f, &k, &message_ids(&sent), Duration::from_secs(20)).await;

    let requests = k.requests();
    assert_only_path(&k, EVENTS);
    assert_eq!(
        requests.len(),
        10,
        "one request per event:\n{}",
        k.summary()
    );
    assert_each_once(&k);
    for r in &requests {
        assert_eq!(r.status, 202);
    }
    let events = k.events();
    for m in &sent {
        let e = the_event(&events, m["messageId"].as_str().unwrap());
        assert_eq!(e.metric, "Delivered");
        assert_eq!(e.profile, json!({"external_id": m["userId"]}));
        assert_eq!(e.properties, m["properties"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_jobs_carry_many_events_per_request() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 1000, linger = "300ms" }"#)],
    );
    let sent = tracks("bulk", 50, 5);
    send(&f, &sent).await;
    arrive_valid(&f, &k, &message_ids(&sent), Duration::from_secs(20)).await;

    let requests = k.requests();
    assert_only_path(&k, BULK);
    assert_each_once(&k);
    let sizes: Vec<usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| common::klaviyo::events_of(i, r).len())
        .collect();
    eprintln!("events per bulk job: {sizes:?}");
    assert!(
        sizes.iter().any(|&n| n >= 10),
        "50 events sent at once went in jobs of {sizes:?}"
    );
    let events = k.events();
    for m in &sent {
        let e = the_event(&events, m["messageId"].as_str().unwrap());
        assert_eq!(e.profile, json!({"external_id": m["userId"]}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_jobs_stay_within_1000_events_when_orders_add_product_events() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 1000, linger = "300ms" }"#)],
    );
    // 600 orders of one product each: 1 200 events from 600 messages.
    let sent: Vec<Value> = (0..600)
        .map(|i| {
            track(
                &format!("ord-msg-{i}"),
                &format!("buyer-{}", i % 10),
                "Order Completed",
                json!({"order_id": format!("o{i}"), "total": 3,
                       "products": [{"product_id": "p", "price": 3}]}),
            )
        })
        .collect();
    send(&f, &sent).await;
    let wanted: HashSet<String> = (0..600)
        .flat_map(|i| [format!("ord-msg-{i}"), format!("o{i}_p")])
        .collect();
    let missing = k
        .wait_for_unique_ids(&wanted, Duration::from_secs(30))
        .await;
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        k.summary()
    );
    let sizes: Vec<usize> = k
        .requests()
        .iter()
        .enumerate()
        .map(|(i, r)| common::klaviyo::events_of(i, r).len())
        .collect();
    assert!(
        sizes.iter().all(|&n| n <= 1000),
        "a bulk job holds at most 1 000 events: {sizes:?}"
    );
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
    k.assert_valid().await;
}

/// An order of two products, sent with `bulk`.
async fn order_with_two_products(bulk: bool) {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[
            ("bulk", if bulk { "true" } else { "false" }),
            ("ecommerce_names", "false"),
        ],
    );
    let order = json!({
        "type": "track", "messageId": "order-msg-1", "userId": "buyer-1",
        "event": "Order Completed",
        "context": {"traits": {"email": "buyer@example.com"}},
        "properties": {
            "order_id": "ord-77", "revenue": 25, "currency": "EUR",
            "products": [
                {"product_id": "p1", "sku": "S-1", "name": "Pen", "price": 10, "quantity": 2},
                {"product_id": "p2", "name": "Pad", "price": 5}
            ]
        }
    });
    send(&f, std::slice::from_ref(&order)).await;
    let stored = stored(&f, 1).await;
    let wanted = id_set(["order-msg-1", "ord-77_p1", "ord-77_p2"]);
    arrive_valid(&f, &k, &wanted, Duration::from_secs(20)).await;

    let events = k.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    let profile = json!({"email": "buyer@example.com", "external_id": "buyer-1"});
    let e = the_event(&events, "order-msg-1");
    assert_eq!(e.metric, "Order Completed");
    assert_eq!(number(&e.value), Some(25.0));
    assert_eq!(e.value_currency.as_deref(), Some("EUR"));
    assert_eq!(e.properties, order["properties"]);
    assert_eq!(e.profile, profile);
    assert_time_from(e, &stored["order-msg-1"]);
    for (unique_id, name, value) in [("ord-77_p1", "Pen", 20.0), ("ord-77_p2", "Pad", 5.0)] {
        let e = the_event(&events, unique_id);
        assert_eq!(e.metric, "Ordered Product", "{e:#?}");
        assert_eq!(e.properties["name"], name, "{e:#?}");
        assert_eq!(e.properties["order_id"], "ord-77", "{e:#?}");
        assert_eq!(number(&e.value), Some(value), "price × quantity: {e:#?}");
        assert_eq!(e.value_currency.as_deref(), Some("EUR"), "{e:#?}");
        assert_eq!(e.profile, profile, "{e:#?}");
        assert_time_from(e, &stored["order-msg-1"]);
    }
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_completed_adds_one_ordered_product_per_product_in_a_bulk_job() {
    order_with_two_products(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_completed_adds_one_ordered_product_per_product_one_request_each() {
    order_with_two_products(false).await;
}

/// (metric, value, value_currency) of the only event with `unique_id`.
fn metric_and_value<'a>(
    events: &'a [Event],
    unique_id: &str,
) -> (&'a str, Option<f64>, Option<&'a str>) {
    let e = the_event(events, unique_id);
    (
        e.metric.as_str(),
        number(&e.value),
        e.value_currency.as_deref(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecommerce_events_arrive_under_klaviyos_standard_names_by_default() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(&k, &[]);
    let order = json!({
        "type": "track", "messageId": "std-order", "userId": "buyer-2",
        "event": "Order Completed",
        "context": {"traits": {"email": "buyer2@example.com"}},
        "properties": {
            "order_id": "ord-88", "revenue": 25, "shipping": 4, "tax": 2.5, "total": 31.5,
            "currency": "EUR",
            "products": [
                {"product_id": "p1", "name": "Pen", "price": 10, "quantity": 2},
                {"product_id": "p2", "name": "Pad", "price": 5}
            ]
        }
    });
    let sent = vec![
        order,
        track(
            "std-viewed",
            "buyer-2",
            "Product Viewed",
            json!({"product_id": "p1", "price": 10, "currency": "EUR"}),
        ),
        track(
            "std-added",
            "buyer-2",
            "Product Added",
            json!({"product_id": "p1", "value": 10, "currency": "EUR"}),
        ),
        track(
            "std-checkout",
            "buyer-2",
            "Checkout Started",
            json!({"revenue": 25, "total": 31.5, "currency": "EUR"}),
        ),
        track(
            "std-refunded",
            "buyer-2",
            "Order Refunded",
            json!({"order_id": "ord-88", "total": 31.5, "currency": "EUR"}),
        ),
        track(
            "std-cancelled",
            "buyer-2",
            "Order Cancelled",
            json!({"order_id": "ord-87", "currency": "EUR"}),
        ),
        track(
            "std-other",
            "buyer-2",
            "Signed Up",
            json!({"currency": "EUR"}),
        ),
    ];
    send(&f, &sent).await;
    let mut wanted = message_ids(&sent);
    wanted.extend(id_set(["ord-88_p1", "ord-88_p2"]));
    arrive_valid(&f, &k, &wanted, Duration::from_secs(20)).await;

    let events = k.events();
    assert_eq!(events.len(), 9, "{events:#?}");
    assert_each_once(&k);
    assert_eq!(
        metric_and_value(&events, "std-order"),
        ("Placed Order", Some(31.5), Some("EUR")),
        "an order's value is its total, with shipping and tax"
    );
    for (unique_id, name, value) in [("ord-88_p1", "Pen", 20.0), ("ord-88_p2", "Pad", 5.0)] {
        assert_eq!(
            metric_and_value(&events, unique_id),
            ("Ordered Product", Some(value), Some("EUR")),
            "price × quantity"
        );
        let e = the_event(&events, unique_id);
        assert_eq!(e.properties["name"], name, "{e:#?}");
        assert_eq!(e.properties["order_id"], "ord-88", "{e:#?}");
    }
    assert_eq!(
        metric_and_value(&events, "std-viewed"),
        ("Viewed Product", None, None),
        "a currency without a value is not sent"
    );
    assert_eq!(
        metric_and_value(&events, "std-added"),
        ("Added to Cart", Some(10.0), Some("EUR"))
    );
    assert_eq!(
        metric_and_value(&events, "std-checkout"),
        ("Started Checkout", Some(31.5), Some("EUR"))
    );
    assert_eq!(
        metric_and_value(&events, "std-refunded"),
        ("Refunded Order", Some(31.5), Some("EUR"))
    );
    assert_eq!(
        metric_and_value(&events, "std-cancelled"),
        ("Cancelled Order", None, None)
    );
    assert_eq!(
        metric_and_value(&events, "std-other"),
        ("Signed Up", None, None)
    );
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_override_and_extend_the_standard_names() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[(
            "metric_names",
            r#"{ "Order Completed" = "Purchase", "Signed Up" = "Registered" }"#,
        )],
    );
    let sent = vec![
        track(
            "mn-order",
            "u1",
            "Order Completed",
            json!({"order_id": "o-1", "total": 7,
              "products": [{"sku": "s-1", "price": 7}]}),
        ),
        track("mn-signed", "u1", "Signed Up", json!({})),
        track("mn-added", "u1", "Product Added", json!({})),
    ];
    send(&f, &sent).await;
    let mut wanted = message_ids(&sent);
    wanted.extend(id_set(["o-1_s-1"]));
    arrive_valid(&f, &k, &wanted, Duration::from_secs(20)).await;
    let events = k.events();
    assert_eq!(events.len(), 4, "{events:#?}");
    assert_eq!(the_event(&events, "mn-order").metric, "Purchase");
    assert_eq!(the_event(&events, "o-1_s-1").metric, "Ordered Product");
    assert_eq!(the_event(&events, "mn-signed").metric, "Registered");
    assert_eq!(the_event(&events, "mn-added").metric, "Added to Cart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecommerce_names_false_keeps_names_as_sent() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(&k, &[("ecommerce_names", "false")]);
    let sent = vec![
        track(
            "en-order",
            "u1",
            "Order Completed",
            json!({"order_id": "o-2", "revenue": 5,
              "total": 6, "currency": "USD", "products": [{"sku": "s-2", "price": 5}]}),
        ),
        track(
            "en-viewed",
            "u1",
            "Product Viewed",
            json!({"currency": "USD"}),
        ),
    ];
    send(&f, &sent).await;
    let mut wanted = message_ids(&sent);
    wanted.extend(id_set(["o-2_s-2"]));
    arrive_valid(&f, &k, &wanted, Duration::from_secs(20)).await;
    let events = k.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    assert_eq!(
        metric_and_value(&events, "en-order"),
        ("Order Completed", Some(6.0), Some("USD"))
    );
    assert_eq!(
        metric_and_value(&events, "o-2_s-2"),
        ("Ordered Product", Some(5.0), Some("USD"))
    );
    assert_eq!(
        metric_and_value(&events, "en-viewed"),
        ("Product Viewed", None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_2023_01_24_sends_seed_002_flat_events_one_per_request() {
    let k = Klaviyo::start(FLAT).await;
    // bulk stays at its default (true): that revision has no bulk jobs.
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 100, linger = "300ms" }"#)],
    );
    let messages = vec![
        json!({"type": "track", "messageId": "flat-1", "userId": "u1", "event": "Checkout",
               "context": {"traits": {"email": "ann@example.com", "firstName": "Ann", "plan": "pro"}},
               "properties": {"revenue": 9.5, "currency": "USD", "items": 2}}),
        json!({"type": "page", "messageId": "flat-2", "userId": "u1", "name": "Home",
               "properties": {"url": "https://example.com/"}}),
        json!({"type": "screen", "messageId": "flat-3", "userId": "u2", "anonymousId": "anon-9",
               "name": "Cart"}),
        // No $email, $phone_number nor $id: that revision cannot take it.
        json!({"type": "track", "messageId": "flat-anon", "anonymousId": "anon-only",
               "event": "Browsed"}),
    ];
    send(&f, &messages).await;
    let stored = stored(&f, 4).await;
    let missing = k
        .wait_for_unique_ids(
            &id_set(["flat-1", "flat-2", "flat-3"]),
            Duration::from_secs(20),
        )
        .await;
    assert!(missing.is_empty(), "missing {missing:?}\n{}", k.summary());
    let rows = f.wait_dead_letters("kl", 1, Duration::from_secs(10)).await;
    f.wait_settled("kl").await;
    k.assert_valid().await;

    let requests = k.requests();
    assert_only_path(&k, EVENTS);
    assert_eq!(requests.len(), 3, "{}", k.summary());
    for r in &requests {
        assert_eq!(r.header("revision"), Some("2023-01-24"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("accept"), Some("application/json"));
    }
    let events = k.events();
    let e = the_event(&events, "flat-1");
    let body = requests[e.request].json().unwrap();
    assert_eq!(
        body,
        json!({"data": {"type": "event", "attributes": {
            "profile": {"$email": "ann@example.com", "$id": "u1", "$first_name": "Ann", "plan": "pro"},
            "metric": {"name": "Checkout"},
            "properties": {"revenue": 9.5, "currency": "USD", "items": 2},
            "time": e.time.clone().unwrap(),
            "value": 9.5,
            "unique_id": "flat-1"
        }}}),
        "seed 002's shape"
    );
    assert_time_from(e, &stored["flat-1"]);
    let e = the_event(&events, "flat-2");
    assert_eq!(e.metric, "Viewed Page");
    assert_eq!(e.profile, json!({"$id": "u1"}));
    assert_eq!(
        e.properties,
        json!({"url": "https://example.com/", "name": "Home"})
    );
    assert_time_from(e, &stored["flat-2"]);
    let e = the_event(&events, "flat-3");
    assert_eq!(e.metric, "Viewed Screen");
    assert_eq!(e.profile, json!({"$id": "u2", "anonymous_id": "anon-9"}));
    assert_time_from(e, &stored["flat-3"]);

    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["message"]["messageId"], "flat-anon");
    assert_eq!(rows[0]["reason"], "no_profile_identifier", "{:#}", rows[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_delays_the_next_attempt() {
    let k = Klaviyo::start(CURRENT).await;
    k.receiver.push_reply(
        reply(
            429,
            &error_body(
                429,
                "throttled",
                "Request was throttled.",
                "Request was throttled. Expected available in 2 seconds.",
                "",
            ),
        )
        .header("Retry-After", "2"),
    );
    let f = start(&k, &[]);
    send(&f, &[track("slow-1", "u1", "Delivered", json!({}))]).await;
    let missing = k
        .wait_for_unique_ids(&id_set(["slow-1"]), Duration::from_secs(15))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    k.assert_valid().await;
    let requests = k.requests();
    assert_eq!(requests[0].status, 429, "{}", k.summary());
    assert!(requests[1].ok(), "{}", k.summary());
    let waited = requests[1].at - requests[0].answered_at.unwrap();
    assert!(
        waited >= Duration::from_secs(2),
        "next attempt {waited:?} after the 429 with Retry-After: 2"
    );
    assert!(
        waited < Duration::from_secs(8),
        "next attempt {waited:?} after the 429"
    );
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
}

/// 20 tracks in one batch, the receiver refusing the event `poison` with a 400: only that
/// message is dead-lettered, with Klaviyo's error body; the others arrive.
async fn one_rejected_event_in_a_batch(bulk: bool) {
    let k = Klaviyo::start(CURRENT).await;
    let answer = error_body(
        400,
        "invalid",
        "Invalid input.",
        "'value' must be a number",
        "/data/attributes/value",
    );
    k.answer_for("poison", reply(400, &answer));
    let f = start(
        &k,
        &[
            ("bulk", if bulk { "true" } else { "false" }),
            ("batch", r#"{ max_events = 100, linger = "500ms" }"#),
        ],
    );
    let mut sent = tracks("p", 19, 4);
    sent.insert(
        7,
        track("poison", "p-user-3", "Delivered", json!({"i": "bad"})),
    );
    send(&f, &sent).await;

    let good = id_set(
        sent.iter()
            .map(|m| m["messageId"].as_str().unwrap())
            .filter(|id| *id != "poison"),
    );
    let missing = k.wait_for_unique_ids(&good, Duration::from_secs(20)).await;
    assert!(
        missing.is_empty(),
        "not delivered: {missing:?}\n{}",
        k.summary()
    );
    let rows = f.wait_dead_letters("kl", 1, Duration::from_secs(15)).await;
    f.wait_settled("kl").await;
    k.assert_valid().await;

    assert_eq!(rows.len(), 1, "only the poison: {rows:#?}");
    let row = &rows[0];
    assert_eq!(row["destination"], "kl", "{row:#}");
    assert_eq!(row["message"]["messageId"], "poison", "{row:#}");
    assert_eq!(row["reason"], "rejected", "{row:#}");
    assert_eq!(row["status"], 400, "{row:#}");
    assert_eq!(row["response"], answer, "{row:#}");
    assert!(!k.unique_ids().contains(&"poison".to_string()));
    let tries: Vec<(usize, u16)> = k
        .requests()
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let events = common::klaviyo::events_of(i, r);
            events
                .iter()
                .any(|e| e.unique_id.as_deref() == Some("poison"))
                .then_some((events.len(), r.status))
        })
        .collect();
    assert!(tries.iter().all(|(_, status)| *status == 400), "{tries:?}");
    assert!(tries.iter().any(|(n, _)| *n == 1), "tried alone: {tries:?}");
    if bulk {
        assert!(
            tries.iter().any(|(n, _)| *n > 1),
            "the poison came in a job with others first: {tries:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_for_one_event_of_a_bulk_job_dead_letters_only_that_message() {
    one_rejected_event_in_a_batch(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_for_one_event_sent_alone_dead_letters_only_that_message() {
    one_rejected_event_in_a_batch(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_a_profile_identifier_are_dead_lettered_without_a_request() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 100, linger = "300ms" }"#)],
    );
    send(
        &f,
        &[
            // profile-import has no anonymous_id: these two cannot be upserted.
            json!({"type": "identify", "messageId": "id-anon", "anonymousId": "anon-1",
                   "traits": {"plan": "free"}}),
            json!({"type": "group", "messageId": "grp-anon", "anonymousId": "anon-2",
                   "groupId": "g1", "traits": {"name": "Anon Corp"}}),
            // An email is an identifier.
            json!({"type": "identify", "messageId": "id-email", "anonymousId": "anon-3",
                   "traits": {"email": "anon3@example.com", "plan": "trial"}}),
            // Events take anonymous_id.
            json!({"type": "track", "messageId": "tr-anon", "anonymousId": "anon-4",
                   "event": "Signed Up"}),
        ],
    )
    .await;
    let missing = k
        .wait_for_unique_ids(&id_set(["tr-anon"]), Duration::from_secs(20))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    k.wait(
        "the email identify's upsert",
        Duration::from_secs(20),
        |k| !k.profiles().is_empty(),
    )
    .await;
    let rows = f.wait_dead_letters("kl", 2, Duration::from_secs(10)).await;
    f.wait_settled("kl").await;
    k.assert_valid().await;

    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(
        dead_ids(&rows),
        id_set(["id-anon", "grp-anon"]),
        "{rows:#?}"
    );
    for row in &rows {
        assert_eq!(row["reason"], "no_profile_identifier", "{row:#}");
        assert_eq!(row["destination"], "kl", "{row:#}");
    }
    let profiles = k.profiles();
    assert_eq!(
        profiles,
        [json!({"email": "anon3@example.com", "properties": {"plan": "trial"}})],
        "only the identify with an email is upserted\n{}",
        k.summary()
    );
    assert_eq!(
        ok_requests(&k, PROFILE_IMPORT).len()
            + ok_requests(&k, EVENTS).len()
            + ok_requests(&k, BULK).len(),
        k.requests().len(),
        "nothing refused\n{}",
        k.summary()
    );
    let events = k.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].profile, json!({"anonymous_id": "anon-4"}));
    assert_eq!(events[0].metric, "Signed Up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_renames_and_drops_events() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[(
            "mapping",
            r#"{ events = { "Signed Up" = "Registered", "Debug" = false }, page_metric = "Page View" }"#,
        )],
    );
    send(
        &f,
        &[
            track("m-1", "u1", "Signed Up", json!({})),
            track("m-2", "u1", "Debug", json!({})),
            json!({"type": "page", "messageId": "m-3", "userId": "u1", "name": "Home"}),
            track("m-4", "u1", "Other", json!({})),
        ],
    )
    .await;
    let missing = k
        .wait_for_unique_ids(&id_set(["m-1", "m-3", "m-4"]), Duration::from_secs(20))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    f.wait_settled("kl").await;
    k.assert_valid().await;
    let events = k.events();
    assert_eq!(events.len(), 3, "Debug is dropped: {events:#?}");
    assert_eq!(the_event(&events, "m-1").metric, "Registered");
    assert_eq!(the_event(&events, "m-3").metric, "Page View");
    assert_eq!(the_event(&events, "m-4").metric, "Other");
    assert_eq!(
        f.dead_letters("kl").await,
        Vec::<Value>::new(),
        "a drop is no dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_is_retried_not_dead_lettered() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start_with_key(&k, "pk_wrong_key", &[]);
    send(&f, &[track("key-1", "u1", "Delivered", json!({}))]).await;
    k.wait("three refused attempts", Duration::from_secs(15), |k| {
        k.requests().iter().filter(|r| r.status == 401).count() >= 3
    })
    .await;
    assert_eq!(
        f.dead_letters("kl").await,
        Vec::<Value>::new(),
        "401 is retried"
    );
    assert!(k.events().is_empty());

    // The key is fixed on Klaviyo's side: the next attempt goes through.
    k.expect_api_key("pk_wrong_key");
    let missing = k
        .wait_for_unique_ids(&id_set(["key-1"]), Duration::from_secs(15))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    k.assert_valid().await;
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_klaviyo_limits_are_dead_lettered_or_repaired_before_sending() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 100, linger = "300ms" }"#)],
    );
    let many: serde_json::Map<String, Value> =
        (0..401).map(|i| (format!("p{i}"), json!(i))).collect();
    let ahead = (Utc::now() + chrono::Duration::days(400)).to_rfc3339();
    let (order_id, product_id) = ("o".repeat(200), "p".repeat(100));
    send(
        &f,
        &[
            track("lim-props", "u1", "Big", Value::Object(many)),
            json!({"type": "track", "messageId": "lim-old", "userId": "u2", "event": "Old",
                   "timestamp": "1985-06-01T00:00:00Z"}),
            json!({"type": "track", "messageId": "lim-ahead", "userId": "u3", "event": "Later",
                   "timestamp": ahead}),
            // After 1990: fine for the current revisions.
            json!({"type": "track", "messageId": "lim-1995", "userId": "u4", "event": "Old",
                   "timestamp": "1995-06-01T00:00:00.250Z"}),
            track(
                "lim-order",
                "u5",
                "Order Completed",
                json!({"order_id": order_id, "products": [{"product_id": product_id}]}),
            ),
        ],
    )
    .await;
    let rows = f.wait_dead_letters("kl", 3, Duration::from_secs(15)).await;
    let missing = k
        .wait_for_unique_ids(&id_set(["lim-1995", "lim-order"]), Duration::from_secs(15))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    k.wait("the order's product event", Duration::from_secs(10), |k| {
        k.events().len() >= 3
    })
    .await;
    f.wait_settled("kl").await;
    k.assert_valid().await;

    let reasons: HashMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["message"]["messageId"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        HashMap::from([
            ("lim-props".to_string(), "too_many_properties".to_string()),
            ("lim-old".to_string(), "time_too_old".to_string()),
            ("lim-ahead".to_string(), "time_too_far_ahead".to_string()),
        ]),
        "{rows:#?}"
    );
    let events = k.events();
    assert_eq!(events.len(), 3, "{events:#?}");
    let e = the_event(&events, "lim-1995");
    assert_eq!(
        e.time.as_deref().map(time),
        Some(time("1995-06-01T00:00:00Z"))
    );
    let product = events
        .iter()
        .find(|e| e.metric == "Ordered Product")
        .expect("the product event");
    let id = product.unique_id.clone().unwrap();
    assert!(
        id.chars().count() <= 255 && id.starts_with(&order_id),
        "a unique_id of {} characters: {id}",
        id.chars().count()
    );
}

/// Two sources may use the same messageId (dedupe is per source); Klaviyo keeps one event
/// per (profile, metric, unique_id), so two users' events with it both count.
async fn same_message_id_from_two_users(bulk: bool) {
    let k = Klaviyo::start(CURRENT).await;
    let section = format!(
        "[[sources]]\nname = \"other\"\nwrite_keys = [\"wk_other\"]\n\n[[destinations]]\n\
         name = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\nbase_url = \"{}\"\n\
         retry = {FAST_RETRY}\nbulk = {bulk}\nbatch = {{ max_events = 100, linger = \"500ms\" }}\n",
        k.base_url()
    );
    let f = Fanout::start_with(Settings::default().section(&section).env(KEY_ENV, API_KEY));
    let body = |user: &str| json!({"batch": [track("shared-id", user, "Signed Up", json!({}))]});
    assert_success(
        f.post("/v1/batch")
            .json(&body("alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_success(
        f.post_as("wk_other", "/v1/batch")
            .json(&body("bob"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    stored(&f, 2).await;
    k.wait(
        "the events of alice and bob",
        Duration::from_secs(15),
        |k| k.events().len() >= 2,
    )
    .await;
    k.assert_valid().await;
    let users: HashSet<Value> = k
        .events()
        .iter()
        .map(|e| e.profile["external_id"].clone())
        .collect();
    assert_eq!(
        users,
        HashSet::from([json!("alice"), json!("bob")]),
        "{}",
        k.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_from_two_users_reaches_both_profiles_in_a_bulk_job() {
    same_message_id_from_two_users(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_from_two_users_reaches_both_profiles_one_request_each() {
    same_message_id_from_two_users(false).await;
}

fn identify(id: &str, user: &str, traits: Value) -> Value {
    json!({"type": "identify", "messageId": id, "userId": user, "traits": traits})
}

/// The requests to `path` (POSTs; job reads excluded).
fn posts_to(k: &Klaviyo, path: &str) -> usize {
    k.requests()
        .iter()
        .filter(|r| r.method == "POST" && path_of(r) == path)
        .count()
}

/// Many identifies in a batch go as one bulk profile import job, several upserts of one
/// profile merged (later traits winning); the job is followed to its end, and each profile
/// ends as the last identify left it. Events of the same batch go after the job was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifies_go_as_a_bulk_job_merged_per_profile_and_end_at_their_last_state() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 1000, linger = "300ms" }"#)],
    );
    let mut messages = Vec::new();
    for round in 0..3 {
        for u in 0..20 {
            messages.push(identify(
                &format!("id-{round}-{u}"),
                &format!("user-{u}"),
                json!({"email": format!("user-{u}@example.com"), "plan": format!("plan-{round}"),
                       "firstName": if round == 0 { "First" } else { "Again" }}),
            ));
        }
    }
    messages.extend(tracks("after", 20, 20));
    send(&f, &messages).await;
    arrive_valid(
        &f,
        &k,
        &message_ids(&messages[60..]),
        Duration::from_secs(20),
    )
    .await;
    // One job for the 20 profiles (60 identifies merged), no single imports.
    assert_eq!(posts_to(&k, PROFILE_JOBS), 1, "{}", k.summary());
    assert_eq!(posts_to(&k, PROFILE_IMPORT), 0, "{}", k.summary());
    assert_eq!(
        k.profiles().len(),
        20,
        "one row per profile: {:?}",
        k.profiles()
    );
    for u in 0..20 {
        let profile = k.profile_state(&format!("user-{u}")).expect("the profile");
        assert_eq!(profile["properties"]["plan"], "plan-2", "{profile}");
        assert_eq!(profile["first_name"], "Again", "{profile}");
        assert_eq!(profile["email"], format!("user-{u}@example.com"));
        assert!(profile.get("anonymous_id").is_none(), "{profile}");
    }
    // The job's status was read until complete; the events went after the job was taken.
    let requests = k.requests();
    let job_at = requests
        .iter()
        .position(|r| r.method == "POST" && path_of(r) == PROFILE_JOBS)
        .unwrap();
    let first_event = requests.iter().position(|r| path_of(r) == BULK).unwrap();
    assert!(job_at < first_event, "{}", k.summary());
    assert!(
        requests
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/job1"))
            .count()
            >= 2,
        "followed to completion: {}",
        k.summary()
    );
    assert_eq!(f.dead_letters("kl").await, Vec::<Value>::new());
}

/// A few identifies go as single imports (Klaviyo advises against jobs for a handful), and
/// an identify whose profile is what was last sent is settled without a request, counted
/// as skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_identify_makes_no_request() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(&k, &[]);
    let first = identify(
        "u-1",
        "user-1",
        json!({"email": "a@example.com", "plan": "pro"}),
    );
    send(&f, std::slice::from_ref(&first)).await;
    k.wait("the first import", Duration::from_secs(10), |k| {
        k.profiles().len() == 1
    })
    .await;
    f.wait_settled("kl").await;
    let skipped_before = f
        .metric(
            "fanout_deliveries_total",
            &[("destination", "kl"), ("outcome", "skipped")],
        )
        .await
        .unwrap_or(0.0);
    // The same traits again (a page view's identify), then a change.
    let same = identify(
        "u-2",
        "user-1",
        json!({"email": "a@example.com", "plan": "pro"}),
    );
    send(&f, &[same]).await;
    f.wait_settled("kl").await;
    let skipped = f
        .metric(
            "fanout_deliveries_total",
            &[("destination", "kl"), ("outcome", "skipped")],
        )
        .await
        .unwrap_or(0.0);
    assert_eq!(skipped - skipped_before, 1.0, "counted as skipped");
    assert_eq!(posts_to(&k, PROFILE_IMPORT), 1, "{}", k.summary());
    let changed = identify(
        "u-3",
        "user-1",
        json!({"email": "a@example.com", "plan": "max"}),
    );
    send(&f, &[changed]).await;
    k.wait("the changed profile", Duration::from_secs(10), |k| {
        k.profiles().len() == 2
    })
    .await;
    f.wait_settled("kl").await;
    assert_eq!(posts_to(&k, PROFILE_IMPORT), 2, "{}", k.summary());
    assert_eq!(
        k.profile_state("user-1").unwrap()["properties"]["plan"],
        "max"
    );
    k.assert_valid().await;
}

/// `profile_cache = { ttl = "0s" }` turns the skipping off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_profile_cache_ttl_sends_every_identify() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(&k, &[("profile_cache", r#"{ ttl = "0s" }"#)]);
    for n in 0..2 {
        let same = identify(
            &format!("z-{n}"),
            "user-z",
            json!({"email": "z@example.com"}),
        );
        send(&f, &[same]).await;
        f.wait_settled("kl").await;
    }
    assert_eq!(posts_to(&k, PROFILE_IMPORT), 2, "{}", k.summary());
}

/// A row Klaviyo refuses in a bulk job ends as a dead letter with Klaviyo's reason; the
/// other rows and the batch's events are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_of_a_profile_job_is_a_dead_letter_with_klaviyos_reason() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 1000, linger = "300ms" }"#)],
    );
    let mut messages: Vec<Value> = (0..10)
        .map(|u| {
            identify(
                &format!("row-{u}"),
                &format!("row-user-{u}"),
                json!({"email": if u == 4 { "refuse-me@example.com".to_string() } else { format!("row-{u}@example.com") }}),
            )
        })
        .collect();
    messages.extend(tracks("rows", 5, 5));
    send(&f, &messages).await;
    let rows = f.wait_dead_letters("kl", 1, Duration::from_secs(20)).await;
    f.wait_settled("kl").await;
    assert_eq!(dead_ids(&rows), id_set(["row-4"]), "{rows:#?}");
    let text = rows[0].to_string();
    assert!(text.contains("The email address is not valid."), "{text}");
    assert_eq!(posts_to(&k, PROFILE_JOBS), 1, "{}", k.summary());
    for u in (0..10).filter(|&u| u != 4) {
        assert!(k.profile_state(&format!("row-user-{u}")).is_some());
    }
    let missing = k
        .wait_for_unique_ids(&message_ids(&messages[10..]), Duration::from_secs(5))
        .await;
    assert!(missing.is_empty(), "{missing:?}");
    k.assert_valid().await;
}

/// A profile job that takes long holds only its own users: another user's event sent
/// meanwhile is delivered while the job is still processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_other_users_do_not_wait_for_a_slow_profile_job() {
    let k = Klaviyo::start(CURRENT).await;
    k.slow_jobs(Duration::from_secs(6));
    let f = start(
        &k,
        &[("batch", r#"{ max_events = 1000, linger = "100ms" }"#)],
    );
    let identifies: Vec<Value> = (0..10)
        .map(|u| {
            identify(
                &format!("slow-{u}"),
                &format!("slow-user-{u}"),
                json!({"email": format!("slow-{u}@example.com")}),
            )
        })
        .collect();
    send(&f, &identifies).await;
    k.wait("the profile job", Duration::from_secs(10), |k| {
        posts_to(k, PROFILE_JOBS) == 1
    })
    .await;
    let other = track("quick-1", "quick-user", "Quick", json!({}));
    let sent_at = std::time::Instant::now();
    send(&f, &[other]).await;
    let missing = k
        .wait_for_unique_ids(&id_set(["quick-1"]), Duration::from_secs(3))
        .await;
    assert!(missing.is_empty(), "{}", k.summary());
    assert!(!k.jobs_complete(), "the job was still processing");
    assert!(sent_at.elapsed() < Duration::from_secs(3));
    f.wait_settled("kl").await;
    k.assert_valid().await;
}
