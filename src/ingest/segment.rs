//! The Segment tracking API: single calls (`/v1/track`, `/v1/t`, …) and batches
//! (`/v1/batch`, `/v1/import`, `/v1/b`).
//!
//! A batch is all or nothing, as at Segment: one invalid item refuses the whole request
//! with a 400 naming the item's index and field, and nothing of it is stored. Clients keep
//! the batch and can fix or drop it; a half-accepted batch would be invisible to them.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::message::{self, Envelope};
use super::LimitsConfig;
use super::{batch_shape_error, invalid_json, Rejection};
use crate::json::{check_structure, is_object_or_null, scalar, RawObject, Scalar};
use crate::message::MessageType;
use crate::queue::RecordBatch;

/// A parsed request: its messages (unvalidated) and what they share.
pub struct SegmentRequest<'a> {
    items: Vec<Item<'a>>,
    /// The path's type for single calls; batch items carry their own.
    implied: Option<MessageType>,
    envelope: Envelope<'a>,
    write_key: Option<Cow<'a, str>>,
}

/// One message of a request: its text (for the size and depth limits) and, when it is
/// an object, its top-level fields.
struct Item<'a> {
    text: Cow<'a, str>,
    fields: Option<RawObject<'a>>,
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<BatchItem<'a>>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
    #[serde(borrow, rename = "sentAt")]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow, rename = "writeKey")]
    write_key: Option<&'a RawValue>,
}

/// Parses a batch body: `{"batch":[…], "context"?, "integrations"?, "sentAt"?, "writeKey"?}`.
pub fn parse_batch<'a>(
    body: &'a [u8],
    limits: &LimitsConfig,
    received_at: DateTime<Utc>,
) -> Result<SegmentRequest<'a>, Rejection> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Rejection::new("invalid_json", format!("body is not valid UTF-8: {e}")))?;
    let body: BatchBody<'a> =
        serde_json::from_str(text).map_err(|e| batch_shape_error(text.as_bytes(), e))?;
    let items: Vec<Item<'a>> = body
        .batch
        .into_iter()
        .map(|item| item.locate(text))
        .collect();
    if items.len() > limits.max_batch_messages {
        return Err(Rejection::field(
            "batch_too_large",
            "batch",
            format!(
                "batch has {} messages; the limit is {} (limits.max_batch_messages)",
                items.len(),
                limits.max_batch_messages
            ),
        ));
    }
    let mut envelope = Envelope::new(received_at);
    envelope.sent_at = message::time_value(body.sent_at, "sentAt")?;
    envelope.context = batch_object(body.context, "context", limits)?;
    envelope.integrations = batch_object(body.integrations, "integrations", limits)?;
    let write_key = match body.write_key.map(scalar) {
        Some(Scalar::Str(k)) if !k.is_empty() => Some(k),
        _ => None,
    };
    Ok(SegmentRequest {
        items,
        implied: None,
        envelope,
        write_key,
    })
}

/// Parses a single call's body; its type comes from the path.
pub fn parse_single<'a>(
    body: &'a [u8],
    kind: MessageType,
    received_at: DateTime<Utc>,
) -> Result<SegmentRequest<'a>, Rejection> {
    let raw: &RawValue = serde_json::from_slice(body).map_err(invalid_json)?;
    if !raw.get().starts_with('{') {
        return Err(Rejection::new(
            "invalid_message",
            "body must be a JSON object",
        ));
    }
    let fields = RawObject::parse(raw);
    // Only the key is needed here; full validation happens in `encode`.
    let write_key = fields
        .as_ref()
        .and_then(|o| match o.get("writeKey").map(scalar) {
            Some(Scalar::Str(k)) if !k.is_empty() => Some(k),
            _ => None,
        });
    Ok(SegmentRequest {
        items: vec![Item {
            text: Cow::Borrowed(raw.get()),
            fields,
        }],
        implied: Some(kind),
        envelope: Envelope::new(received_at),
        write_key,
    })
}

