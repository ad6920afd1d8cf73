//! Klaviyo's documented event limits, one table per revision, enforced before sending.
//!
//! An event over a limit is never sent to fail remotely and never cut silently: it is
//! repaired by one of the rules below, or the message is rejected with `code: detail`.
//!
//! Repairs:
//! - `time` is cut to the whole second (Klaviyo does the same on arrival).
//! - A `unique_id` longer than the limit becomes its first characters, `~`, and the 32 hex
//!   digits of the XXH3-128 of the whole id, exactly `max_unique_id_chars` long: still
//!   deterministic (retries and replays dedupe) and still readable.
//!
//! Readings of the docs (stricter where they are vague): KB and MB are decimal (100 000 and
//! 5 000 000 bytes); string sizes are UTF-8 bytes of keys and values; "10 nested levels"
//! counts the `properties` object as level 1; "after 2000-01-01" excludes midnight itself;
//! "one year" is 365 days.

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use serde_json::{Map, Value};

use super::KlaviyoEvent;

/// The limits of one API revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Metric name length, in characters ("less than 128").
    pub max_metric_name_chars: usize,
    /// Top-level event properties.
    pub max_properties: usize,
    /// Any string in the properties (keys included), in bytes.
    pub max_string_bytes: usize,
    /// Elements of any array in the properties.
    pub max_array_len: usize,
    /// Nesting of objects and arrays, the properties object being level 1.
    pub max_depth: usize,
    /// The properties serialized as compact JSON, in bytes.
    pub max_properties_bytes: usize,
    /// The event time must be after this (Unix seconds).
    pub min_time_unix: i64,
    /// How far past the send time an event time may be, in seconds.
    pub max_future_secs: i64,
    /// `unique_id` length, in characters.
    pub max_unique_id_chars: usize,
}

/// Revision 2023-01-24 (seed 002).
pub const V2023_01_24: Limits = Limits {
    max_metric_name_chars: 127,
    max_properties: 300,
    max_string_bytes: 100_000,
    max_array_len: 4_000,
    max_depth: 10,
    max_properties_bytes: 5_000_000,
    min_time_unix: 946_684_800, // 2000-01-01T00:00:00Z
    max_future_secs: 365 * 86_400,
    max_unique_id_chars: 255,
};

/// The current revisions (2026-10-15 and its SDK models): more properties, older times.
pub const CURRENT: Limits = Limits {
    max_properties: 400,
    min_time_unix: 631_152_000, // 1990-01-01T00:00:00Z
    ..V2023_01_24
};

impl Limits {
    /// Applies the repairs, then checks every limit; `Err` is the reject reason.
    pub fn apply(&self, event: &mut KlaviyoEvent, now: DateTime<Utc>) -> Result<(), String> {
        let metric_chars = event.metric.chars().count();
        if metric_chars == 0 {
            return Err("metric_name_empty".to_string());
        }
        if metric_chars > self.max_metric_name_chars {
            return Err(format!(
                "metric_name_too_long: {metric_chars} characters > {}",
                self.max_metric_name_chars
            ));
        }

        event.time = event.time.with_nanosecond(0).unwrap_or(event.time);
        let seconds = event.time.timestamp();
        if seconds <= self.min_time_unix {
            return Err(format!(
                "time_too_old: {} is not after {}",
                rfc3339(seconds),
                rfc3339(self.min_time_unix)
            ));
        }
        if seconds - now.timestamp() > self.max_future_secs {
            return Err(format!(
                "time_too_far_ahead: {} is more than {} days after {}",
                rfc3339(seconds),
                self.max_future_secs / 86_400,
                rfc3339(now.timestamp())
            ));
        }

        if event.unique_id.is_empty() {
            return Err("unique_id_empty".to_string());
        }
        if event.unique_id.chars().count() > self.max_unique_id_chars {
            event.unique_id = shorten_unique_id(&event.unique_id, self.max_unique_id_chars);
        }

        let count = event.properties.len();
        if count > self.max_properties {
            return Err(format!(
                "too_many_properties: {count} > {}",
                self.max_properties
            ));
        }
        let mut size = ByteCount(0);
        self.check_object(&event.properties, 1, &mut size)
            .map_err(|v| v.reason(self))?;
        if size.0 > self.max_properties_bytes {
            return Err(format!(
                "properties_too_large: {} bytes > {}",
                size.0, self.max_properties_bytes
            ));
        }
        Ok(())
    }

