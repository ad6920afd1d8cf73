//! The messageId dedupe stage, black box: a message whose (source, messageId) was accepted
//! within `dedupe.ttl` is answered like any other and dropped, whatever path, client or
//! restart it came through; messages without a client messageId are never duplicates.
//!
//! "Nothing more arrives" is checked with a marker: after the requests under test, one
//! fresh message is sent and waited for. The queue delivers in order, so once the marker
//! is in the file everything acknowledged before it is too, and the counts are final.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::captures::{capture_files, read_captures};
use common::clients::run_python;
use common::{
    assert_success, basic, client, event_batch, read_response, shared_dir, status_json, Fanout,
    Settings, WRITE_KEY,
};

/// How long a wait for delivery may take on a loaded machine.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// The event of the marker messages `settled` sends; left out of what it returns.
const MARKER_EVENT: &str = "dedupe-test-marker";

/// Exact Segment success body.
const SUCCESS: &str = r#"{"success":true}"#;

fn track(id: &str, properties: Value) -> Value {
    json!({"type": "track", "userId": "u1", "event": "Deduped", "messageId": id, "properties": properties})
}

/// Sends a fresh marker, waits until it is delivered, and returns every delivered line
/// except the markers.
async fn settled(f: &Fanout) -> Vec<Value> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "marker-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    assert_success(
        f.post("/v1/track")
            .json(&json!({"userId": "marker", "event": MARKER_EVENT, "messageId": id}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let lines = f.delivered();
        if lines.iter().any(|l| l["messageId"] == id.as_str()) {
            // Everything settled: nothing can follow the marker either.
            f.wait_settled("out").await;
            return f
                .delivered()
                .into_iter()
                .filter(|l| l["event"] != MARKER_EVENT)
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "marker {id} not delivered within {DELIVERY_TIMEOUT:?}; {} lines so far",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Delivered lines grouped by messageId.
fn by_id(lines: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in lines {
        let id = line["messageId"]
            .as_str()
            .unwrap_or_else(|| panic!("delivered line without a string messageId: {line}"));
        map.entry(id.to_string()).or_default().push(line.clone());
    }
    map
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["messageId"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Asserts that every messageId was delivered exactly once and that they are `expected`.
fn assert_each_once(lines: &[Value], expected: &BTreeSet<String>, context: &str) {
    let got = by_id(lines);
    let repeated: Vec<(&String, usize)> = got
        .iter()
        .filter(|(_, copies)| copies.len() > 1)
        .map(|(id, copies)| (id, copies.len()))
        .collect();
    assert!(
        repeated.is_empty(),
        "{context}: {} messageIds delivered more than once, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(10)]
    );
    let got_ids: BTreeSet<String> = got.keys().cloned().collect();
    let missing: Vec<&String> = expected.difference(&got_ids).collect();
    let extra: Vec<&String> = got_ids.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: missing {missing:?}, unexpected {extra:?}"
    );
    assert_eq!(lines.len(), expected.len(), "{context}");
}

// ---------------------------------------------------------------------------------------
// 1. The official Python client, run twice.

#[tokio::test]
async fn python_client_run_twice_delivers_fixed_message_id_once() {
    let f = Fanout::start();
    run_python(&f, &[]).await;
    run_python(&f, &[]).await;
    let lines = settled(&f).await;
    let got = ids(&lines);
    assert_eq!(
        lines.len(),
        13,
        "6 fresh messages twice + fixed-msg-id-0 once: {got:?}"
    );
    let copies = by_id(&lines);
    assert_eq!(
        copies.get("fixed-msg-id-0").map(Vec::len),
        Some(1),
        "{got:?}"
    );
    assert_eq!(
        copies.len(),
        13,
        "the 12 others all have distinct ids: {got:?}"
    );
    // First run: its seven calls; second run: the six with fresh ids, in order.
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "track", "identify", "page", "screen", "group", "alias", "track", "track", "identify",
            "page", "screen", "group", "alias"
        ],
        "{got:?}"
    );
    assert_eq!(lines[6]["messageId"], "fixed-msg-id-0");
    assert_eq!(lines[6]["event"], "Signed Up");
}

// ---------------------------------------------------------------------------------------
// 2. Retry storm.

#[tokio::test]
async fn concurrent_identical_batches_deliver_each_message_once() {
    let f = Fanout::start();
    let batch: Vec<Value> = (0..50)
        .map(|i| track(&format!("storm-{i}"), json!({"i": i})))
        .collect();
    let body = serde_json::to_vec(&json!({"batch": batch})).unwrap();
    let mut request = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        f.addr,
        basic(WRITE_KEY),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);

    // All ten requests are sent but their last byte; then the ten last bytes go out
    // together, so the server handles them at the same time.
    let mut streams: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(f.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&request[..request.len() - 1]).unwrap();
            s
        })
        .collect();
    // Every request is in, each holding a slot while its body waits for its last byte.
    f.wait_metric("fanout_http_requests_in_flight", &[], |n| n == 10.0)
        .await;
    let last = *request.last().unwrap();
    for s in &mut streams {
        s.write_all(&[last]).unwrap();
    }
    let answers = tokio::task::spawn_blocking(move || {
        streams
            .iter_mut()
            .map(read_response)
            .collect::<Vec<(u16, String)>>()
    })
    .await
    .unwrap();
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!((*status, body.as_str()), (200, SUCCESS), "request {i}");
    }

    let lines = settled(&f).await;
    let expected: BTreeSet<String> = (0..50).map(|i| format!("storm-{i}")).collect();
    assert_each_once(&lines, &expected, "retry storm");
    for line in &lines {
        let i: usize = line["messageId"].as_str().unwrap()[6..].parse().unwrap();
        assert_eq!(line["properties"], json!({"i": i}), "{line}");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Captured client retries, replayed byte for byte (as in tests/captures.rs).

/// Replays one capture file into one fanout; each message must arrive exactly once.
async fn replay_once(file: &Path) -> usize {
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let captures = read_captures(file);
    let f = Fanout::start();
    let mut sent = 0;
    let mut expected = BTreeSet::new();
    for (i, capture) in captures.iter().enumerate() {
        let (status, body) = f.raw(&capture.request());
        assert_eq!(
            (status, body.as_str()),
            (200, SUCCESS),
            "{name} request {i}"
        );
        let ids = capture.message_ids();
        sent += ids.len();
        expected.extend(ids);
    }
    let lines = settled(&f).await;
    assert_each_once(&lines, &expected, &name);
    sent - expected.len()
}

#[tokio::test]
async fn captured_retry_sequence_is_delivered_once() {
    let file = shared_dir().join("fixtures/captures/segment_python__500x2_then_200.jsonl");
    let captures = read_captures(&file);
    // The premise: three requests carrying the same seven messageIds.
    assert_eq!(captures.len(), 3);
    let first = captures[0].message_ids();
    assert_eq!(first.len(), 7);
    assert!(captures.iter().all(|c| c.message_ids() == first));
    assert_eq!(replay_once(&file).await, 14, "14 repeated copies dropped");
}

#[tokio::test]
async fn every_capture_replayed_delivers_each_message_once() {
    let mut with_retries = 0;
    for file in &capture_files() {
        if replay_once(file).await > 0 {
            with_retries += 1;
        }
    }
    assert!(
        with_retries >= 5,
        "only {with_retries} captures repeat messages"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Duplicates inside one request.

#[tokio::test]
async fn duplicate_inside_one_batch_keeps_the_first() {
    let f = Fanout::start();
    let body = json!({"batch": [
        track("in-batch-a", json!({"copy": "first"})),
        track("in-batch-b", json!({"copy": "only"})),
        track("in-batch-a", json!({"copy": "second"})),
    ]});
    assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
    let lines = settled(&f).await;
    assert_eq!(ids(&lines), ["in-batch-a", "in-batch-b"]);
    assert_eq!(lines[0]["properties"], json!({"copy": "first"}));
    assert_eq!(lines[1]["properties"], json!({"copy": "only"}));
}

#[tokio::test]
async fn message_id_is_compared_as_decoded_json_string() {
    let f = Fanout::start();
    // "esc-ab" written with a \u escape is the same string.
    let body = r#"{"batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": "esc-ab", "properties": {"n": 1}},
        {"type": "track", "userId": "u", "event": "E", "messageId": "esc-a\u0062", "properties": {"n": 2}}
    ]}"#;
    assert_success(f.post("/v1/batch").body(body).send().await.unwrap()).await;
    let lines = settled(&f).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["properties"]["n"], 1);
}

