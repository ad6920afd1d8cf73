//! Reading what a message teaches of an anonymousId, and filling an anonymous-only
//! message with what is known. Top-level fields keep their order and raw bytes; only
//! `userId` and `context.traits` are written anew.

use serde_json::value::RawValue;

use crate::json::{scalar, write_object, write_str, RawObject, Scalar};
use crate::message::MessageType;

/// What is known of one anonymousId.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
}

impl Known {
    pub fn is_empty(&self) -> bool {
        self.user_id.is_none() && self.email.is_none() && self.phone.is_none()
    }

    /// `self` with what `newer` says on top. Returns whether anything changed.
    pub fn merge(&mut self, newer: Known) -> bool {
        let mut changed = false;
        for (slot, value) in [
            (&mut self.user_id, newer.user_id),
            (&mut self.email, newer.email),
            (&mut self.phone, newer.phone),
        ] {
            if value.is_some() && *slot != value {
                *slot = value;
                changed = true;
            }
        }
        changed
    }
}

/// One identify or alias: the anonymousId and what it teaches of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lesson {
    pub anonymous_id: String,
    pub known: Known,
}

/// Which of the three fields a destination lets enrichment write: not one its
/// `drop_fields`, `rename` or `hash_fields` names, which enrichment would undo. A path
/// ending in the same name counts too: hashing `traits.email` means no raw email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub user_id: bool,
    pub email: bool,
    pub phone: bool,
}

impl Fill {
    pub const ALL: Fill = Fill {
        user_id: true,
        email: true,
        phone: true,
    };

    /// All three, less those at, under or named like one of `paths` (dotted).
    pub fn except<'p>(paths: impl IntoIterator<Item = &'p str>) -> Fill {
        let mut fill = Fill::ALL;
        for path in paths {
            let covers = |field: &str| {
                let name = field.rsplit('.').next().unwrap_or(field);
                field == path
                    || field.starts_with(&format!("{path}."))
                    || path.starts_with(&format!("{field}."))
                    || path.rsplit('.').next() == Some(name)
            };
            fill.user_id &= !covers("userId");
            fill.email &= !covers("context.traits.email");
            fill.phone &= !covers("context.traits.phone");
        }
        fill
    }
}

fn text(raw: Option<&RawValue>) -> Option<String> {
    match raw.map(scalar) {
        Some(Scalar::Str(s)) if !s.trim().is_empty() => Some(s.into_owned()),
        _ => None,
    }
}

fn object(raw: Option<&RawValue>) -> Option<RawObject<'_>> {
    raw.and_then(RawObject::parse)
}

fn parse(json: &[u8]) -> Option<RawObject<'_>> {
    let text = std::str::from_utf8(json).ok()?;
    serde_json::from_str::<&RawValue>(text)
        .ok()
        .and_then(RawObject::parse)
}

/// What an identify or alias (of type `kind`, as stored) teaches; `None` for other
/// types and for messages without an anonymousId or anything to learn.
pub fn lesson(kind: MessageType, json: &[u8]) -> Option<Lesson> {
    let message = parse(json)?;
    let (anonymous_id, known) = match kind {
        MessageType::Identify => {
            let traits = object(message.get("traits"));
            let context_traits =
                object(message.get("context")).and_then(|context| object(context.get("traits")));
            let trait_of = |name: &str| {
                text(traits.as_ref().and_then(|t| t.get(name)))
                    .or_else(|| text(context_traits.as_ref().and_then(|t| t.get(name))))
            };
            let known = Known {
                user_id: text(message.get("userId")),
                email: trait_of("email"),
                phone: trait_of("phone"),
            };
            (text(message.get("anonymousId")), known)
        }
        // The id used before (usually the anonymousId) becomes the userId.
        MessageType::Alias => {
            let before = text(message.get("previousId")).or(text(message.get("anonymousId")));
            let known = Known {
                user_id: text(message.get("userId")),
                ..Known::default()
            };
            (before, known)
        }
        _ => return None,
    };
    let anonymous_id = anonymous_id?;
    if known.is_empty() || known.user_id.as_deref() == Some(&anonymous_id) {
        return None;
    }
    Some(Lesson {
        anonymous_id,
        known,
    })
}

/// The anonymousId of a message that carries no userId: the ones enrichment fills.
pub fn anonymous_only(json: &[u8]) -> Option<String> {
    let message = parse(json)?;
    if text(message.get("userId")).is_some() {
        return None;
    }
    text(message.get("anonymousId"))
}

