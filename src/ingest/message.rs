//! One Segment message: validated per type and written out enriched.
//!
//! The output keeps every field the client sent, byte for byte but on one line (raw line
//! breaks would let a client forge lines of JSON-lines output), except those fanout owns:
//! `type`, `messageId` (assigned when missing), `timestamp` (skew-corrected),
//! `originalTimestamp` (the client's value), `sentAt`, `receivedAt` (ours, never the
//! client's), the merged `context`/`integrations`, and `writeKey` (a secret: never stored).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::LimitsConfig;
use super::Rejection;
use crate::json::{self, is_object_or_null, scalar, RawObject, Scalar};
use crate::message::{DedupeKey, MessageType, Stamp, Tag};
use crate::timestamp;

/// What every message of one request shares: the receive time and, for batches, the
/// batch-level `sentAt`, `context` and `integrations`.
pub struct Envelope<'a> {
    pub received_at: DateTime<Utc>,
    received_at_json: Vec<u8>,
    pub sent_at: Option<(&'a RawValue, DateTime<Utc>)>,
    pub context: Option<RawObject<'a>>,
    pub integrations: Option<RawObject<'a>>,
}

impl<'a> Envelope<'a> {
    pub fn new(received_at: DateTime<Utc>) -> Envelope<'a> {
        let mut received_at_json = Vec::with_capacity(26);
        timestamp::write_json(&mut received_at_json, received_at);
        Envelope {
            received_at,
            received_at_json,
            sent_at: None,
            context: None,
            integrations: None,
        }
    }
}

/// Checks the size, nesting and numbers of one message and reads its top-level fields.
pub fn parse_item<'a>(
    raw: &'a RawValue,
    limits: &LimitsConfig,
) -> Result<RawObject<'a>, Rejection> {
    check_size(raw.get(), limits)?;
    match RawObject::parse(raw) {
        Some(fields) => {
            check_values(&fields, limits)?;
            Ok(fields)
        }
        // An object the parser gave up on (too deep for it): say why.
        None if raw.get().starts_with('{') => {
            json::check_structure(raw.get(), limits.max_json_depth)
                .map_err(|e| structure_rejection(raw.get(), "", e, limits))?;
            Err(not_an_object())
        }
        None => Err(not_an_object()),
    }
}

fn not_an_object() -> Rejection {
    Rejection::new("invalid_message", "message must be a JSON object")
}

/// Checks the size, nesting and numbers of one message and that it is an object
/// (`fields`: its top-level fields, read already).
pub fn check_object<'a, 'f>(
    text: &str,
    fields: Option<&'f RawObject<'a>>,
    limits: &LimitsConfig,
) -> Result<&'f RawObject<'a>, Rejection> {
    check_size(text, limits)?;
    let fields = fields.ok_or_else(not_an_object)?;
    check_values(fields, limits)?;
    Ok(fields)
}

fn check_size(text: &str, limits: &LimitsConfig) -> Result<(), Rejection> {
    if text.len() > limits.max_message_bytes {
        return Err(Rejection::new(
            "message_too_large",
            format!(
                "message is {} bytes; the limit is {} bytes (limits.max_message_bytes)",
                text.len(),
                limits.max_message_bytes
            ),
        ));
    }
    Ok(())
}

/// Nesting and numbers, one top-level value at a time (one level below the message):
/// top-level strings (ids, names, times) can hold neither and are not read again.
fn check_values(fields: &RawObject<'_>, limits: &LimitsConfig) -> Result<(), Rejection> {
    let depth = limits.max_json_depth.saturating_sub(1);
    for (key, value) in fields.iter() {
        let text = value.get();
        if !text.starts_with('"') {
            json::check_structure(text, depth)
                .map_err(|e| structure_rejection(text, key, e, limits))?;
        }
    }
    Ok(())
}

/// The rejection for what `check_structure` found in `text`, the value at `at` (a key path
/// prefixed to the one inside, or "" for a whole message).
pub fn structure_rejection(
    text: &str,
    at: &str,
    error: json::StructureError,
    limits: &LimitsConfig,
) -> Rejection {
    match error {
        json::StructureError::TooDeep => Rejection::new(
            "too_deep",
            format!(
                "message nests deeper than {} levels (limits.max_json_depth)",
                limits.max_json_depth
            ),
        ),
        json::StructureError::NumberOutOfRange(offset) => {
            let inner = json::path_to(text, offset);
            let field = match (at.is_empty(), inner.is_empty()) {
                (true, _) => inner,
                (false, true) => at.to_string(),
                (false, false) if inner.starts_with('[') => format!("{at}{inner}"),
                (false, false) => format!("{at}.{inner}"),
            };
            let problem = "a number beyond what a 64-bit float holds (about ±1.8e308); no \
                           JSON consumer can read it: send it as a string";
            if field.is_empty() {
                Rejection::new("number_out_of_range", format!("message has {problem}"))
            } else {
                Rejection::field(
                    "number_out_of_range",
                    &field,
                    format!("{field} is {problem}"),
                )
            }
        }
    }
}

