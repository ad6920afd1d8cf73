//! Replays every request captured from the official Segment libraries
//! (`../shared/fixtures/captures/*.jsonl`) byte for byte over a raw TCP connection, and checks
//! that fanout answers `200 {"success":true}` and delivers what the client sent.
//!
//! How the request bytes are rebuilt from the captures: see `common::captures`.
//!
//! Every capture is answered 200 here, whatever the capture server answered then
//! (`response_status` was the scenario, not what a correct server says). Retried requests
//! repeat the same messages, so assertions are on the set of `messageId`s and on fields,
//! never on line counts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::captures::{capture_files, read_captures, reserialize};
use common::Fanout;

/// Fields fanout owns: rewritten, merged or dropped, so not compared with the client's.
const OWNED: [&str; 9] = [
    "type",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "context",
    "integrations",
    "writeKey",
];

#[test]
fn reserialize_rewrites_only_whitespace() {
    let raw = r#"{ "a" :[1, {"b":"x, \"y\": z"}],"c" : {} }"#;
    assert_eq!(
        reserialize(raw, false),
        r#"{"a":[1,{"b":"x, \"y\": z"}],"c":{}}"#
    );
    assert_eq!(
        reserialize(raw, true),
        r#"{"a": [1, {"b": "x, \"y\": z"}], "c": {}}"#
    );
}

/// Waits until every id in `ids` has been delivered; returns the delivered lines by id.
async fn wait_for_ids(f: &Fanout, ids: &BTreeSet<String>) -> BTreeMap<String, Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for line in f.delivered() {
            let id = line["messageId"]
                .as_str()
                .unwrap_or_else(|| panic!("delivered line without a string messageId: {line}"))
                .to_string();
            by_id.entry(id).or_default().push(line);
        }
        let missing: Vec<&String> = ids.iter().filter(|id| !by_id.contains_key(*id)).collect();
        if missing.is_empty() {
            return by_id;
        }
        if Instant::now() > deadline {
            panic!("messageIds never delivered: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks one delivered message against the item the client sent in `batch`.
fn check_item(item: &Value, batch: &Value, got: &Value, context: &str) {
    let sent = item.as_object().expect("batch item is an object");
    let got_obj = got.as_object().expect("delivered line is an object");
    for (key, value) in sent {
        if OWNED.contains(&key.as_str()) {
            continue;
        }
        assert_eq!(
            got_obj.get(key),
            Some(value),
            "{context}: field {key:?} changed\n sent: {item}\n  got: {got}"
        );
    }
    assert_eq!(got["type"], item["type"], "{context}: type\n got: {got}");
    assert_eq!(got["messageId"], item["messageId"], "{context}: messageId");
    let client_time = item
        .get("originalTimestamp")
        .or_else(|| item.get("timestamp"))
        .expect("captured items carry a timestamp");
    assert_eq!(
        &got["originalTimestamp"], client_time,
        "{context}: originalTimestamp is the client's timestamp\n got: {got}"
    );
    // No batch-level context/integrations in these captures: the merge is the item's own.
    for key in ["context", "integrations"] {
        if batch.get(key).is_none() {
            assert_eq!(got.get(key), item.get(key), "{context}: {key}\n got: {got}");
        }
    }
    let timestamp = got["timestamp"].as_str().unwrap_or_default();
    assert!(
        timestamp.len() == 24
            && timestamp.ends_with('Z')
            && chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
        "{context}: timestamp is RFC 3339 with millis and Z: {got}"
    );
    assert!(
        got["receivedAt"].is_string(),
        "{context}: receivedAt\n got: {got}"
    );
    assert!(
        got.get("writeKey").is_none(),
        "{context}: writeKey is never stored\n got: {got}"
    );
}

async fn replay_file(file: &Path) {
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let captures = read_captures(file);
    let f = Fanout::start();
    for (i, capture) in captures.iter().enumerate() {
        let (status, body) = f.raw(&capture.request());
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"success":true}"#),
            "{name} request {i}"
        );
    }

    let mut items: Vec<(String, Value, Value)> = Vec::new();
    for (i, capture) in captures.iter().enumerate() {
        let batch: Value = serde_json::from_str(capture.json.get()).expect("capture json");
        for item in batch["batch"].as_array().expect("batch array") {
            let id = item["messageId"]
                .as_str()
                .expect("captured items carry a messageId");
            items.push((
                format!("{name} request {i} item {id}"),
                item.clone(),
                batch.clone(),
            ));
        }
    }
    let ids: BTreeSet<String> = items
        .iter()
        .map(|(_, item, _)| item["messageId"].as_str().unwrap().to_string())
        .collect();
    let delivered = wait_for_ids(&f, &ids).await;
    let extra: Vec<&String> = delivered.keys().filter(|id| !ids.contains(*id)).collect();
    assert!(extra.is_empty(), "{name}: unexpected messageIds {extra:?}");
    // Each delivered copy (a retry may still be delivered twice) must match what was sent.
    for (context, item, batch) in &items {
        for got in &delivered[item["messageId"].as_str().unwrap()] {
            check_item(item, batch, got, context);
        }
    }
}

#[tokio::test]
async fn every_capture_is_accepted_and_delivered_intact() {
    for file in capture_files() {
        replay_file(&file).await;
    }
}

#[test]
fn rebuilt_bodies_match_the_captured_sizes() {
    let mut python = 0;
    let mut node = 0;
    let mut gzipped = 0;
    for file in capture_files() {
        for capture in read_captures(&file) {
            assert_eq!(
                capture.body().len(),
                capture.body_bytes_decoded,
                "{}",
                file.display()
            );
            if capture.is_python() {
                python += 1;
            } else {
                node += 1;
            }
            if capture.is_gzip() {
                gzipped += 1;
            }
        }
    }
    assert!(
        python > 0 && node > 0 && gzipped > 0,
        "python {python}, node {node}, gzip {gzipped}"
    );
}
