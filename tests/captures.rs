//! Replays every request captured from the official Segment libraries
//! (`../shared/fixtures/captures/*.jsonl`) byte for byte over a raw TCP connection, and checks
//! that fanout answers `200 {"success":true}` and delivers what the client sent.
//!
//! The captures hold the decoded body as JSON (`json`), not the wire bytes. The bytes are
//! rebuilt from the raw text of that field, whose key order and string escapes are the
//! client's: analytics-python serializes with `json.dumps` defaults (`", "` and `": "`
//! separators, ASCII only), analytics-node with `JSON.stringify` (compact). Only the
//! whitespace between tokens is rewritten; the rebuilt length must equal the captured
//! `body_bytes_decoded`, which proves the bytes are the client's.
//!
//! Every capture is answered 200 here, whatever the capture server answered then
//! (`response_status` was the scenario, not what a correct server says). Retried requests
//! repeat the same messages, so assertions are on the set of `messageId`s and on fields,
//! never on line counts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use common::{gzip, shared_dir, Fanout};

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

/// One captured request.
#[derive(Deserialize)]
struct Capture {
    method: String,
    path: String,
    http_version: String,
    headers: Vec<(String, String)>,
    body_bytes_decoded: usize,
    json: Box<RawValue>,
}

impl Capture {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_python(&self) -> bool {
        let agent = self.header("User-Agent").unwrap_or_default();
        agent.starts_with("analytics-python")
    }

    fn is_gzip(&self) -> bool {
        self.header("Content-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
    }

    /// The decoded body as the client serialized it.
    fn body(&self) -> Vec<u8> {
        let body = reserialize(self.json.get(), self.is_python());
        assert!(
            body.is_ascii(),
            "captures are ASCII; a non-ASCII body would need the client's escaping"
        );
        body.into_bytes()
    }

    /// The request as the client sent it: request line, headers in wire order and case,
    /// body. For a gzip capture only the decoded body was recorded, so the body is gzipped
    /// again here (not the client's compressed bytes) and `Content-Length` is fixed.
    fn request(&self) -> Vec<u8> {
        let decoded = self.body();
        assert_eq!(
            decoded.len(),
            self.body_bytes_decoded,
            "rebuilt body differs from the captured one: {}",
            String::from_utf8_lossy(&decoded)
        );
        let body = if self.is_gzip() {
            gzip(&decoded)
        } else {
            decoded
        };
        let mut head = format!("{} {} {}\r\n", self.method, self.path, self.http_version);
        let mut saw_length = false;
        for (name, value) in &self.headers {
            let value = if name.eq_ignore_ascii_case("content-length") {
                saw_length = true;
                if !self.is_gzip() {
                    assert_eq!(value, &body.len().to_string(), "captured Content-Length");
                }
                body.len().to_string()
            } else {
                value.clone()
            };
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        assert!(saw_length, "every capture has a Content-Length");
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        request
    }
}

/// Rewrites the whitespace between JSON tokens: Python's `", "` / `": "` separators, or
/// none (compact). Strings are copied verbatim, escapes included.
fn reserialize(raw: &str, python: bool) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(s) = chars.next() {
                    out.push(s);
                    match s {
                        '\\' => out.push(chars.next().expect("escape in string")),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            ' ' | '\t' | '\n' | '\r' => {}
            ',' | ':' => {
                out.push(c);
                if python {
                    out.push(' ');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

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

fn capture_files() -> Vec<PathBuf> {
    let dir = shared_dir().join("fixtures/captures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no captures in {}", dir.display());
    files
}

fn read_captures(file: &Path) -> Vec<Capture> {
    let text = std::fs::read_to_string(file).expect("read capture file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", file.display(), i + 1))
        })
        .collect()
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