impl<'a> SegmentRequest<'a> {
    /// The write key carried in the body, for clients that send no Authorization header.
    pub fn write_key(&self) -> Option<&str> {
        self.write_key.as_deref()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Validates every message and frames them for the queue; the first invalid one
    /// refuses the request.
    pub fn encode(&self, source: &str, limits: &LimitsConfig) -> Result<RecordBatch, Rejection> {
        let size: usize = self.items.iter().map(|i| i.text.len() + 160).sum();
        let mut records = RecordBatch::with_capacity(size);
        let batch = self.implied.is_none();
        for (index, item) in self.items.iter().enumerate() {
            let locate = |r: Rejection| if batch { r.at(index) } else { r };
            let message =
                message::check_object(&item.text, item.fields.as_ref(), limits).map_err(locate)?;
            let kind = match self.implied {
                Some(kind) => kind,
                None => item_type(message).map_err(locate)?,
            };
            records
                .push_with(source, kind, |out| {
                    let start = out.len();
                    let stamp = message::normalize(message, kind, &self.envelope, out)?
                        .stamp(source, self.envelope.received_at);
                    enriched_within_limit(out.len() - start, limits)?;
                    Ok(stamp)
                })
                .map_err(locate)?;
            // Merged batch-level fields multiply with the item count: bound the whole.
            let stored = records.bytes().len();
            if stored > MAX_EXPANSION * limits.max_request_bytes {
                return Err(Rejection::field(
                    "batch_too_large",
                    "context",
                    format!(
                        "batch expands to over {stored} bytes once its batch-level context and \
                         integrations are merged into each message; the limit is {} \
                         ({MAX_EXPANSION} × limits.max_request_bytes)",
                        MAX_EXPANSION * limits.max_request_bytes
                    ),
                ));
            }
        }
        Ok(records)
    }
}

/// What fanout's own fields (messageId, timestamps, type) may add to a message.
const ENRICHMENT_BYTES: usize = 512;
/// How much larger than its body a request may grow once batch-level fields are merged.
const MAX_EXPANSION: usize = 4;

/// The message limit applies to the message as stored, with the batch's context merged in:
/// otherwise one small request with a large batch-level context becomes gigabytes.
fn enriched_within_limit(len: usize, limits: &LimitsConfig) -> Result<(), Rejection> {
    if len <= limits.max_message_bytes + ENRICHMENT_BYTES {
        return Ok(());
    }
    Err(Rejection::new(
        "message_too_large",
        format!(
            "message is {len} bytes with the batch-level context and integrations merged in; \
             the limit is {} bytes (limits.max_message_bytes)",
            limits.max_message_bytes
        ),
    ))
}

/// A batch item's own `type`.
fn item_type(message: &RawObject<'_>) -> Result<MessageType, Rejection> {
    match message.get("type").map(scalar) {
        Some(Scalar::Str(t)) => MessageType::parse(&t).ok_or_else(|| {
            Rejection::field(
                "invalid_field",
                "type",
                format!("type `{t}` is not one of identify, track, page, screen, group, alias"),
            )
        }),
        None | Some(Scalar::Null) => Err(Rejection::field(
            "missing_field",
            "type",
            "type is required",
        )),
        Some(Scalar::Other) => Err(Rejection::field(
            "invalid_field",
            "type",
            "type must be a string",
        )),
    }
}

/// A batch-level `context` or `integrations`: an object, held to the same structure
/// rules as the messages it is merged into (one level down in each of them).
fn batch_object<'a>(
    raw: Option<&'a RawValue>,
    key: &str,
    limits: &LimitsConfig,
) -> Result<Option<RawObject<'a>>, Rejection> {
    match raw {
        Some(v) if !is_object_or_null(v) => Err(Rejection::field(
            "invalid_field",
            key,
            format!("{key} must be an object"),
        )),
        Some(v) => {
            check_structure(v.get(), limits.max_json_depth.saturating_sub(1))
                .map_err(|e| message::structure_rejection(v.get(), key, e, limits))?;
            Ok(RawObject::parse(v))
        }
        None => Ok(None),
    }
}

/// A batch item as read in the batch's one pass: an object's fields, or a note that it
/// is something else (refused later, with its index). Reading each item first as a
/// `RawValue` and then again for its fields scanned every byte twice.
enum BatchItem<'a> {
    Object(RawObject<'a>),
    Other,
}

