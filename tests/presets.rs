//! `preset = "NAME"`: destinations shipped in the binary, end to end through the running
//! server into a receiver on loopback (`base_url` points each preset at it): the merge
//! of the user's keys, `settings` and their secrets, `drop_on`, `fanout presets`, and
//! `fanout check` naming a preset's missing setting.

mod common;

use std::process::Command;
use std::time::Duration;

use common::receiver::{bodies, items_by, ReceivedRequest, Receiver, Reply};
use common::vendors::validate;
use common::{Fanout, Settings};
use serde_json::{json, Value};

const FAST_RETRY: &str = r#"retry = { initial_backoff = "100ms", max_backoff = "1s" }"#;
const WAIT: Duration = Duration::from_secs(15);

fn track(id: &str, user: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "anonymousId": "anon-1",
           "event": event, "timestamp": "2024-03-01T12:00:00.250Z",
           "properties": {"plan": "pro"}})
}

/// One of each Segment call, as analytics.js and the server libraries send them: track,
/// identify, page, screen, group, alias and an Order Completed with products.
fn segment_calls() -> Value {
    let context = json!({
        "ip": "203.0.113.9", "locale": "fr-FR", "userAgent": "Mozilla/5.0",
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "location": {"latitude": 48, "longitude": 2.35, "country": "France", "city": "Paris"},
        "os": {"name": "Mac OS X", "version": "14.1"},
        "page": {"url": "https://shop.example/cart", "referrer": "https://search.example/"},
    });
    json!([
        {"type": "track", "messageId": "m-track", "userId": "user-1", "anonymousId": "anon-1",
         "event": "Signed Up", "timestamp": "2024-03-01T12:00:00.250Z",
         "properties": {"plan": "pro", "seats": 3}, "context": context},
        {"type": "identify", "messageId": "m-identify", "userId": "user-1",
         "anonymousId": "anon-1", "timestamp": "2024-03-01T12:00:01Z",
         "traits": {"email": "jane@example.com", "firstName": "Jane", "lastName": "Doe",
                    "phone": "+33 6 12 34 56 78", "plan": "pro",
                    "address": {"city": "Paris", "country": "FR"}},
         "context": context},
        {"type": "page", "messageId": "m-page", "anonymousId": "anon-1", "name": "Cart",
         "timestamp": "2024-03-01T12:00:02Z",
         "properties": {"url": "https://shop.example/cart", "title": "Cart"}, "context": context},
        {"type": "screen", "messageId": "m-screen", "userId": "user-1", "name": "Settings",
         "timestamp": "2024-03-01T12:00:03Z", "properties": {"tab": "billing"},
         "context": {"device": {"id": "device-42", "type": "ios", "model": "iPhone15,2",
                                "manufacturer": "Apple"},
                     "os": {"name": "iOS", "version": "17.1"}, "app": {"version": "3.2.1"},
                     "library": {"name": "analytics-ios", "version": "4.1"}}},
        {"type": "group", "messageId": "m-group", "userId": "user-1", "groupId": "org-7",
         "timestamp": "2024-03-01T12:00:04Z", "traits": {"name": "Acme", "plan": "enterprise"}},
        {"type": "alias", "messageId": "m-alias", "userId": "user-1", "previousId": "anon-1",
         "timestamp": "2024-03-01T12:00:05Z"},
        {"type": "track", "messageId": "m-order", "userId": "user-1", "anonymousId": "anon-1",
         "event": "Order Completed", "timestamp": "2024-03-01T12:00:06Z",
         "properties": {"order_id": "o-1", "total": 27.5, "revenue": 25.0, "currency": "EUR",
                        "products": [
                            {"product_id": "p-1", "sku": "SKU-1", "name": "Mug", "price": 10.0,
                             "quantity": 2},
                            {"product_id": "p-2", "sku": "SKU-2", "name": "Tea", "price": 5.0,
                             "quantity": 1}]},
         "context": context},
    ])
}

/// The events of every Amplitude request answered 2xx, by `insert_id`.
fn amplitude_events(requests: &[ReceivedRequest]) -> std::collections::BTreeMap<String, Value> {
    items_by(requests, "/2/httpapi", "events", "insert_id")
}

