//! Every ingest endpoint, auth form, body encoding, validation error and limit, against
//! the real server over loopback.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use common::{
    assert_success, basic, client, event_batch, expect_error, gzip, status_json, Fanout, Settings,
    WRITE_KEY,
};
use serde_json::{json, Value};

fn track(event: &str) -> Value {
    json!({"userId": "u1", "event": event, "properties": {"n": 1}})
}

#[tokio::test]
async fn every_single_call_path_stores_its_type() {
    let f = Fanout::start();
    let calls = [
        (
            "/v1/identify",
            "identify",
            json!({"userId": "u", "traits": {"plan": "pro"}}),
        ),
        ("/v1/i", "identify", json!({"anonymousId": "a"})),
        ("/v1/track", "track", track("A")),
        ("/v1/t", "track", track("B")),
        ("/v1/page", "page", json!({"userId": "u", "name": "Home"})),
        ("/v1/p", "page", json!({"userId": "u"})),
        (
            "/v1/screen",
            "screen",
            json!({"userId": "u", "name": "Main"}),
        ),
        ("/v1/s", "screen", json!({"userId": "u"})),
        (
            "/v1/group",
            "group",
            json!({"userId": "u", "groupId": "g1"}),
        ),
        ("/v1/g", "group", json!({"userId": "u", "groupId": "g2"})),
        (
            "/v1/alias",
            "alias",
            json!({"userId": "u", "previousId": "p"}),
        ),
        ("/v1/a", "alias", json!({"userId": "u", "previousId": "p2"})),
    ];
    for (path, _, body) in &calls {
        let r = f.post(path).json(body).send().await.unwrap();
        assert_success(r).await;
    }
    let got = f.wait_delivered(calls.len()).await;
    let types: Vec<&str> = got.iter().map(|m| m["type"].as_str().unwrap()).collect();
    let want: Vec<&str> = calls.iter().map(|(_, t, _)| *t).collect();
    assert_eq!(types, want);
    for m in &got {
        assert_eq!(
            m["messageId"].as_str().unwrap().len(),
            36,
            "assigned UUID: {m}"
        );
        assert!(m["receivedAt"].as_str().unwrap().ends_with('Z'));
    }
}

#[tokio::test]
async fn batch_import_and_browser_batch_paths() {
    let f = Fanout::start();
    for path in ["/v1/batch", "/v1/import", "/v1/b"] {
        let body = json!({"batch": [
            {"type": "track", "userId": "u", "event": path, "messageId": format!("{path}-1")},
            {"type": "identify", "userId": "u", "messageId": format!("{path}-2")},
        ]});
        let r = f.post(path).json(&body).send().await.unwrap();
        assert_success(r).await;
    }
    let got = f.wait_delivered(6).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "/v1/batch-1",
            "/v1/batch-2",
            "/v1/import-1",
            "/v1/import-2",
            "/v1/b-1",
            "/v1/b-2"
        ]
    );
}