// ---------------------------------------------------------------------------------------
// 5. The window survives restarts.

#[tokio::test]
async fn window_survives_kill9() {
    let mut f = Fanout::start();
    let batch: Vec<Value> = (0..5)
        .map(|i| track(&format!("k9-{i}"), json!({"run": 1})))
        .collect();
    let body = json!({"batch": batch});
    assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
    assert_success(
        f.post("/v1/track")
            .json(&track("k9-single", json!({"run": 1})))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let before = settled(&f).await;
    assert_eq!(before.len(), 6);

    f.kill9();
    f.restart();
    let again: Vec<Value> = (0..5)
        .map(|i| track(&format!("k9-{i}"), json!({"run": 2})))
        .collect();
    assert_success(
        f.post("/v1/batch")
            .json(&json!({"batch": again}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_success(
        f.post("/v1/track")
            .json(&track("k9-single", json!({"run": 2})))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let after = settled(&f).await;
    assert_eq!(ids(&after), ids(&before), "nothing new after the restart");
    assert!(after.iter().all(|l| l["properties"]["run"] == 1));
}

/// 40 requests of 5 messages with ids `seg-{r}-{i}`.
fn segment_batches() -> Vec<Value> {
    (0..40)
        .map(|r| {
            let batch: Vec<Value> = (0..5)
                .map(|i| {
                    track(
                        &format!("seg-{r}-{i}"),
                        json!({"r": r, "i": i, "pad": "x".repeat(200)}),
                    )
                })
                .collect();
            json!({"batch": batch})
        })
        .collect()
}

/// Segments are deleted once delivered, so the restarted window must come from
/// data/dedupe/keys.bin. `graceful` picks SIGTERM over kill -9.
async fn window_survives_segment_reclaim(graceful: bool) {
    let mut f = Fanout::start_with(Settings::default().server("segment_bytes = 4096"));
    let batches = segment_batches();
    for body in &batches {
        assert_success(f.post("/v1/batch").json(body).send().await.unwrap()).await;
    }
    let expected: BTreeSet<String> = (0..40)
        .flat_map(|r| (0..5).map(move |i| format!("seg-{r}-{i}")))
        .collect();
    let before = settled(&f).await;
    assert_each_once(&before, &expected, "first run");

    let queue = f.dir().join("data/queue");
    let first_segment = queue.join("00000000000000000000.seg");
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while first_segment.exists() {
        assert!(
            Instant::now() < deadline,
            "the first segment was never reclaimed: {:?}",
            std::fs::read_dir(&queue)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let segments = std::fs::read_dir(&queue)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count();
    let keys = std::fs::metadata(f.dir().join("data/dedupe/keys.bin"))
        .expect("data/dedupe/keys.bin exists")
        .len();
    assert!(
        keys > 0 && keys.is_multiple_of(16),
        "keys.bin holds the reclaimed segments' keys: {keys} bytes"
    );

    if graceful {
        let status = f.terminate();
        assert!(status.success(), "SIGTERM exit: {status}");
    } else {
        f.kill9();
    }
    f.restart();
    for body in &batches {
        assert_success(f.post("/v1/batch").json(body).send().await.unwrap()).await;
    }
    let after = settled(&f).await;
    assert_each_once(
        &after,
        &expected,
        &format!(
            "after restart ({} segments left before it, keys.bin {keys} bytes)",
            segments
        ),
    );
}

#[tokio::test]
async fn window_survives_segment_reclaim_and_kill9() {
    window_survives_segment_reclaim(false).await;
}

#[tokio::test]
async fn window_survives_segment_reclaim_and_sigterm() {
    window_survives_segment_reclaim(true).await;
}

// ---------------------------------------------------------------------------------------
// 6. TTL.

/// Sleeps until just after the next whole wall-clock second, so that requests sent
/// right after fall in one second.
async fn start_of_next_second() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = 1000 - u64::from(now.subsec_millis());
    tokio::time::sleep(Duration::from_millis(left + 20)).await;
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn ttl_ends_the_window() {
    let f = Fanout::start_with(Settings::default().section("[dedupe]\nttl = \"1s\""));
    let send = |id: String, n: u32| {
        f.post("/v1/track")
            .json(&track(&id, json!({"n": n})))
            .send()
    };
    // The window is kept in whole seconds, so "within 1 s" is checked with both copies
    // answered inside one wall-clock second (another id is tried if the machine was too
    // slow for that).
    let mut chosen = None;
    for attempt in 0..3 {
        let id = format!("ttl-{attempt}");
        start_of_next_second().await;
        let second = unix_secs();
        assert_success(send(id.clone(), 1).await.unwrap()).await;
        assert_success(send(id.clone(), 2).await.unwrap()).await;
        if unix_secs() == second {
            chosen = Some(id);
            break;
        }
    }
    let id = chosen.expect("two requests never fit in one second");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_success(send(id.clone(), 3).await.unwrap()).await;
    let lines = settled(&f).await;
    let ns: Vec<&Value> = lines
        .iter()
        .filter(|l| l["messageId"] == id.as_str())
        .map(|l| &l["properties"]["n"])
        .collect();
    assert_eq!(
        ns,
        [&json!(1), &json!(3)],
        "{id}: copy 2 (right after copy 1) is dropped, copy 3 (2.5 s later) accepted"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Per-source switch and per-source keys.

#[tokio::test]
async fn disabled_source_keeps_duplicates_enabled_source_drops_them() {
    let f = Fanout::start_with(Settings::default().section(
        "[[sources]]\nname = \"raw\"\nwrite_keys = [\"wk_raw\"]\ndedupe = { enabled = false }",
    ));
    for (key, via) in [("wk_raw", "raw"), (WRITE_KEY, "test")] {
        for copy in 1..=2 {
            assert_success(
                f.post_as(key, "/v1/track")
                    .json(&track("same-id", json!({"via": via, "copy": copy})))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        }
    }
    // And a duplicate within one batch from the disabled source.
    let body = json!({"batch": [
        track("raw-batch", json!({"via": "raw", "copy": 1})),
        track("raw-batch", json!({"via": "raw", "copy": 2})),
    ]});
    assert_success(
        f.post_as("wk_raw", "/v1/batch")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let lines = settled(&f).await;
    let got: Vec<(&str, &Value, &Value)> = lines
        .iter()
        .map(|l| {
            (
                l["messageId"].as_str().unwrap(),
                &l["properties"]["via"],
                &l["properties"]["copy"],
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("same-id", &json!("raw"), &json!(1)),
            ("same-id", &json!("raw"), &json!(2)),
            ("same-id", &json!("test"), &json!(1)),
            ("raw-batch", &json!("raw"), &json!(1)),
            ("raw-batch", &json!("raw"), &json!(2)),
        ]
    );
}

#[tokio::test]
async fn same_message_id_from_two_enabled_sources_is_not_a_duplicate() {
    let f = Fanout::start_with(
        Settings::default().section("[[sources]]\nname = \"app\"\nwrite_keys = [\"wk_app\"]"),
    );
    for round in 1..=2 {
        for (key, via) in [(WRITE_KEY, "test"), ("wk_app", "app")] {
            assert_success(
                f.post_as(key, "/v1/track")
                    .json(&track("shared-id", json!({"via": via, "round": round})))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        }
    }
    let lines = settled(&f).await;
    let got: Vec<&Value> = lines.iter().map(|l| &l["properties"]).collect();
    assert_eq!(
        got,
        [
            &json!({"via": "test", "round": 1}),
            &json!({"via": "app", "round": 1})
        ],
        "one copy per source"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Seed 001: `POST /event/batch`.

fn seq_track(id: &str, n: u32) -> Value {
    json!({"type": "track", "userId": "seq-user", "event": "Seq", "messageId": id, "properties": {"n": n}})
}

#[tokio::test]
async fn event_batch_reports_duplicates_as_not_processed() {
    let f = Fanout::start();
    let identify =
        json!({"type": "identify", "userId": "seq-user", "traits": {"a": 1}, "messageId": "seq-2"});
    let answer = event_batch(
        &f,
        &json!({"batch": [seq_track("seq-1", 1), identify, seq_track("seq-1", 2)]}),
    )
    .await;
    assert_eq!(
        answer,
        json!({"success": true, "total": 3, "processed": 2, "errors": 0, "batch": [
            {"messageId": "seq-1", "success": true, "processed": true},
            {"messageId": "seq-2", "success": true, "processed": true},
            {"messageId": "seq-1", "success": true, "processed": false},
        ]})
    );
    let answer = event_batch(
        &f,
        &json!({"batch": [seq_track("seq-1", 3), seq_track("seq-3", 4), seq_track("seq-2", 5)]}),
    )
    .await;
    assert_eq!(
        answer,
        json!({"success": true, "total": 3, "processed": 1, "errors": 0, "batch": [
            {"messageId": "seq-1", "success": true, "processed": false},
            {"messageId": "seq-3", "success": true, "processed": true},
            {"messageId": "seq-2", "success": true, "processed": false},
        ]})
    );
    // An invalid item next to a duplicate: counted as an error, not as processed.
    let answer = event_batch(
        &f,
        &json!({"batch": [seq_track("seq-3", 6), {"type": "track", "event": "No user", "messageId": "seq-4"}]}),
    )
    .await;
    assert_eq!(
        (&answer["total"], &answer["processed"], &answer["errors"]),
        (&json!(2), &json!(0), &json!(1)),
        "{answer}"
    );
    assert_eq!(
        answer["batch"][0],
        json!({"messageId": "seq-3", "success": true, "processed": false})
    );
    let lines = settled(&f).await;
    assert_eq!(ids(&lines), ["seq-1", "seq-2", "seq-3"]);
    assert_eq!(lines[0]["properties"], json!({"n": 1}));
    assert_eq!(lines[2]["properties"], json!({"n": 4}));
}

// ---------------------------------------------------------------------------------------
// 9. Seed 000: `POST /api/v1/event`.

#[tokio::test]
async fn person_event_duplicate_is_409() {
    let f = Fanout::start();
    let send = |body: Value| {
        client()
            .post(f.url("/api/v1/event"))
            .header("Authentication", WRITE_KEY)
            .json(&body)
            .send()
    };
    let event = json!({"personId": "p1", "messageId": "m1", "event": "E"});
    let (status, body) = status_json(send(event.clone()).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (200, json!({"success": true, "messageId": "m1"}))
    );
    for attempt in 0..2 {
        let (status, body) = status_json(send(event.clone()).await.unwrap()).await;
        assert_eq!(status, 409, "repeat {attempt}: {body}");
        let fields = body.as_object().expect("error body is an object");
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            ["message"],
            "seed's error shape: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains("m1")),
            "the message names the messageId: {body}"
        );
    }
    // The key is (source, messageId), whatever endpoint the copy comes through.
    assert_success(
        f.post("/v1/track")
            .json(&json!({"userId": "p1", "event": "E", "messageId": "m1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;

    // Without a messageId each event gets its own and is accepted.
    let anonymous = json!({"personId": "p1", "event": "E"});
    let mut generated = Vec::new();
    for _ in 0..2 {
        let (status, body) = status_json(send(anonymous.clone()).await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true);
        generated.push(body["messageId"].as_str().unwrap().to_string());
    }
    assert_ne!(generated[0], generated[1]);
    assert_ne!(generated[0], "m1");

    let lines = settled(&f).await;
    assert_eq!(
        ids(&lines),
        ["m1", generated[0].as_str(), generated[1].as_str()]
    );
}

// ---------------------------------------------------------------------------------------
// 10. Messages without a client messageId.

#[tokio::test]
async fn messages_without_client_message_id_are_never_duplicates() {
    let f = Fanout::start();
    let body = json!({"userId": "u1", "event": "No Id", "properties": {"k": "v"}});
    for _ in 0..2 {
        assert_success(f.post("/v1/track").json(&body).send().await.unwrap()).await;
    }
    // `null` and "" are no messageId either; so are id-less items repeated in a batch.
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "No Id", "messageId": null},
        {"type": "track", "userId": "u1", "event": "No Id", "messageId": null},
        {"type": "track", "userId": "u1", "event": "No Id", "messageId": ""},
        {"type": "track", "userId": "u1", "event": "No Id", "messageId": ""},
        {"type": "track", "userId": "u1", "event": "No Id"},
        {"type": "track", "userId": "u1", "event": "No Id"},
    ]});
    for _ in 0..2 {
        assert_success(f.post("/v1/batch").json(&batch).send().await.unwrap()).await;
    }
    let lines = settled(&f).await;
    assert_eq!(lines.len(), 14, "{:?}", ids(&lines));
    let distinct: BTreeSet<String> = ids(&lines).into_iter().collect();
    assert_eq!(
        distinct.len(),
        14,
        "every message got its own id: {distinct:?}"
    );
    assert!(distinct.iter().all(|id| id.len() == 36), "{distinct:?}");
}