/// The Amplitude preset pointed at `r`, batches lingering `linger`, retries fast, and
/// `extra` TOML lines.
fn amplitude(r: &Receiver, linger: &str, extra: &str) -> Settings {
    Settings::default()
        .env("PRESETS_TEST_AMPLITUDE_KEY", "amp-key")
        .section(&format!(
            r#"[[destinations]]
name = "amp"
preset = "amplitude"
base_url = "{}"
settings = {{ api_key_env = "PRESETS_TEST_AMPLITUDE_KEY" }}
batch = {{ linger = "{linger}" }}
{FAST_RETRY}
{extra}
"#,
            r.url("")
        ))
}

/// Amplitude: every call of `segment_calls` as Segment's Amplitude destination maps it
/// by default, each body taken by the SDK's event model; group and alias skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplitude_maps_segment_calls_as_segment_does() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(amplitude(&r, "200ms", ""));
    f.send_batch(segment_calls()).await;
    let requests = r
        .wait_until(WAIT, |rs| amplitude_events(rs).len() == 5)
        .await;
    validate("amplitude", &requests).await;
    let events = amplitude_events(&requests);
    assert_eq!(
        events.keys().collect::<Vec<_>>(),
        ["m-identify", "m-order", "m-page", "m-screen", "m-track"]
    );
    assert!(bodies(&requests, "/2/httpapi")
        .iter()
        .all(|b| b["api_key"] == "amp-key"));
    assert_eq!(
        events["m-track"],
        json!({"event_type": "Signed Up", "user_id": "user-1", "device_id": "anon-1",
               "time": 1709294400250i64, "insert_id": "m-track",
               "event_properties": {"plan": "pro", "seats": 3},
               "platform": "Web", "os_name": "Mac OS X", "os_version": "14.1",
               "country": "France", "city": "Paris", "language": "fr-FR",
               "location_lat": 48.0, "location_lng": 2.35, "ip": "203.0.113.9",
               "library": "analytics.js"})
    );
    let identify = &events["m-identify"];
    assert_eq!(identify["event_type"], "$identify");
    assert_eq!(
        identify["user_properties"]["$set"]["email"],
        "jane@example.com"
    );
    assert_eq!(identify.get("event_properties"), None);
    assert_eq!(events["m-page"]["event_type"], "Viewed Cart");
    assert_eq!(events["m-page"].get("user_id"), None);
    let screen = &events["m-screen"];
    assert_eq!(screen["event_type"], "Viewed Settings");
    assert_eq!(screen["device_id"], "device-42");
    assert_eq!(screen["platform"], "iOS");
    assert_eq!(screen["app_version"], "3.2.1");
    let order = &events["m-order"];
    assert_eq!(order["event_type"], "Order Completed");
    assert_eq!(order["revenue"], 25.0);
    assert_eq!(order["revenueType"], "Purchase");
    assert_eq!(order["event_properties"]["products"][1]["sku"], "SKU-2");
    assert_eq!(events["m-track"].get("revenue"), None);
}

/// Amplitude's documented answers: 429 (throttled) is retried after its Retry-After,
/// 5xx retried; a 400 (invalid event) is a dead letter with Amplitude's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplitude_answers_retry_or_dead_letter() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(amplitude(&r, "20ms", ""));
    r.push_reply(
        Reply::json(429, r#"{"code":429,"error":"Too many requests for some devices and users","throttled_devices":{"anon-1":31}}"#)
            .header("retry-after", "1"),
    );
    r.push_reply(Reply::json(
        503,
        r#"{"code":503,"error":"Service unavailable"}"#,
    ));
    f.send_batch(json!([track("t-retry", "user-1", "Retried")]))
        .await;
    let requests = r
        .wait_until(WAIT, |rs| !amplitude_events(rs).is_empty())
        .await;
    let tries: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(tries, [429, 503, 200]);
    validate("amplitude", &requests[2..]).await;
    assert!(
        requests[1].at.duration_since(requests[0].at) >= Duration::from_millis(900),
        "Retry-After was honoured"
    );

    r.push_reply(Reply::json(
        400,
        r#"{"code":400,"error":"Request missing required field","missing_field":"event_type","events_with_missing_fields":{"event_type":[0]}}"#,
    ));
    f.send_batch(json!([track("t-bad", "user-1", "Refused")]))
        .await;
    let dead = f.wait_dead_letters("amp", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].to_string().contains("events_with_missing_fields"),
        "{dead:?}"
    );
}