/// The message with what is `known` filled where it is absent (and `fill` allows):
/// `userId`, `context.traits.email`, `context.traits.phone`. `None` when nothing is
/// added. An email or phone the message already has (in `traits` or `context.traits`)
/// is kept.
pub fn enrich(json: &[u8], known: &Known, fill: Fill) -> Option<Vec<u8>> {
    let message = parse(json)?;
    let context = object(message.get("context"));
    let context_traits = context.as_ref().and_then(|c| object(c.get("traits")));
    let traits = object(message.get("traits"));
    let has = |name: &str| {
        text(context_traits.as_ref().and_then(|t| t.get(name))).is_some()
            || text(traits.as_ref().and_then(|t| t.get(name))).is_some()
    };
    let encoded = |value: &str| {
        let mut out = Vec::new();
        write_str(&mut out, value);
        String::from_utf8(out).expect("JSON text is UTF-8")
    };
    let mut trait_adds = Vec::new();
    if let (true, Some(email), false) = (fill.email, &known.email, has("email")) {
        trait_adds.push(("email", encoded(email)));
    }
    if let (true, Some(phone), false) = (fill.phone, &known.phone, has("phone")) {
        trait_adds.push(("phone", encoded(phone)));
    }
    let mut top_adds = Vec::new();
    if let (true, Some(user_id)) = (fill.user_id, &known.user_id) {
        if text(message.get("userId")).is_none() {
            top_adds.push(("userId", encoded(user_id)));
        }
    }
    if trait_adds.is_empty() && top_adds.is_empty() {
        return None;
    }
    if !trait_adds.is_empty() {
        let traits = with_fields(context_traits.as_ref(), &trait_adds);
        let context = with_fields(context.as_ref(), &[("traits", traits)]);
        top_adds.push(("context", context));
    }
    let mut out = Vec::with_capacity(json.len() + 128);
    let out_text = with_fields(Some(&message), &top_adds);
    out.extend_from_slice(out_text.as_bytes());
    crate::json::keep_on_one_line(&mut out, 0);
    Some(out)
}

/// `object`'s fields in order, with `adds` (encoded JSON) replacing fields of the same
/// name or appended.
fn with_fields(object: Option<&RawObject<'_>>, adds: &[(&str, String)]) -> String {
    let mut fields: Vec<(&str, &str)> = object
        .map(|o| o.iter().map(|(k, v)| (k, v.get())).collect())
        .unwrap_or_default();
    for (key, value) in adds {
        match fields.iter_mut().find(|(k, _)| k == key) {
            Some(field) => field.1 = value,
            None => fields.push((key, value)),
        }
    }
    let mut out = Vec::new();
    write_object(&mut out, fields);
    String::from_utf8(out).expect("JSON text is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_teaches_user_email_and_phone() {
        let json = br#"{"type":"identify","anonymousId":"a1","userId":"u1","traits":{"email":"x@example.com"},"context":{"traits":{"phone":"+15005550006"}}}"#;
        let taught = lesson(MessageType::Identify, json).unwrap();
        assert_eq!(taught.anonymous_id, "a1");
        assert_eq!(
            taught.known,
            Known {
                user_id: Some("u1".into()),
                email: Some("x@example.com".into()),
                phone: Some("+15005550006".into()),
            }
        );
        let alias = br#"{"type":"alias","previousId":"a2","userId":"u2"}"#;
        assert_eq!(
            lesson(MessageType::Alias, alias).unwrap().known.user_id,
            Some("u2".into())
        );
        let track = br#"{"type":"track","anonymousId":"a1","userId":"u1"}"#;
        assert_eq!(lesson(MessageType::Track, track), None);
        let nothing = br#"{"type":"identify","anonymousId":"a1","traits":{}}"#;
        assert_eq!(lesson(MessageType::Identify, nothing), None);
    }

    #[test]
    fn enrich_fills_only_what_is_absent_and_keeps_order() {
        let known = Known {
            user_id: Some("u1".into()),
            email: Some("x@example.com".into()),
            phone: Some("+15005550006".into()),
        };
        let json = br#"{"type":"track","event":"Viewed","anonymousId":"a1","context":{"ip":"1.2.3.4","traits":{"phone":"+15005550000"}}}"#;
        let out = enrich(json, &known, Fill::ALL).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"type":"track","event":"Viewed","anonymousId":"a1","context":{"ip":"1.2.3.4","traits":{"phone":"+15005550000","email":"x@example.com"}},"userId":"u1"}"#
        );
        let with_user = br#"{"type":"track","anonymousId":"a1","userId":"u9"}"#;
        assert_eq!(anonymous_only(with_user), None);
        assert_eq!(anonymous_only(json).as_deref(), Some("a1"));
    }

    #[test]
    fn a_route_edit_keeps_enrichment_off_its_field() {
        let fill = Fill::except(["context.traits", "userId"]);
        assert_eq!(
            fill,
            Fill {
                user_id: false,
                email: false,
                phone: false
            }
        );
        let by_name = Fill::except(["traits.phone", "context.ip"]);
        assert!(by_name.user_id && by_name.email && !by_name.phone);
        let fill = Fill::except(["context.traits.email"]);
        assert!(fill.user_id && !fill.email && fill.phone);
        let known = Known {
            email: Some("x@example.com".into()),
            ..Known::default()
        };
        let json = br#"{"type":"track","anonymousId":"a1"}"#;
        assert_eq!(enrich(json, &known, fill), None);
    }
}