#[tokio::test]
async fn client_metrics_are_accepted_and_dropped() {
    let f = Fanout::start();
    let r = client()
        .post(f.url("/v1/m"))
        .header("content-type", "text/plain")
        .body(r#"{"series":[{"type":"Counter","metric":"analytics_js.invoke","value":1}]}"#)
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    // Something real after it, to know the queue has been read up to here.
    let r = f.post("/v1/t").json(&track("after")).send().await.unwrap();
    assert_success(r).await;
    let got = f.wait_delivered(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event"], "after");
}

#[tokio::test]
async fn every_auth_form_is_accepted() {
    let f = Fanout::start();
    let c = client();
    let body = track("auth");
    // Basic with the key as user name (all server libraries).
    assert_success(f.post("/v1/track").json(&body).send().await.unwrap()).await;
    // Bearer.
    assert_success(
        c.post(f.url("/v1/track"))
            .bearer_auth(WRITE_KEY)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    // writeKey in the body, no header (browser library); the key is not stored.
    let mut with_key = body.clone();
    with_key["writeKey"] = json!(WRITE_KEY);
    assert_success(c.post(f.url("/v1/t")).json(&with_key).send().await.unwrap()).await;
    let batch = json!({"batch": [body.clone()], "writeKey": WRITE_KEY});
    let mut batch = batch;
    batch["batch"][0]["type"] = json!("track");
    assert_success(
        c.post(f.url("/v1/batch"))
            .json(&batch)
            .send()
            .await
            .unwrap(),
    )
    .await;
    // The seed APIs' Authentication header, with and without Bearer.
    let seed = json!({"batch": [{"type": "track", "userId": "u", "event": "E"}]});
    let r = c
        .post(f.url("/event/batch"))
        .header("Authentication", format!("Bearer {WRITE_KEY}"))
        .json(&seed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(f.url("/api/v1/event"))
        .header("Authentication", WRITE_KEY)
        .json(&json!({"personId": "p", "event": "E"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = f.wait_delivered(6).await;
    assert_eq!(got.len(), 6);
    assert!(
        got.iter().all(|m| m.get("writeKey").is_none()),
        "write keys must never be stored"
    );
}

#[tokio::test]
async fn missing_or_unknown_keys_get_401_json() {
    let f = Fanout::start();
    let c = client();
    let cases = [
        c.post(f.url("/v1/track")).json(&track("x")),
        c.post(f.url("/v1/track"))
            .header("authorization", basic("nope"))
            .json(&track("x")),
        c.post(f.url("/v1/track"))
            .header("authorization", "Digest abc")
            .json(&track("x")),
        c.post(f.url("/v1/batch"))
            .json(&json!({"batch": [], "writeKey": "nope"})),
        // A wrong header key is not rescued by a right body key.
        c.post(f.url("/v1/t"))
            .header("authorization", basic("nope"))
            .json(&json!({"userId":"u","event":"E","writeKey": WRITE_KEY})),
        c.post(f.url("/event/batch")).json(&json!({"batch": []})),
    ];
    for request in cases {
        let (status, body) = status_json(request.send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, body) = status_json(
        c.post(f.url("/api/v1/event"))
            .header("Authentication", "nope")
            .json(&json!({"personId":"p","event":"E"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (401, json!({"message": "unknown write key"}))
    );
    assert!(f.delivered().is_empty());
}

#[tokio::test]
async fn json_is_read_whatever_the_content_type() {
    let f = Fanout::start();
    let body = serde_json::to_string(&track("ct")).unwrap();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-8",
        "application/octet-stream",
    ] {
        let r = f
            .post("/v1/track")
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_success(r).await;
    }
    let r = f.post("/v1/track").body(body.clone()).send().await.unwrap();
    assert_success(r).await;
    assert_eq!(f.wait_delivered(5).await.len(), 5);
}

#[tokio::test]
async fn gzip_and_deflate_bodies_are_decoded() {
    let f = Fanout::start();
    let body = serde_json::to_vec(
        &json!({"batch": [{"type": "track", "userId": "u", "event": "zipped"}]}),
    )
    .unwrap();
    let r = f
        .post_encoded("/v1/batch", "gzip", gzip(&body))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &body).unwrap();
    let r = f
        .post_encoded("/v1/batch", "deflate", z.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    let got = f.wait_delivered(2).await;
    assert!(got.iter().all(|m| m["event"] == "zipped"));
    // Not gzip at all, though it says so: a clear 400.
    let r = f
        .post_encoded("/v1/batch", "gzip", body.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "unreadable_body").await;
    // An encoding fanout does not speak.
    let r = f
        .post_encoded("/v1/batch", "snappy", body)
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "unsupported_encoding").await;
}

#[tokio::test]
async fn validation_errors_name_field_and_index() {
    let f = Fanout::start();
    // (path, body, error code, field, index)
    type Case = (
        &'static str,
        Value,
        &'static str,
        Option<&'static str>,
        Option<u64>,
    );
    let cases: Vec<Case> = vec![
        (
            "/v1/track",
            json!({"userId": "u"}),
            "missing_field",
            Some("event"),
            None,
        ),
        (
            "/v1/track",
            json!({"event": "E"}),
            "missing_field",
            Some("userId"),
            None,
        ),
        (
            "/v1/track",
            json!({"userId": null, "anonymousId": "", "event": "E"}),
            "missing_field",
            Some("userId"),
            None,
        ),
        (
            "/v1/track",
            json!({"userId": ["u"], "event": "E"}),
            "invalid_field",
            Some("userId"),
            None,
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": ""}),
            "missing_field",
            Some("event"),
            None,
        ),
        (
            "/v1/group",
            json!({"userId": "u"}),
            "missing_field",
            Some("groupId"),
            None,
        ),
        (
            "/v1/alias",
            json!({"userId": "u"}),
            "missing_field",
            Some("previousId"),
            None,
        ),
        (
            "/v1/alias",
            json!({"previousId": "p", "anonymousId": "a"}),
            "missing_field",
            Some("userId"),
            None,
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "traits": "pro"}),
            "invalid_field",
            Some("traits"),
            None,
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "context": 1}),
            "invalid_field",
            Some("context"),
            None,
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "messageId": "x".repeat(101)}),
            "invalid_field",
            Some("messageId"),
            None,
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "timestamp": "last tuesday"}),
            "invalid_field",
            Some("timestamp"),
            None,
        ),
        (
            "/v1/identify",
            json!(["not", "an", "object"]),
            "invalid_message",
            None,
            None,
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": "u", "event": "ok"}, {"type": "track", "userId": "u"}]}),
            "missing_field",
            Some("event"),
            Some(1),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"userId": "u"}]}),
            "missing_field",
            Some("type"),
            Some(0),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "purchase", "userId": "u"}]}),
            "invalid_field",
            Some("type"),
            Some(0),
        ),
        (
            "/v1/batch",
            json!({"batch": "nope"}),
            "invalid_field",
            Some("batch"),
            None,
        ),
        (
            "/v1/batch",
            json!({"events": []}),
            "missing_field",
            Some("batch"),
            None,
        ),
        (
            "/v1/batch",
            json!({"batch": [], "integrations": []}),
            "invalid_field",
            Some("integrations"),
            None,
        ),
    ];
    for (path, body, code, field, index) in cases {
        let r = f.post(path).json(&body).send().await.unwrap();
        let (status, err) = status_json(r).await;
        assert_eq!(status, 400, "{path} {body}: {err}");
        assert_eq!(err["success"], false);
        assert_eq!(err["error"]["code"], code, "{path} {body}: {err}");
        assert_eq!(
            err["error"]["field"].as_str(),
            field,
            "{path} {body}: {err}"
        );
        assert_eq!(
            err["error"]["index"].as_u64(),
            index,
            "{path} {body}: {err}"
        );
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    // A batch with a bad item stores nothing, not even its good items.
    let r = f.post("/v1/t").json(&track("marker")).send().await.unwrap();
    assert_success(r).await;
    let got = f.wait_delivered(1).await;
    assert_eq!(got.len(), 1, "only the marker: {got:?}");
    assert_eq!(got[0]["event"], "marker");
}