fn mixpanel(r: &Receiver) -> Settings {
    Settings::default()
        .env("PRESETS_TEST_MIXPANEL_SECRET", "sa-secret")
        .section(&format!(
            r#"[[destinations]]
name = "mp"
preset = "mixpanel"
base_url = "{}"
settings = {{ token = "mp-token", project_id = "4242", service_account = "sa.fanout", service_account_secret_env = "PRESETS_TEST_MIXPANEL_SECRET" }}
batch = {{ linger = "200ms" }}
{FAST_RETRY}
"#,
            r.url("")
        ))
}

/// Every record of the requests to `path` answered 2xx.
fn records(requests: &[ReceivedRequest], path: &str) -> Vec<Value> {
    bodies(requests, path)
        .into_iter()
        .flat_map(|b| b.as_array().unwrap().clone())
        .collect()
}

/// Mixpanel: events to /import with the service account, the identify's $identify event
/// and profile, the group's profile, as Segment's Mixpanel destination maps them; every
/// request checked against what Mixpanel's SDK builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixpanel_maps_segment_calls_as_segment_does() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(mixpanel(&r));
    f.send_batch(segment_calls()).await;
    let requests = r
        .wait_until(WAIT, |rs| {
            records(rs, "/import").len() == 5
                && records(rs, "/engage").len() == 1
                && records(rs, "/groups").len() == 1
        })
        .await;
    validate("mixpanel", &requests).await;
    for request in requests.iter().filter(|r| r.path == "/import") {
        assert_eq!(request.query.as_deref(), Some("project_id=4242&strict=1"));
        // sa.fanout:sa-secret
        assert_eq!(
            request.header("authorization"),
            Some("Basic c2EuZmFub3V0OnNhLXNlY3JldA==")
        );
    }
    let events: std::collections::BTreeMap<String, Value> = records(&requests, "/import")
        .into_iter()
        .map(|e| (e["event"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(
        events.keys().collect::<Vec<_>>(),
        [
            "$identify",
            "Order Completed",
            "Signed Up",
            "Viewed Cart",
            "Viewed Settings"
        ]
    );
    let signed_up = &events["Signed Up"]["properties"];
    assert_eq!(signed_up["distinct_id"], "user-1");
    assert_eq!(signed_up["time"], 1709294400250i64);
    assert_eq!(signed_up["token"], "mp-token");
    assert_eq!(signed_up["plan"], "pro");
    assert_eq!(signed_up["seats"], 3);
    assert_eq!(signed_up["$os"], "Mac OS X");
    assert_eq!(signed_up["$current_url"], "https://shop.example/cart");
    assert_eq!(signed_up["$referrer"], "https://search.example/");
    assert_eq!(signed_up["mp_lib"], "Segment: analytics.js");
    assert_eq!(signed_up["mp_country_code"], "France");
    assert_eq!(signed_up["ip"], "203.0.113.9");
    assert_eq!(signed_up["$source"], "segment");
    assert_eq!(events["Viewed Cart"]["properties"]["distinct_id"], "anon-1");
    assert_eq!(
        events["Viewed Settings"]["properties"]["$device_id"],
        "device-42"
    );
    let order = &events["Order Completed"]["properties"];
    assert_eq!(order["revenue"], 25.0);
    assert_eq!(order["products"][0]["sku"], "SKU-1");
    let identify = &events["$identify"]["properties"];
    assert_eq!(identify["$identified_id"], "user-1");
    assert_eq!(identify["$anon_id"], "anon-1");
    let insert_ids: std::collections::BTreeSet<&str> = events
        .values()
        .map(|e| e["properties"]["$insert_id"].as_str().unwrap())
        .collect();
    assert_eq!(insert_ids.len(), 5, "one $insert_id per message");

    let profile = &records(&requests, "/engage")[0];
    assert_eq!(
        profile,
        &json!({"$token": "mp-token", "$distinct_id": "user-1", "$ip": "203.0.113.9",
                "$set": {"$email": "jane@example.com", "$first_name": "Jane",
                         "$last_name": "Doe", "$phone": "+33 6 12 34 56 78", "plan": "pro",
                         "address": {"city": "Paris", "country": "FR"}}})
    );
    assert!(requests
        .iter()
        .filter(|r| r.path != "/import")
        .all(|r| r.header("authorization").is_none()));
    assert_eq!(
        records(&requests, "/groups")[0],
        json!({"$token": "mp-token", "$group_key": "$group_id", "$group_id": "org-7",
               "$set": {"name": "Acme", "plan": "enterprise"}})
    );
}

/// Mixpanel's documented answers: 429 (rate limited) retried; a 400 with failed_records
/// (strict mode) is a dead letter with Mixpanel's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixpanel_answers_retry_or_dead_letter() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(mixpanel(&r));
    r.push_reply(Reply::json(
        429,
        r#"{"code":429,"error":"Project exceeded rate limits. Please retry the request with exponential backoff.","status":"Bad Request"}"#,
    ));
    f.send_batch(json!([track("t-retry", "user-1", "Retried")]))
        .await;
    let requests = r
        .wait_until(WAIT, |rs| !records(rs, "/import").is_empty())
        .await;
    let tries: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(tries, [429, 200]);
    validate("mixpanel", &requests[1..]).await;

    r.push_reply(Reply::json(
        400,
        r#"{"code":400,"error":"some data points in the request failed validation","failed_records":[{"index":0,"$insert_id":"x","field":"properties.time","message":"'properties.time' is invalid"}],"num_records_imported":0,"status":"Bad Request"}"#,
    ));
    f.send_batch(json!([track("t-bad", "user-1", "Refused")]))
        .await;
    let dead = f.wait_dead_letters("mp", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].to_string().contains("failed_records"), "{dead:?}");
}

