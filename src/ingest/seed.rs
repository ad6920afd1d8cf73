//! The two non-Segment APIs fanout also serves (see `../shared/seeds/`):
//! `POST /event/batch` (per-item report, bad items refused one by one) and
//! `POST /api/v1/event` (one event for a `personId`). Both take only identified
//! `track` and `identify` events; they are stored as ordinary Segment messages.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::message::{self, Envelope};
use super::LimitsConfig;
use super::{batch_shape_error, invalid_json, Rejection};
use crate::json::{scalar, RawObject, Scalar};
use crate::message::MessageType;
use crate::queue::RecordBatch;

/// One item's line in the `/event/batch` answer.
#[derive(Debug, Serialize, PartialEq)]
pub struct ItemReport {
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
    pub success: bool,
    pub processed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Index of the item's record in the request's `RecordBatch`, when it has one.
    #[serde(skip)]
    pub record: Option<usize>,
    /// The item's type, when it could be told (refused items are counted by type).
    #[serde(skip)]
    pub kind: Option<MessageType>,
}

#[derive(Deserialize)]
struct EventBatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
}

/// Parses `/event/batch`: a malformed body (not JSON, no `batch` array) is refused whole.
pub fn parse_event_batch<'a>(
    body: &'a [u8],
    limits: &LimitsConfig,
) -> Result<Vec<&'a RawValue>, Rejection> {
    let items = serde_json::from_slice::<EventBatchBody<'a>>(body)
        .map_err(|e| batch_shape_error(body, e))?
        .batch;
    if items.len() > limits.max_batch_messages {
        return Err(Rejection::field(
            "batch_too_large",
            "batch",
            format!(
                "batch has {} events; the limit is {}",
                items.len(),
                limits.max_batch_messages
            ),
        ));
    }
    Ok(items)
}

/// Validates each item on its own: good ones are framed into `records`, bad ones are
/// reported and skipped. The report has one entry per item, in order.
pub fn encode_event_batch(
    items: &[&RawValue],
    source: &str,
    received_at: DateTime<Utc>,
    limits: &LimitsConfig,
    records: &mut RecordBatch,
) -> Vec<ItemReport> {
    let envelope = Envelope::new(received_at);
    items
        .iter()
        .map(|raw| {
            let client_id = || RawObject::parse(raw).and_then(|o| client_message_id(&o));
            let mut item_kind = None;
            let result = message::parse_item(raw, limits).and_then(|m| {
                let kind = track_or_identify(&m, false)?;
                item_kind = Some(kind);
                if !matches!(m.get("userId").map(scalar), Some(Scalar::Str(s)) if !s.is_empty()) {
                    return Err(Rejection::field(
                        "missing_field",
                        "userId",
                        "userId is required",
                    ));
                }
                let mut id = None;
                records.push_with(source, kind, |out| {
                    let normalized = message::normalize(&m, kind, &envelope, out)?;
                    let stamp = normalized.stamp(source, received_at);
                    id = Some(normalized.message_id.into_owned());
                    Ok(stamp)
                })?;
                Ok((id, records.len() - 1))
            });
            match result {
                Ok((id, record)) => ItemReport {
                    message_id: id,
                    success: true,
                    processed: true,
                    error: None,
                    record: Some(record),
                    kind: item_kind,
                },
                Err(e) => ItemReport {
                    message_id: client_id(),
                    success: false,
                    processed: false,
                    error: Some(e.message),
                    record: None,
                    kind: item_kind,
                },
            }
        })
        .collect()
}

/// `/api/v1/event`: one event; `personId` is the user. Returns the messageId.
pub fn encode_person_event(
    body: &[u8],
    source: &str,
    received_at: DateTime<Utc>,
    limits: &LimitsConfig,
    records: &mut RecordBatch,
) -> Result<String, Rejection> {
    let raw: &RawValue = serde_json::from_slice(body).map_err(invalid_json)?;
    let mut event = message::parse_item(raw, limits)?;
    let person = event
        .remove("personId")
        .filter(|p| matches!(scalar(p), Scalar::Str(s) if !s.is_empty()))
        .ok_or_else(|| Rejection::field("missing_field", "personId", "personId is required"))?;
    event.set("userId", person);
    let kind = track_or_identify(&event, true)?;
    let mut id = String::new();
    records.push_with(source, kind, |out| {
        let normalized = message::normalize(&event, kind, &Envelope::new(received_at), out)?;
        let stamp = normalized.stamp(source, received_at);
        id = normalized.message_id.into_owned();
        Ok::<_, Rejection>(stamp)
    })?;
    Ok(id)
}