#[tokio::test]
async fn timestamps_are_parsed_and_corrected() {
    let f = Fanout::start();
    let body = json!({
        "sentAt": "2020-01-01T00:00:10.000000000Z",
        "batch": [
            // Go-style nanoseconds, client clock far in the past: corrected by sentAt.
            {"type": "track", "userId": "u", "event": "go", "timestamp": "2020-01-01T00:00:05.123456789Z"},
            // Python-style offset, own sentAt.
            {"type": "track", "userId": "u", "event": "py", "timestamp": "2020-01-01T00:00:05.000+00:00", "sentAt": "2020-01-01T00:00:06+00:00"},
            // RudderStack-style originalTimestamp.
            {"type": "track", "userId": "u", "event": "rs", "originalTimestamp": "2020-01-01T00:00:09Z"},
        ]
    });
    let before = chrono::Utc::now();
    let r = f.post("/v1/batch").json(&body).send().await.unwrap();
    assert_success(r).await;
    let after = chrono::Utc::now();
    let got = f.wait_delivered(3).await;
    let parse = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let slack = chrono::TimeDelta::milliseconds(5);
    // Both times are written to the millisecond, so the skew can differ by one.
    for (m, ago_ms) in got.iter().zip([4876.5, 1000.0, 1000.0]) {
        let received = parse(&m["receivedAt"]);
        assert!(received >= before - slack && received <= after + slack);
        let ago = (received - parse(&m["timestamp"])).num_milliseconds() as f64;
        assert!((ago - ago_ms).abs() <= 1.0, "{ago} ms: {m}");
    }
    assert_eq!(
        got[0]["originalTimestamp"],
        "2020-01-01T00:00:05.123456789Z"
    );
    assert_eq!(got[1]["originalTimestamp"], "2020-01-01T00:00:05.000+00:00");
    assert_eq!(got[2]["originalTimestamp"], "2020-01-01T00:00:09Z");
    assert_eq!(got[0]["sentAt"], "2020-01-01T00:00:10.000000000Z");
}