/// Validates `message` as a `kind` call and appends its enriched JSON to `out`, on one
/// line (`json::keep_on_one_line`). Returns the messageId (the client's, or a new UUID v4).
pub fn normalize<'a>(
    message: &RawObject<'a>,
    kind: MessageType,
    envelope: &Envelope<'_>,
    out: &mut Vec<u8>,
) -> Result<Normalized<'a>, Rejection> {
    let user_id = id_field(message, "userId")?;
    let anonymous_id = id_field(message, "anonymousId")?;
    let user = crate::message::user_key(anonymous_id.as_deref(), user_id.as_deref());
    match kind {
        MessageType::Alias => {
            require_id(
                id_field(message, "previousId")?,
                "previousId",
                "alias needs previousId",
            )?;
            require_id(user_id, "userId", "alias needs userId")?;
        }
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err(Rejection::field(
                "missing_field",
                "userId",
                "userId or anonymousId must be a non-empty string",
            ));
        }
        _ => {}
    }
    match kind {
        MessageType::Track => {
            require_id(
                string_field(message, "event")?,
                "event",
                "track needs a non-empty event",
            )?;
        }
        MessageType::Group => {
            require_id(
                id_field(message, "groupId")?,
                "groupId",
                "group needs groupId",
            )?;
        }
        MessageType::Page | MessageType::Screen => {
            string_field(message, "name")?;
            string_field(message, "category")?;
        }
        _ => {}
    }
    for key in ["properties", "traits", "context", "integrations"] {
        if message.get(key).is_some_and(|v| !is_object_or_null(v)) {
            return Err(Rejection::field(
                "invalid_field",
                key,
                format!("{key} must be an object"),
            ));
        }
    }

    let message_id = match message.get("messageId").map(|v| (v, scalar(v))) {
        None | Some((_, Scalar::Null)) => None,
        Some((raw, Scalar::Str(id))) if !id.is_empty() => {
            if id.chars().count() > 100 {
                return Err(Rejection::field(
                    "invalid_field",
                    "messageId",
                    "messageId is longer than 100 characters",
                ));
            }
            Some((raw, id))
        }
        Some((_, Scalar::Str(_))) => None,
        Some((_, Scalar::Other)) => {
            return Err(Rejection::field(
                "invalid_field",
                "messageId",
                "messageId must be a string",
            ));
        }
    };

    let client_timestamp = time_field(message, "timestamp")?;
    let original_timestamp = time_field(message, "originalTimestamp")?;
    let sent_at = match time_field(message, "sentAt")? {
        Some(own) => Some(own),
        None => envelope.sent_at,
    };
    let client_time = original_timestamp.or(client_timestamp);
    let event_time = match (client_time, sent_at) {
        (Some((_, original)), Some((_, sent))) => {
            timestamp::corrected(envelope.received_at, sent, original)
        }
        (Some((_, t)), None) => t,
        (None, _) => envelope.received_at,
    };

    // Owned fields first, then the client's, then the merged and time fields.
    let start = out.len();
    out.push(b'{');
    json::write_key(out, "type");
    json::write_str(out, kind.as_str());
    out.push(b',');
    json::write_key(out, "messageId");
    let (message_id, assigned) = match message_id {
        Some((raw, id)) => {
            out.extend_from_slice(raw.get().as_bytes());
            (id, false)
        }
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            json::write_str(out, &id);
            (Cow::Owned(id), true)
        }
    };
    for (key, value) in message.iter() {
        if is_owned_field(key) {
            continue;
        }
        out.push(b',');
        json::write_key(out, key);
        out.extend_from_slice(value.get().as_bytes());
    }
    write_merged(
        out,
        "context",
        message.get("context"),
        envelope.context.as_ref(),
    );
    write_merged(
        out,
        "integrations",
        message.get("integrations"),
        envelope.integrations.as_ref(),
    );
    out.push(b',');
    json::write_key(out, "timestamp");
    timestamp::write_json(out, event_time);
    let mut write_time = |key: &str, json_value: &[u8]| {
        out.push(b',');
        json::write_key(out, key);
        out.extend_from_slice(json_value);
    };
    if let Some((raw, _)) = client_time {
        write_time("originalTimestamp", raw.get().as_bytes());
    }
    if let Some((raw, _)) = sent_at {
        write_time("sentAt", raw.get().as_bytes());
    }
    write_time("receivedAt", &envelope.received_at_json);
    out.push(b'}');
    // The client's values were copied byte for byte, their line breaks too.
    json::keep_on_one_line(out, start);
    Ok(Normalized {
        message_id,
        assigned,
        user,
    })
}