impl<'a> BatchItem<'a> {
    /// Adds the item's text, found in `body` around its fields (which borrow from it).
    fn locate(self, body: &'a str) -> Item<'a> {
        match self {
            BatchItem::Object(fields) => Item {
                text: match object_text(body, &fields) {
                    Some(text) => Cow::Borrowed(text),
                    None => Cow::Owned(rebuilt_text(&fields)),
                },
                fields: Some(fields),
            },
            BatchItem::Other => Item {
                text: Cow::Borrowed(""),
                fields: None,
            },
        }
    }
}

/// The text of the object whose fields are `fields`, in `body`: from the `{` before its
/// first key to the `}` after its last value. Keys and values borrow from `body`, so their
/// addresses say where they are. `None` when that cannot be told: an empty object, or a
/// first key with escapes (decoded into a copy) whose value a repeated key replaced.
fn object_text<'a>(body: &'a str, fields: &RawObject<'a>) -> Option<&'a str> {
    let bytes = body.as_bytes();
    let base = body.as_ptr() as usize;
    let within = |p: usize| (base..base + bytes.len()).contains(&p);
    let offset = |value: &RawValue| value.get().as_ptr() as usize - base;
    let skip_back = |mut i: usize| {
        while i > 0 && bytes[i - 1].is_ascii_whitespace() {
            i -= 1;
        }
        i
    };
    let (first_key, first_value) = fields.iter().next()?;
    let last = fields.iter().map(|(_, v)| v).max_by_key(|v| offset(v))?;
    let opening_quote = if within(first_key.as_ptr() as usize) {
        first_key.as_ptr() as usize - base - 1
    } else if fields.iter().all(|(_, v)| offset(v) >= offset(first_value)) {
        // Back from the first value over `:` and the key's closing quote to the first
        // `"` that is not escaped.
        let mut i = skip_back(skip_back(offset(first_value)) - 1) - 1;
        loop {
            i = i.checked_sub(1)?;
            let escapes = bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if bytes[i] == b'"' && escapes % 2 == 0 {
                break i;
            }
        }
    } else {
        return None;
    };
    let start = skip_back(opening_quote).checked_sub(1)?;
    let mut end = offset(last) + last.get().len();
    while bytes.get(end)?.is_ascii_whitespace() {
        end += 1;
    }
    (bytes[start] == b'{' && bytes[end] == b'}').then(|| &body[start..=end])
}

/// An equivalent text for an object `object_text` cannot place (rare): same fields, so
/// the size and depth limits see what will be stored.
fn rebuilt_text(fields: &RawObject<'_>) -> String {
    let mut text = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&serde_json::to_string(key).expect("a string serializes"));
        text.push(':');
        text.push_str(value.get());
    }
    text.push('}');
    text
}

