//! Requests captured from the official Segment libraries
//! (`../shared/fixtures/captures/*.jsonl`), rebuilt byte for byte for replay.
//!
//! The captures hold the decoded body as JSON (`json`), not the wire bytes. The bytes are
//! rebuilt from the raw text of that field, whose key order and string escapes are the
//! client's: analytics-python serializes with `json.dumps` defaults (`", "` and `": "`
//! separators, ASCII only), analytics-node with `JSON.stringify` (compact). Only the
//! whitespace between tokens is rewritten; the rebuilt length must equal the captured
//! `body_bytes_decoded`, which proves the bytes are the client's.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{gzip, shared_dir};

/// One captured request.
#[derive(Deserialize)]
pub struct Capture {
    pub method: String,
    pub path: String,
    pub http_version: String,
    pub headers: Vec<(String, String)>,
    pub body_bytes_decoded: usize,
    pub json: Box<RawValue>,
}

impl Capture {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_python(&self) -> bool {
        let agent = self.header("User-Agent").unwrap_or_default();
        agent.starts_with("analytics-python")
    }

    pub fn is_gzip(&self) -> bool {
        self.header("Content-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
    }

    /// The decoded body as the client serialized it.
    pub fn body(&self) -> Vec<u8> {
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
    pub fn request(&self) -> Vec<u8> {
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

    /// The `messageId` of every item of the captured batch, in order.
    pub fn message_ids(&self) -> Vec<String> {
        let body: Value = serde_json::from_str(self.json.get()).unwrap();
        body["batch"]
            .as_array()
            .expect("batch array")
            .iter()
            .map(|m| m["messageId"].as_str().expect("messageId").to_string())
            .collect()
    }
}

/// Rewrites the whitespace between JSON tokens: Python's `", "` / `": "` separators, or
/// none (compact). Strings are copied verbatim, escapes included.
pub fn reserialize(raw: &str, python: bool) -> String {
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

/// The capture files (`*.jsonl` in `fixtures/captures`), sorted; fails if there are none.
pub fn capture_files() -> Vec<PathBuf> {
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

/// The captures of one file, one a non-blank line.
pub fn read_captures(file: &Path) -> Vec<Capture> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", file.display(), i + 1))
        })
        .collect()
}