#[tokio::test]
async fn message_fields_pass_through_and_batch_context_merges() {
    let f = Fanout::start();
    let body = json!({
        "context": {"library": {"name": "analytics-go"}, "ip": "10.0.0.1"},
        // Go-style lower-case `all`; the test's file destination `out` is named on.
        "integrations": {"all": false, "out": true},
        "messageId": "batch-level-id-from-go",
        "batch": [{
            "type": "track", "userId": "u", "event": "E", "messageId": "m1",
            "context": {"ip": "203.0.113.9"}, "properties": {"nested": {"a": [1, 2, {"b": null}]}, "ü": "é"},
            "_metadata": {"bundled": ["x"]}, "channel": "server", "custom": 1.5e3,
            "receivedAt": "1999-01-01T00:00:00Z"
        }]
    });
    let r = f.post("/v1/batch").json(&body).send().await.unwrap();
    assert_success(r).await;
    let m = &f.wait_delivered(1).await[0];
    assert_eq!(m["messageId"], "m1");
    assert_eq!(
        m["context"],
        json!({"ip": "203.0.113.9", "library": {"name": "analytics-go"}})
    );
    assert_eq!(m["integrations"], json!({"all": false, "out": true}));
    assert_eq!(m["properties"], body["batch"][0]["properties"]);
    assert_eq!(m["_metadata"], json!({"bundled": ["x"]}));
    assert_eq!(m["channel"], "server");
    assert_eq!(m["custom"], 1500.0);
    assert_ne!(
        m["receivedAt"], "1999-01-01T00:00:00Z",
        "receivedAt is the server's"
    );
}