impl<'de: 'a, 'a> Deserialize<'de> for BatchItem<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = BatchItem<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
                RawObject::from_map(map).map(BatchItem::Object)
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(BatchItem::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(BatchItem::Other)
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the system clock freely
mod tests {
    use super::*;
    use crate::queue::record::{read_record, ReadOutcome};
    use serde_json::Value;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn decode(batch: &RecordBatch) -> Vec<Value> {
        let mut r = batch.bytes();
        let mut out = Vec::new();
        while let ReadOutcome::Record { json, .. } = read_record(&mut r).unwrap() {
            out.push(serde_json::from_slice(&json).unwrap());
        }
        out
    }

    #[test]
    fn batch_applies_shared_fields_and_reads_write_key() {
        let body = br#"{"batch":[{"type":"track","userId":"u","event":"E"},{"type":"identify","anonymousId":"a","context":{"ip":"x"}}],
            "context":{"library":{"name":"l"}},"integrations":{"All":false},"sentAt":"2026-01-01T00:00:00Z","writeKey":"wk"}"#;
        let limits = LimitsConfig::default();
        let req = parse_batch(body, &limits, now()).unwrap();
        assert_eq!(req.write_key(), Some("wk"));
        let msgs = decode(&req.encode("web", &limits).unwrap());
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["context"]["library"]["name"], "l");
        assert_eq!(msgs[1]["context"]["ip"], "x");
        assert_eq!(msgs[1]["context"]["library"]["name"], "l");
        assert_eq!(msgs[0]["integrations"]["All"], false);
        assert_eq!(msgs[0]["sentAt"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn one_bad_item_refuses_the_batch_with_its_index() {
        let body = br#"{"batch":[{"type":"track","userId":"u","event":"E"},{"type":"track","userId":"u"}]}"#;
        let limits = LimitsConfig::default();
        let e = parse_batch(body, &limits, now())
            .unwrap()
            .encode("web", &limits)
            .unwrap_err();
        assert_eq!((e.index, e.field.as_deref()), (Some(1), Some("event")));
    }

    #[test]
    fn batch_shape_errors() {
        let limits = LimitsConfig {
            max_batch_messages: 2,
            ..LimitsConfig::default()
        };
        let cases: [(&[u8], &str); 6] = [
            (b"{\"batch\":", "invalid_json"),
            (b"[1,2]", "invalid_body"),
            (b"{}", "missing_field"),
            (b"{\"batch\":{}}", "invalid_field"),
            (b"{\"batch\":[1,2,3]}", "batch_too_large"),
            (b"{\"batch\":[],\"context\":5}", "invalid_field"),
        ];
        for (body, code) in cases {
            let e = parse_batch(body, &limits, now()).err().unwrap();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(body));
        }
        let e = parse_batch(b"{\"batch\":[1]}", &limits, now())
            .unwrap()
            .encode("s", &limits)
            .unwrap_err();
        assert_eq!((e.code, e.index), ("invalid_message", Some(0)));
        let e = parse_batch(
            b"{\"batch\":[{\"type\":\"fly\",\"userId\":\"u\"}]}",
            &limits,
            now(),
        )
        .unwrap()
        .encode("s", &limits)
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("type"));
    }

    #[test]
    fn each_batch_item_keeps_its_own_text() {
        let items = [
            r#"{"type":"track","event":"E"}"#,
            "{ \n \"type\" : \"track\" , \"p\" : { \"}\" : \"{\\\"\" } \n }",
            r#"{"\u0074ype":"track","x":1}"#,
            r#"{"a":1,"b":"}","a":2}"#,
            r#"{"\u0061":1,"b":2,"\u0061":3}"#,
            "{}",
        ];
        let body = format!("{{\"batch\":[ {} ]}}", items.join(" ,\n"));
        let parsed: BatchBody<'_> = serde_json::from_str(&body).unwrap();
        let texts: Vec<String> = parsed
            .batch
            .into_iter()
            .map(|item| item.locate(&body).text.into_owned())
            .collect();
        assert_eq!(texts[..4], items[..4]);
        // Escaped first key, replaced by a repeat: an equivalent text, same size class.
        assert_eq!(texts[4], r#"{"a":3,"b":2}"#);
        assert_eq!(texts[5], "{}");
    }

    #[test]
    fn single_call_takes_type_from_path() {
        let limits = LimitsConfig::default();
        let req = parse_single(
            br#"{"type":"identify","userId":"u","event":"E","writeKey":"k"}"#,
            MessageType::Track,
            now(),
        )
        .unwrap();
        assert_eq!(req.write_key(), Some("k"));
        let msgs = decode(&req.encode("web", &limits).unwrap());
        assert_eq!(msgs[0]["type"], "track");
        assert!(msgs[0].get("writeKey").is_none());
    }

    #[test]
    fn oversized_and_deep_messages_are_refused() {
        let limits = LimitsConfig {
            max_message_bytes: 100,
            max_json_depth: 5,
            ..LimitsConfig::default()
        };
        let big = format!(
            r#"{{"userId":"u","event":"E","properties":{{"p":"{}"}}}}"#,
            "x".repeat(100)
        );
        let e = parse_single(big.as_bytes(), MessageType::Track, now())
            .unwrap()
            .encode("s", &limits)
            .unwrap_err();
        assert_eq!(e.code, "message_too_large");
        let deep = r#"{"userId":"u","event":"E","properties":{"a":[[[[[1]]]]]}}"#;
        let e = parse_single(deep.as_bytes(), MessageType::Track, now())
            .unwrap()
            .encode("s", &limits)
            .unwrap_err();
        assert_eq!(e.code, "too_deep");
    }

    mod properties {
        use super::*;
        use crate::json::testgen;
        use proptest::prelude::*;

        /// A batch body around `items`, with whitespace and shared fields around them.
        fn batch(items: &[String], space: &str, shared: bool) -> String {
            let shared = if shared {
                r#","context":{"library":{"name":"p"}},"sentAt":"2026-01-01T00:00:00Z""#
            } else {
                ""
            };
            format!(
                "{{{space}\"batch\"{space}:{space}[{space}{}{space}]{shared}}}",
                items.join(&format!("{space},{space}"))
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            /// The batch reader finds each item's text by pointer arithmetic on the body;
            /// it must be exactly serde_json's raw text of that item, or (when it cannot be
            /// placed) an equal document.
            #[test]
            fn each_item_text_is_serde_jsons(
                items in prop::collection::vec(testgen::object(false), 1..6),
                space in prop::sample::select(vec!["", " ", "\n\t"]),
                shared in any::<bool>(),
            ) {
                let body = batch(&items, space, shared);
                let request = parse_batch(body.as_bytes(), &LimitsConfig::default(), Utc::now())
                    .expect("a batch of objects parses");
                #[derive(Deserialize)]
                struct Raw<'a> {
                    #[serde(borrow)]
                    batch: Vec<&'a RawValue>,
                }
                let raw: Raw<'_> = serde_json::from_str(&body).unwrap();
                prop_assert_eq!(request.items.len(), raw.batch.len());
                for (item, expected) in request.items.iter().zip(&raw.batch) {
                    match &item.text {
                        Cow::Borrowed(text) => prop_assert_eq!(*text, expected.get()),
                        Cow::Owned(text) => {
                            let a: Value = serde_json::from_str(text).unwrap();
                            let b: Value = serde_json::from_str(expected.get()).unwrap();
                            prop_assert_eq!(a, b);
                        }
                    }
                }
            }
        }
    }
}