fn posthog(r: &Receiver, extra: &str) -> Settings {
    Settings::default()
        .env("PRESETS_TEST_POSTHOG_KEY", "phc_test")
        .section(&format!(
            r#"[[destinations]]
name = "ph"
preset = "posthog"
base_url = "{}"
settings = {{ api_key_env = "PRESETS_TEST_POSTHOG_KEY"{extra} }}
batch = {{ linger = "200ms" }}
{FAST_RETRY}
"#,
            r.url("")
        ))
}

/// The events of every PostHog request answered 2xx, by event name.
fn posthog_events(requests: &[ReceivedRequest]) -> std::collections::BTreeMap<String, Value> {
    items_by(requests, "/batch/", "batch", "event")
}

/// PostHog (a self-hosted instance: `base_url`): every Segment call as a capture event,
/// checked against what PostHog's SDK enqueues for the same call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_maps_segment_calls_as_segment_does() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(posthog(&r, ", historical_migration = true"));
    f.send_batch(segment_calls()).await;
    let requests = r.wait_until(WAIT, |rs| posthog_events(rs).len() == 7).await;
    validate("posthog", &requests).await;
    for body in bodies(&requests, "/batch/") {
        assert_eq!(body["api_key"], "phc_test");
        assert_eq!(body["historical_migration"], true);
    }
    let events = posthog_events(&requests);
    assert_eq!(
        events.keys().collect::<Vec<_>>(),
        [
            "$create_alias",
            "$groupidentify",
            "$identify",
            "$pageview",
            "$screen",
            "Order Completed",
            "Signed Up"
        ]
    );
    let signed_up = &events["Signed Up"];
    assert_eq!(signed_up["distinct_id"], "user-1");
    assert_eq!(signed_up["timestamp"], "2024-03-01T12:00:00.250Z");
    assert_eq!(
        signed_up["properties"],
        json!({"plan": "pro", "seats": 3, "distinct_id": "user-1", "$ip": "203.0.113.9"})
    );
    let uuids: std::collections::BTreeSet<&str> = events
        .values()
        .map(|e| e["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids.len(), 7, "one uuid per message");
    let identify = &events["$identify"];
    assert_eq!(identify["distinct_id"], "user-1");
    assert_eq!(identify["properties"]["$set"]["email"], "jane@example.com");
    assert_eq!(identify["properties"]["$anon_distinct_id"], "anon-1");
    let page = &events["$pageview"];
    assert_eq!(page["distinct_id"], "anon-1");
    assert_eq!(
        page["properties"]["$current_url"],
        "https://shop.example/cart"
    );
    assert_eq!(events["$screen"]["properties"]["$screen_name"], "Settings");
    assert_eq!(
        events["$groupidentify"]["properties"],
        json!({"$group_type": "company", "$group_key": "org-7",
               "$group_set": {"name": "Acme", "plan": "enterprise"}})
    );
    let alias = &events["$create_alias"];
    assert_eq!(alias["distinct_id"], "anon-1");
    assert_eq!(
        alias["properties"],
        json!({"distinct_id": "anon-1", "alias": "user-1"})
    );
    assert_eq!(events["Order Completed"]["properties"]["total"], 27.5);
}

/// PostHog's documented answers: 503 retried; 400 (invalid payload) a dead letter with
/// PostHog's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_answers_retry_or_dead_letter() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(posthog(&r, ""));
    r.push_reply(Reply::json(503, r#"{"type":"server_error","code":"server_error","detail":"Service unavailable","attr":null}"#));
    f.send_batch(json!([track("t-retry", "user-1", "Retried")]))
        .await;
    let requests = r
        .wait_until(WAIT, |rs| !posthog_events(rs).is_empty())
        .await;
    let tries: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(tries, [503, 200]);
    validate("posthog", &requests[1..]).await;
    assert_eq!(
        bodies(&requests, "/batch/")[0].get("historical_migration"),
        None
    );

    r.push_reply(Reply::json(
        400,
        r#"{"type":"validation_error","code":"invalid_payload","detail":"Malformed request data","attr":null}"#,
    ));
    f.send_batch(json!([track("t-bad", "user-1", "Refused")]))
        .await;
    let dead = f.wait_dead_letters("ph", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].to_string().contains("invalid_payload"), "{dead:?}");
}

/// The mechanism on one preset: its keys under the user's (`base_url`, a `batch` key),
/// a secret setting read from the environment into the body, and `drop_on` settling a
/// documented refusal as skipped while another 400 is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_with_the_users_keys_over_it() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(amplitude(
        &r,
        "50ms",
        r#"drop_on = [{ status = 400, body_contains = "silly_event" }]"#,
    ));
    f.send_batch(json!([track("t-1", "u1", "Signed Up")])).await;
    let requests = r
        .wait_until(WAIT, |rs| !bodies(rs, "/2/httpapi").is_empty())
        .await;
    let body = &bodies(&requests, "/2/httpapi")[0];
    assert_eq!(body["api_key"], "amp-key");
    assert_eq!(body["events"][0]["event_type"], "Signed Up");
    assert_eq!(body["events"][0]["insert_id"], "t-1");
    assert_eq!(body["events"][0]["time"], 1709294400250i64);

    // A 400 `drop_on` names: skipped, not a dead letter.
    r.push_reply(Reply::json(400, r#"{"code":400,"error":"silly_event"}"#));
    f.send_batch(json!([track("t-2", "u1", "Dropped")])).await;
    let deadline = std::time::Instant::now() + WAIT;
    while f.deliveries("amp", "skipped").await < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.deliveries("amp", "skipped").await, 1.0);

    // Any other 400: a dead letter, with the vendor's answer.
    r.push_reply(Reply::json(
        400,
        r#"{"code":400,"error":"invalid_api_key"}"#,
    ));
    f.send_batch(json!([track("t-3", "u1", "Refused")])).await;
    let dead = f.wait_dead_letters("amp", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].to_string().contains("invalid_api_key"), "{dead:?}");
    assert_eq!(f.deliveries("amp", "skipped").await, 1.0);
}