/// What `normalize` decided about a message's identity.
pub struct Normalized<'a> {
    pub message_id: Cow<'a, str>,
    /// True when fanout assigned the messageId (the client sent none).
    pub assigned: bool,
    /// The message's `message::user_key`.
    pub user: u64,
}

impl Normalized<'_> {
    /// What the queue is handed with the message: its tag and its user.
    pub fn stamp(&self, source: &str, accepted_at: DateTime<Utc>) -> Stamp {
        Stamp {
            tag: self.tag(source, accepted_at),
            user: self.user,
        }
    }

    /// The message's queue tag. Only a client's messageId gets a dedupe key: a retry
    /// repeats it, while an assigned UUID never recurs.
    pub fn tag(&self, source: &str, accepted_at: DateTime<Utc>) -> Tag {
        let key = if self.assigned {
            [0; 3]
        } else {
            DedupeKey::of(source, &self.message_id).0
        };
        Tag {
            key,
            accepted_at: accepted_at.timestamp().clamp(0, i64::from(u32::MAX)) as u32,
        }
    }
}

/// Fields fanout writes itself (or drops), so the client's copy is skipped.
fn is_owned_field(key: &str) -> bool {
    matches!(
        key,
        "type"
            | "messageId"
            | "timestamp"
            | "originalTimestamp"
            | "sentAt"
            | "receivedAt"
            | "writeKey"
            | "context"
            | "integrations"
    )
}

/// Writes `key` as the message's own object with the batch-level one's missing keys
/// added (shallow: the message's value wins per key). Absent or null on both sides: omitted.
fn write_merged(
    out: &mut Vec<u8>,
    key: &str,
    own: Option<&RawValue>,
    batch: Option<&RawObject<'_>>,
) {
    let own = own.filter(|v| v.get() != "null");
    let merged_from_batch = match (own, batch) {
        (None, None) => return,
        (Some(v), None) => {
            out.push(b',');
            json::write_key(out, key);
            out.extend_from_slice(v.get().as_bytes());
            return;
        }
        (own, Some(batch)) => (own.and_then(RawObject::parse).unwrap_or_default(), batch),
    };
    let (own, batch) = merged_from_batch;
    out.push(b',');
    json::write_key(out, key);
    let from_batch = batch.iter().filter(|(k, _)| own.get(k).is_none());
    json::write_object(out, own.iter().chain(from_batch).map(|(k, v)| (k, v.get())));
}

/// An id: absent, null and "" all count as missing; any other non-string is an error.
fn id_field<'a>(
    message: &RawObject<'a>,
    key: &'static str,
) -> Result<Option<Cow<'a, str>>, Rejection> {
    match message.get(key).map(scalar) {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.is_empty() => Ok(None),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        Some(Scalar::Other) => Err(Rejection::field(
            "invalid_field",
            key,
            format!("{key} must be a string"),
        )),
    }
}

/// An optional string field: null and absent are fine, other types are not.
fn string_field<'a>(
    message: &RawObject<'a>,
    key: &'static str,
) -> Result<Option<Cow<'a, str>>, Rejection> {
    id_field(message, key)
}

fn require_id(
    value: Option<Cow<'_, str>>,
    key: &'static str,
    message: &'static str,
) -> Result<(), Rejection> {
    match value {
        Some(_) => Ok(()),
        None => Err(Rejection::field("missing_field", key, message)),
    }
}

/// An optional date-time field, with its raw JSON kept for output.
fn time_field<'a>(
    message: &RawObject<'a>,
    key: &'static str,
) -> Result<Option<(&'a RawValue, DateTime<Utc>)>, Rejection> {
    time_value(message.get(key), key)
}