    /// Checks an object at nesting `depth` and adds its compact JSON length to `size`.
    fn check_object(
        &self,
        object: &Map<String, Value>,
        depth: usize,
        size: &mut ByteCount,
    ) -> Result<(), Violation> {
        if depth > self.max_depth {
            return Err(Violation::new(Breach::Depth(depth)));
        }
        size.0 += 2 + object.len().saturating_sub(1); // braces and commas
        for (key, value) in object {
            let at = |mut v: Violation| {
                v.path.push(Segment::Key(key.clone()));
                v
            };
            if key.len() > self.max_string_bytes {
                return Err(at(Violation::new(Breach::KeyBytes(key.len()))));
            }
            size.add_json(key);
            size.0 += 1; // colon
            self.check_value(value, depth, size).map_err(at)?;
        }
        Ok(())
    }

    /// Checks a value found in a container at nesting `depth`.
    fn check_value(
        &self,
        value: &Value,
        depth: usize,
        size: &mut ByteCount,
    ) -> Result<(), Violation> {
        match value {
            Value::Object(object) => self.check_object(object, depth + 1, size),
            Value::Array(items) => {
                if depth + 1 > self.max_depth {
                    return Err(Violation::new(Breach::Depth(depth + 1)));
                }
                if items.len() > self.max_array_len {
                    return Err(Violation::new(Breach::ArrayLen(items.len())));
                }
                size.0 += 2 + items.len().saturating_sub(1);
                for (i, item) in items.iter().enumerate() {
                    self.check_value(item, depth + 1, size).map_err(|mut v| {
                        v.path.push(Segment::Index(i));
                        v
                    })?;
                }
                Ok(())
            }
            Value::String(s) if s.len() > self.max_string_bytes => {
                Err(Violation::new(Breach::StringBytes(s.len())))
            }
            scalar => {
                size.add_json(scalar);
                Ok(())
            }
        }
    }
}

/// The documented `unique_id` repair: a readable prefix, `~`, and a 128-bit hash of the
/// whole id, `max_chars` characters in all.
fn shorten_unique_id(id: &str, max_chars: usize) -> String {
    let hash = xxhash_rust::xxh3::xxh3_128(id.as_bytes());
    let keep = max_chars.saturating_sub(33);
    let prefix_end = id.char_indices().nth(keep).map_or(id.len(), |(i, _)| i);
    format!("{}~{hash:032x}", &id[..prefix_end])
}

fn rfc3339(unix_seconds: i64) -> String {
    DateTime::from_timestamp(unix_seconds, 0)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, false))
        .unwrap_or_else(|| unix_seconds.to_string())
}

/// Counts the bytes serde_json writes, without keeping them.
struct ByteCount(usize);

impl ByteCount {
    fn add_json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        serde_json::to_writer(&mut *self, value).expect("counting cannot fail");
    }
}

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first limit broken, with its path, built on the way back up (nothing is allocated
/// for events within the limits).
struct Violation {
    breach: Breach,
    /// Innermost segment first.
    path: Vec<Segment>,
}

enum Breach {
    StringBytes(usize),
    KeyBytes(usize),
    ArrayLen(usize),
    Depth(usize),
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Violation {
    fn new(breach: Breach) -> Violation {
        Violation {
            breach,
            path: Vec::new(),
        }
    }

    fn reason(&self, limits: &Limits) -> String {
        let mut path = String::from("properties");
        for segment in self.path.iter().rev() {
            match segment {
                Segment::Key(key) => {
                    path.push('.');
                    // A key may itself be the oversized string: name its start only.
                    match key.char_indices().nth(64) {
                        Some((end, _)) => {
                            path.push_str(&key[..end]);
                            path.push('…');
                        }
                        None => path.push_str(key),
                    }
                }
                Segment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        match self.breach {
            Breach::StringBytes(n) => format!(
                "string_too_long: {path} is {n} bytes > {}",
                limits.max_string_bytes
            ),
            Breach::KeyBytes(n) => format!(
                "string_too_long: the key {path} is {n} bytes > {}",
                limits.max_string_bytes
            ),
            Breach::ArrayLen(n) => format!(
                "array_too_long: {path} has {n} elements > {}",
                limits.max_array_len
            ),
            Breach::Depth(n) => format!(
                "properties_too_deep: {path} is at level {n} > {}",
                limits.max_depth
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_compact_json_size() {
        let value = serde_json::json!({"a": [1, "x\n", {"b": null}], "c": 1.5e300, "é": true});
        let Value::Object(object) = &value else {
            unreachable!()
        };
        let mut size = ByteCount(0);
        CURRENT.check_object(object, 1, &mut size).ok().unwrap();
        assert_eq!(size.0, serde_json::to_string(&value).unwrap().len());
    }

    #[test]
    fn shortened_unique_id_is_exactly_the_limit() {
        let long = "é".repeat(300);
        let short = shorten_unique_id(&long, 255);
        assert_eq!(short.chars().count(), 255);
        assert!(short.starts_with(&"é".repeat(222)));
        assert_eq!(short, shorten_unique_id(&long, 255));
        assert_ne!(short, shorten_unique_id(&format!("{long}x"), 255));
    }
}