/// `fanout check` of `config`: success, and standard error.
fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_names_the_preset_key_at_fault() {
    let head = "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n\
                [[sources]]\nname = \"s\"\nwrite_keys = [\"k\"]\n\
                [[destinations]]\nname = \"amp\"\n";
    let cases = [
        (
            "preset = \"amplitude\"\n",
            "destinations[0].settings.api_key",
        ),
        ("preset = \"nope\"\n", "destinations[0].preset"),
        (
            "preset = \"amplitude\"\nkind = \"webhook\"\nsettings = { api_key = \"k\" }\n",
            "destinations[0].kind",
        ),
        (
            "preset = \"posthog\"\nsettings = { api_key = \"k\", host = \"eu\" }\n",
            "destinations[0].settings.host",
        ),
    ];
    for (keys, key) in cases {
        let (ok, stderr) = check(&format!("{head}{keys}"));
        assert!(!ok && stderr.contains(key), "want {key}: {stderr}");
    }
    let (ok, stderr) = check(&format!(
        "{head}preset = \"amplitude\"\nsettings = {{ api_key = \"k\" }}\n"
    ));
    assert!(ok, "{stderr}");
}

#[test]
fn presets_are_listed_and_shown() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, listed) = run(&["presets"]);
    assert!(ok);
    for name in ["amplitude", "mixpanel", "posthog"] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(name) && l.len() > name.len() + 10),
            "{listed}"
        );
    }
    let (ok, shown) = run(&["presets", "show", "amplitude"]);
    assert!(ok);
    assert!(shown.contains("preset.settings.api_key"), "{shown}");
    let (ok, _) = run(&["presets", "show", "nope"]);
    assert!(!ok);
}