/// Parses a date-time value (absent and null are `None`), naming `key` in errors.
pub fn time_value<'a>(
    raw: Option<&'a RawValue>,
    key: &'static str,
) -> Result<Option<(&'a RawValue, DateTime<Utc>)>, Rejection> {
    let Some(raw) = raw else { return Ok(None) };
    match scalar(raw) {
        Scalar::Null => Ok(None),
        Scalar::Str(s) => match timestamp::parse(&s) {
            Some(t) => Ok(Some((raw, t))),
            None => Err(Rejection::field(
                "invalid_field",
                key,
                format!("{key} is not an ISO 8601 / RFC 3339 date-time"),
            )),
        },
        Scalar::Other => Err(Rejection::field(
            "invalid_field",
            key,
            format!("{key} must be a string"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn run(kind: MessageType, body: &str, envelope: &Envelope<'_>) -> Result<Value, Rejection> {
        let raw: &RawValue = serde_json::from_str(body).unwrap();
        let obj = parse_item(raw, &LimitsConfig::default())?;
        let mut out = Vec::new();
        normalize(&obj, kind, envelope, &mut out)?;
        Ok(serde_json::from_slice(&out).expect("output is valid JSON"))
    }

    fn now() -> DateTime<Utc> {
        timestamp::parse("2026-01-01T00:00:10Z").unwrap()
    }

    #[test]
    fn enriches_a_track() {
        let env = Envelope::new(now());
        let v = run(
            MessageType::Track,
            r#"{"userId":"u1","event":"E","properties":{"a":1},"writeKey":"secret","receivedAt":"1999-01-01T00:00:00Z","_metadata":{"x":1}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(v["type"], "track");
        assert_eq!(v["messageId"].as_str().unwrap().len(), 36);
        assert_eq!(v["receivedAt"], "2026-01-01T00:00:10.000Z");
        assert_eq!(v["timestamp"], "2026-01-01T00:00:10.000Z");
        assert_eq!(v["properties"]["a"], 1);
        assert_eq!(v["_metadata"]["x"], 1);
        assert!(v.get("writeKey").is_none());
    }

    #[test]
    fn corrects_timestamp_with_sent_at_and_keeps_original() {
        let env = Envelope::new(now());
        let v = run(
            MessageType::Track,
            r#"{"anonymousId":"a","event":"E","timestamp":"2026-01-01T01:00:00+00:00","sentAt":"2026-01-01T01:00:05Z"}"#,
            &env,
        )
        .unwrap();
        assert_eq!(v["timestamp"], "2026-01-01T00:00:05.000Z");
        assert_eq!(v["originalTimestamp"], "2026-01-01T01:00:00+00:00");
        assert_eq!(v["sentAt"], "2026-01-01T01:00:05Z");
    }

    #[test]
    fn merges_batch_context_under_the_message() {
        let batch_ctx: &RawValue =
            serde_json::from_str(r#"{"ip":"1.1.1.1","locale":"en"}"#).unwrap();
        let mut env = Envelope::new(now());
        env.context = RawObject::parse(batch_ctx);
        let v = run(
            MessageType::Identify,
            r#"{"userId":"u","context":{"ip":"2.2.2.2"}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(
            v["context"],
            serde_json::json!({"ip":"2.2.2.2","locale":"en"})
        );
        let v = run(MessageType::Identify, r#"{"userId":"u"}"#, &env).unwrap();
        assert_eq!(
            v["context"],
            serde_json::json!({"ip":"1.1.1.1","locale":"en"})
        );
    }

    #[test]
    fn rejects_per_type_problems() {
        let env = Envelope::new(now());
        let cases = [
            (MessageType::Track, r#"{"userId":"u"}"#, "event"),
            (
                MessageType::Track,
                r#"{"userId":null,"anonymousId":"","event":"E"}"#,
                "userId",
            ),
            (MessageType::Track, r#"{"userId":5,"event":"E"}"#, "userId"),
            (MessageType::Group, r#"{"userId":"u"}"#, "groupId"),
            (MessageType::Alias, r#"{"userId":"u"}"#, "previousId"),
            (
                MessageType::Alias,
                r#"{"previousId":"p","anonymousId":"a"}"#,
                "userId",
            ),
            (
                MessageType::Identify,
                r#"{"userId":"u","traits":[1]}"#,
                "traits",
            ),
            (
                MessageType::Identify,
                r#"{"userId":"u","timestamp":"soon"}"#,
                "timestamp",
            ),
            (
                MessageType::Identify,
                r#"{"userId":"u","messageId":7}"#,
                "messageId",
            ),
        ];
        for (kind, body, field) in cases {
            let e = run(kind, body, &env).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e:?}");
        }
        let long_id = format!(r#"{{"userId":"u","messageId":"{}"}}"#, "x".repeat(101));
        assert_eq!(
            run(MessageType::Identify, &long_id, &env)
                .unwrap_err()
                .field
                .as_deref(),
            Some("messageId")
        );
    }

    #[test]
    fn keeps_client_message_id() {
        let env = Envelope::new(now());
        let v = run(
            MessageType::Page,
            r#"{"userId":"u","messageId":"m-1","name":"Home"}"#,
            &env,
        )
        .unwrap();
        assert_eq!(v["messageId"], "m-1");
        assert_eq!(v["type"], "page");
    }
}