#[tokio::test]
async fn limits_answer_with_the_limit_named() {
    let settings = Settings::default().section(
        "[limits]\nmax_batch_messages = 3\nmax_message_bytes = 1024\nmax_request_bytes = 4096\n",
    );
    let f = Fanout::start_with(settings);
    let item = json!({"type": "track", "userId": "u", "event": "E"});
    // Too many messages.
    let r = f
        .post("/v1/batch")
        .json(&json!({"batch": [item, item, item, item]}))
        .send()
        .await
        .unwrap();
    let err = expect_error(r, 400, "batch_too_large").await;
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_batch_messages"));
    // One message over its limit, inside a body under the request limit.
    let big = json!({"type": "track", "userId": "u", "event": "E", "properties": {"p": "x".repeat(1100)}});
    let r = f
        .post("/v1/batch")
        .json(&json!({"batch": [item, big]}))
        .send()
        .await
        .unwrap();
    let (status, err) = status_json(r).await;
    assert_eq!(
        (
            status,
            err["error"]["code"].as_str(),
            err["error"]["index"].as_u64()
        ),
        (400, Some("message_too_large"), Some(1))
    );
    // Body over the request limit: 413, on the wire and after decoding.
    let huge = serde_json::to_vec(&json!({"batch": [], "pad": "x".repeat(5000)})).unwrap();
    let r = f.post("/v1/batch").body(huge.clone()).send().await.unwrap();
    let err = expect_error(r, 413, "request_too_large").await;
    assert!(err["error"]["message"].as_str().unwrap().contains("4096"));
    let zipped = gzip(&huge);
    assert!(zipped.len() < 4096);
    let r = f
        .post_encoded("/v1/batch", "gzip", zipped)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "request_too_large").await;
    // At the limits: accepted.
    let r = f
        .post("/v1/batch")
        .json(&json!({"batch": [item, item, item]}))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
}

