//! Segment's archive layout: which object each message of a batch goes to, and the
//! object's bytes.
//!
//! `<prefix>/<source>/<received day as epoch ms of 00:00 UTC>/<time>-<digest>.gz`, gzipped
//! JSON lines. The file name is made of the group's own content (its first receive time
//! and a SHA-256 of its lines), not of the upload time: a retried batch writes the same
//! object again instead of a second copy, and different messages never share a name, so
//! two instances cannot overwrite each other's objects.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::super::Outgoing;
use crate::json::{scalar, RawObject, Scalar};
use crate::timestamp;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Messages of one batch bound for one object: same source, same received day.
#[derive(Debug, PartialEq, Eq)]
pub struct Group<'a> {
    pub source: &'a str,
    /// Epoch milliseconds of 00:00 UTC of the day.
    pub day_ms: i64,
    /// The earliest receive time among its messages, in epoch milliseconds.
    pub first_ms: i64,
    /// Indices into the batch, in batch order.
    pub indices: Vec<usize>,
}

/// Splits `batch` into one group per (source, received day), in order of first
/// appearance. A message without a readable top-level `receivedAt` (one a `drop_fields`
/// or an insert function removed) is filed under `now`.
pub fn group<'a>(batch: &[Outgoing<'a>], now: DateTime<Utc>) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    for (index, message) in batch.iter().enumerate() {
        let at = received_at(message.json).unwrap_or(now).timestamp_millis();
        let day_ms = at.div_euclid(DAY_MS) * DAY_MS;
        match groups
            .iter_mut()
            .find(|g| g.source == message.source && g.day_ms == day_ms)
        {
            Some(g) => {
                g.first_ms = g.first_ms.min(at);
                g.indices.push(index);
            }
            None => groups.push(Group {
                source: message.source,
                day_ms,
                first_ms: at,
                indices: vec![index],
            }),
        }
    }
    groups
}

/// The message's top-level `receivedAt`, which ingest always writes.
pub fn received_at(json: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(json).ok()?;
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    match RawObject::parse(raw)?.get("receivedAt").map(scalar) {
        Some(Scalar::Str(at)) => timestamp::parse(&at),
        _ => None,
    }
}

/// The folder of a group: `<prefix>/<source>/<day ms>/`.
pub fn folder(prefix: &str, source: &str, day_ms: i64) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{source}/{day_ms}/")
    } else {
        format!("{prefix}/{source}/{day_ms}/")
    }
}

/// `<time>-<digest>.gz`: the time sorts (fixed width, UTC), the digest tells contents apart.
pub fn file_name(first_ms: i64, lines: &[u8]) -> String {
    let time = DateTime::from_timestamp_millis(first_ms).unwrap_or(DateTime::UNIX_EPOCH);
    let digest = Sha256::digest(lines);
    let mut name = time.format("%Y%m%dT%H%M%S%.3fZ-").to_string();
    for byte in &digest[..16] {
        name.push_str(&format!("{byte:02x}"));
    }
    name.push_str(".gz");
    name
}

/// The group's messages as JSON lines, as stored.
pub fn lines(batch: &[Outgoing<'_>], group: &Group<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(group.indices.iter().map(|&i| batch[i].json.len() + 1).sum());
    for &i in &group.indices {
        out.extend_from_slice(batch[i].json);
        out.push(b'\n');
    }
    out
}

/// Gzip at the fast level: archives are written once per attempt, on the delivery path.
pub fn gzip(lines: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(lines.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(lines)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing<'a>(source: &'a str, json: &'a str) -> Outgoing<'a> {
        Outgoing {
            source,
            json: json.as_bytes(),
            prepared: None,
        }
    }

    #[test]
    fn groups_by_source_and_received_day() {
        let day1 = r#"{"type":"track","properties":{"receivedAt":"1999-01-01T00:00:00Z"},"receivedAt":"2026-12-06T23:59:59.999Z"}"#;
        let day2 = r#"{"type":"track","receivedAt":"2026-12-07T00:00:00.000Z"}"#;
        let day2_later = r#"{"type":"identify","receivedAt":"2026-12-07T08:00:00.000Z"}"#;
        let batch = [
            outgoing("web", day2_later),
            outgoing("web", day1),
            outgoing("ios", day2),
            outgoing("web", day2),
        ];
        let now = timestamp::parse("2026-12-09T00:00:00Z").unwrap();
        let groups = group(&batch, now);
        let dec6 = 1_796_601_600_000 - DAY_MS; // 2026-12-06T00:00:00Z
        let dec7 = 1_796_601_600_000;
        assert_eq!(
            groups,
            vec![
                Group {
                    source: "web",
                    day_ms: dec7,
                    first_ms: dec7,
                    indices: vec![0, 3]
                },
                Group {
                    source: "web",
                    day_ms: dec6,
                    first_ms: dec7 - 1,
                    indices: vec![1]
                },
                Group {
                    source: "ios",
                    day_ms: dec7,
                    first_ms: dec7,
                    indices: vec![2]
                },
            ]
        );
    }

    #[test]
    fn a_message_without_received_at_is_filed_under_now() {
        let batch = [
            outgoing("web", r#"{"type":"track"}"#),
            outgoing("web", "not json"),
        ];
        let now = timestamp::parse("2026-12-07T05:20:00Z").unwrap();
        let groups = group(&batch, now);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].day_ms, 1_796_601_600_000);
        assert_eq!(groups[0].indices, vec![0, 1]);
    }

    #[test]
    fn names_sort_by_time_and_differ_by_content() {
        assert_eq!(folder("segment-logs/", "web", 0), "segment-logs/web/0/");
        assert_eq!(folder("", "web", 0), "web/0/");
        let a = file_name(1_796_620_800_123, b"a\n");
        assert!(a.starts_with("20261207T052000.123Z-"), "{a}");
        assert!(a.ends_with(".gz"));
        assert_eq!(a.len(), "20261207T052000.123Z-".len() + 32 + 3);
        assert_eq!(a, file_name(1_796_620_800_123, b"a\n"));
        assert_ne!(a, file_name(1_796_620_800_123, b"b\n"));
        assert!(file_name(1_796_620_800_124, b"a\n") > a);
    }

    #[test]
    fn gzip_holds_the_lines() {
        use std::io::Read;
        let batch = [outgoing("web", r#"{"a":1}"#), outgoing("web", r#"{"b":2}"#)];
        let now = DateTime::UNIX_EPOCH;
        let group = &group(&batch, now)[0];
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gzip(&lines(&batch, group))[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n");
    }
}