/// The item's type: its own `type` when given (only track and identify exist here);
/// for `/api/v1/event` (`infer` true) a missing type is track with an `event`,
/// identify with `traits`.
fn track_or_identify(m: &RawObject<'_>, infer: bool) -> Result<MessageType, Rejection> {
    let unsupported =
        || Rejection::field("invalid_field", "type", "type must be track or identify");
    match (m.get("type").map(scalar), infer) {
        (Some(Scalar::Str(t)), _) => match MessageType::parse(&t) {
            Some(k @ (MessageType::Track | MessageType::Identify)) => Ok(k),
            _ => Err(unsupported()),
        },
        (None | Some(Scalar::Null), true) => {
            let present = |k| m.get(k).is_some_and(|v| v.get() != "null");
            if present("event") {
                Ok(MessageType::Track)
            } else if present("traits") {
                Ok(MessageType::Identify)
            } else {
                Err(Rejection::field(
                    "missing_field",
                    "event",
                    "event (for track) or traits (for identify) is required",
                ))
            }
        }
        (None | Some(Scalar::Null), false) => Err(Rejection::field(
            "missing_field",
            "type",
            "type is required",
        )),
        (Some(Scalar::Other), _) => Err(unsupported()),
    }
}

fn client_message_id(m: &RawObject<'_>) -> Option<String> {
    match m.get("messageId").map(scalar) {
        Some(Scalar::Str(Cow::Borrowed(s))) => Some(s.to_string()),
        Some(Scalar::Str(Cow::Owned(s))) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the system clock freely
mod tests {
    use super::*;

    #[test]
    fn event_batch_reports_each_item() {
        let limits = LimitsConfig::default();
        let body = br#"{"batch":[
            {"type":"track","event":"User Registered","userId":"u1","messageId":"m1"},
            {"type":"identify","userId":"u1","traits":{"a":1}},
            {"type":"track","event":"E","messageId":"m3"},
            {"type":"page","userId":"u1","name":"x"}]}"#;
        let items = parse_event_batch(body, &limits).unwrap();
        let mut records = RecordBatch::with_capacity(0);
        let report = encode_event_batch(&items, "s", Utc::now(), &limits, &mut records);
        assert_eq!(records.len(), 2);
        assert_eq!(
            report[0],
            ItemReport {
                message_id: Some("m1".into()),
                success: true,
                processed: true,
                error: None,
                record: Some(0),
                kind: Some(MessageType::Track),
            }
        );
        assert!(report[1].success && report[1].message_id.as_ref().unwrap().len() == 36);
        assert_eq!(report[2].message_id.as_deref(), Some("m3"));
        assert_eq!(report[2].error.as_deref(), Some("userId is required"));
        assert_eq!(
            report[3].error.as_deref(),
            Some("type must be track or identify")
        );
    }

    #[test]
    fn event_batch_refuses_malformed_bodies() {
        let limits = LimitsConfig::default();
        for body in [&b"nope"[..], b"{}", b"{\"batch\":3}", b"[]"] {
            assert!(parse_event_batch(body, &limits).is_err());
        }
    }

    #[test]
    fn person_event_maps_person_to_user_and_infers_type() {
        let limits = LimitsConfig::default();
        let mut records = RecordBatch::with_capacity(0);
        let id = encode_person_event(
            br#"{"personId":"p1","messageId":"m9","traits":{"plan":"pro"}}"#,
            "s",
            Utc::now(),
            &limits,
            &mut records,
        )
        .unwrap();
        assert_eq!(id, "m9");
        let e = encode_person_event(br#"{"event":"E"}"#, "s", Utc::now(), &limits, &mut records)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("personId"));
        let e = encode_person_event(
            br#"{"personId":"p"}"#,
            "s",
            Utc::now(),
            &limits,
            &mut records,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("event"));
        assert_eq!(records.len(), 1);
    }
}