#[tokio::test]
async fn cors_preflight_and_responses() {
    let f = Fanout::start();
    let c = client();
    let r = c
        .request(reqwest::Method::OPTIONS, f.url("/v1/t"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-retry-count",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://shop.example");
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        methods.contains("post") && methods.contains("options"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for needed in ["authorization", "content-type", "x-retry-count"] {
        assert!(allowed.contains(needed), "{allowed}");
    }
    let r = c
        .post(f.url("/v1/t"))
        .header("origin", "https://shop.example")
        .header("content-type", "text/plain")
        .body(json!({"userId":"u","event":"E","writeKey":WRITE_KEY}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_success(r).await;
    // Errors carry it too, so the browser can read them.
    let r = c
        .post(f.url("/v1/t"))
        .header("origin", "https://shop.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
}

#[tokio::test]
async fn cors_allow_list_is_enforced() {
    let f = Fanout::start_with(
        Settings::default().section("[cors]\nallowed_origins = [\"https://good.example\"]\n"),
    );
    let c = client();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, f.url("/v1/batch"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let good = preflight("https://good.example").await.unwrap();
    assert_eq!(
        good.headers()["access-control-allow-origin"],
        "https://good.example"
    );
    let bad = preflight("https://evil.example").await.unwrap();
    assert!(bad.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn overload_gets_429_with_retry_after_before_the_body_is_read() {
    let f =
        Fanout::start_with(Settings::default().server("max_in_flight = 2\nretry_after = \"3s\""));
    // Two requests that never finish sending their bodies hold both slots.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = std::net::TcpStream::connect(f.addr).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: 1000\r\n\r\n{{\"batch\":[", basic(WRITE_KEY)).as_bytes(),
        )
        .unwrap();
        slow.push(s);
    }
    f.wait_metric("fanout_http_requests_in_flight", &[], |n| n == 2.0)
        .await;
    // The third gets 429 at once, although it declares a body it never sends.
    let (status, body) = tokio::task::spawn_blocking({
        let addr = f.addr;
        move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            std::io::Write::write_all(
                &mut s,
                b"POST /v1/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n",
            )
            .unwrap();
            common::read_response(&mut s)
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 429, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "overloaded");
    // Once the slow clients go, all is well again.
    drop(slow);
    f.wait_metric("fanout_http_requests_in_flight", &[], |n| n == 0.0)
        .await;
    let r = f.post("/v1/t").json(&track("after")).send().await.unwrap();
    assert_success(r).await;
}

#[tokio::test]
async fn overload_answer_carries_retry_after_header() {
    let f =
        Fanout::start_with(Settings::default().server("max_in_flight = 1\nretry_after = \"7s\""));
    let mut s = std::net::TcpStream::connect(f.addr).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"POST /v1/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{",
    )
    .unwrap();
    f.wait_metric("fanout_http_requests_in_flight", &[], |n| n == 1.0)
        .await;
    let r = f.post("/v1/t").json(&track("x")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    drop(s);
}

#[tokio::test]
async fn event_batch_reports_each_item() {
    let f = Fanout::start();
    let body = json!({"batch": [
        {"type": "track", "event": "User Registered", "userId": "6319fea8", "properties": {"firstName": "Tom"}, "messageId": "seq-1"},
        {"type": "identify", "userId": "6319fea8", "traits": {"companyName": "Tesla"}},
        {"type": "track", "event": "Anonymous", "anonymousId": "a", "messageId": "seq-3"},
        {"type": "page", "userId": "u", "messageId": "seq-4"},
    ]});
    let report = event_batch(&f, &body).await;
    assert_eq!(
        (
            report["success"].as_bool(),
            report["total"].as_u64(),
            report["processed"].as_u64(),
            report["errors"].as_u64()
        ),
        (Some(true), Some(4), Some(2), Some(2))
    );
    let items = report["batch"].as_array().unwrap();
    assert_eq!(
        items[0],
        json!({"messageId": "seq-1", "success": true, "processed": true})
    );
    assert_eq!(items[1]["success"], true);
    assert_eq!(items[1]["messageId"].as_str().unwrap().len(), 36);
    assert_eq!(
        items[2],
        json!({"messageId": "seq-3", "success": false, "processed": false, "error": "userId is required"})
    );
    assert_eq!(items[3]["success"], false);
    let got = f.wait_delivered(2).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["event"], "User Registered");
    assert_eq!(got[1]["messageId"], items[1]["messageId"]);
    // Malformed bodies are refused whole.
    for bad in ["not json", "{}", "{\"batch\": 1}"] {
        let r = f
            .post_bearer("/event/batch")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn person_event_contract() {
    let f = Fanout::start();
    let c = client();
    let send = |body: Value| {
        c.post(f.url("/api/v1/event"))
            .header("Authentication", WRITE_KEY)
            .json(&body)
            .send()
    };
    let (status, ok) = status_json(send(json!({"personId": "p1", "messageId": "idem-1", "event": "Paid", "properties": {"amount": 3}})).await.unwrap()).await;
    assert_eq!(
        (status, ok),
        (200, json!({"success": true, "messageId": "idem-1"}))
    );
    let (status, ok) = status_json(
        send(json!({"personId": "p1", "traits": {"plan": "pro"}}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let generated = ok["messageId"].as_str().unwrap().to_string();
    let (status, err) = status_json(send(json!({"event": "Paid"})).await.unwrap()).await;
    assert_eq!(
        (status, err),
        (400, json!({"message": "personId is required"}))
    );
    let (status, err) = status_json(send(json!({"personId": "p1"})).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(err["message"].as_str().unwrap().contains("event"));
    let got = f.wait_delivered(2).await;
    assert_eq!(
        (
            got[0]["type"].as_str(),
            got[0]["userId"].as_str(),
            got[0]["event"].as_str()
        ),
        (Some("track"), Some("p1"), Some("Paid"))
    );
    assert!(got[0].get("personId").is_none());
    assert_eq!(
        (got[1]["type"].as_str(), got[1]["messageId"].as_str()),
        (Some("identify"), Some(generated.as_str()))
    );
}

#[tokio::test]
async fn health_ready_and_unknown_paths() {
    let f = Fanout::start();
    let c = client();
    assert_eq!(c.get(f.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(f.url("/ready")).send().await.unwrap().status(), 200);
    let (status, err) = status_json(c.post(f.url("/v2/track")).send().await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, err) = status_json(c.get(f.url("/v1/batch")).send().await.unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(c
        .get(f.url("/health"))
        .send()
        .await
        .unwrap()
        .headers()
        .contains_key("x-request-id"));
}
