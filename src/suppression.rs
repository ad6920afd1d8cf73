//! Which subjects are suppressed, as an immutable snapshot swapped whole when a
//! regulation changes: ingest and delivery read it without a lock, and with no
//! regulations the check is one atomic load and an emptiness test.
//!
//! Imports only the leaves (`json`): ingest (`http`) and `delivery` both ask it.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::value::RawValue;

use crate::json::{scalar, RawObject, Scalar};

/// The suppressed subjects: userIds, anonymousIds and emails (lowercased).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub user_ids: HashSet<String>,
    pub anonymous_ids: HashSet<String>,
    pub emails: HashSet<String>,
}

impl Suppressed {
    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty() && self.anonymous_ids.is_empty() && self.emails.is_empty()
    }

    /// Whether the message (one JSON object) is about a suppressed subject: its
    /// `userId`, `anonymousId`, `traits.email` or `context.traits.email`.
    pub fn matches(&self, json: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let Some(message) = parse(json) else {
            return false;
        };
        let listed = |set: &HashSet<String>, raw: Option<&RawValue>| {
            !set.is_empty() && text(raw).is_some_and(|id| set.contains(id.as_ref()))
        };
        if listed(&self.user_ids, message.get("userId"))
            || listed(&self.anonymous_ids, message.get("anonymousId"))
        {
            return true;
        }
        if self.emails.is_empty() {
            return false;
        }
        let email_in = |raw: Option<&RawValue>| {
            let traits = raw.and_then(RawObject::parse);
            let email = text(traits.as_ref().and_then(|t| t.get("email")));
            email.is_some_and(|e| self.emails.contains(&normal_email(&e)))
        };
        let context = message.get("context").and_then(RawObject::parse);
        email_in(message.get("traits")) || email_in(context.as_ref().and_then(|c| c.get("traits")))
    }
}

/// How emails are compared: case and surrounding spaces do not count.
pub fn normal_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// An id as text: a string, or a number as written (Segment takes numeric userIds).
fn text(raw: Option<&RawValue>) -> Option<std::borrow::Cow<'_, str>> {
    let raw = raw?;
    match scalar(raw) {
        Scalar::Str(s) if !s.is_empty() => Some(s),
        Scalar::Other
            if raw
                .get()
                .starts_with(|c: char| c == '-' || c.is_ascii_digit()) =>
        {
            Some(raw.get().into())
        }
        _ => None,
    }
}

fn parse(json: &[u8]) -> Option<RawObject<'_>> {
    let text = std::str::from_utf8(json).ok()?;
    serde_json::from_str::<&RawValue>(text)
        .ok()
        .and_then(RawObject::parse)
}

/// The current snapshot, shared by ingest, delivery and the regulations store (which
/// replaces it). Cheap to clone.
#[derive(Clone, Default)]
pub struct Suppression(Arc<ArcSwap<Suppressed>>);

impl Suppression {
    /// The snapshot as it is now: hold it for a whole batch.
    pub fn load(&self) -> arc_swap::Guard<Arc<Suppressed>> {
        self.0.load()
    }

    /// The snapshot as it is now, to keep.
    pub fn load_full(&self) -> Arc<Suppressed> {
        self.0.load_full()
    }

    pub fn replace(&self, suppressed: Suppressed) {
        self.0.store(Arc::new(suppressed));
    }

    /// Which of `messages` are about a suppressed subject; `None` (nothing to look at)
    /// when nobody is.
    pub fn screen<'m>(&self, messages: impl Iterator<Item = &'m [u8]>) -> Option<Vec<bool>> {
        let now = self.load();
        if now.is_empty() {
            return None;
        }
        Some(messages.map(|json| now.matches(json)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suppressed() -> Suppressed {
        Suppressed {
            user_ids: ["u1".to_string(), "42".to_string()].into(),
            anonymous_ids: ["a1".to_string()].into(),
            emails: ["gone@example.com".to_string()].into(),
        }
    }

    #[test]
    fn each_id_and_either_email_place_matches() {
        let s = suppressed();
        for json in [
            r#"{"type":"track","userId":"u1"}"#,
            r#"{"type":"track","userId":42}"#,
            r#"{"type":"page","anonymousId":"a1","userId":"other"}"#,
            r#"{"type":"identify","userId":"x","traits":{"email":" Gone@Example.com"}}"#,
            r#"{"type":"track","context":{"traits":{"email":"GONE@example.com"}}}"#,
        ] {
            assert!(s.matches(json.as_bytes()), "{json}");
        }
    }

    #[test]
    fn other_subjects_and_other_fields_do_not_match() {
        let s = suppressed();
        for json in [
            r#"{"type":"track","userId":"u2","anonymousId":"a2"}"#,
            r#"{"type":"track","properties":{"userId":"u1","email":"gone@example.com"}}"#,
            r#"{"type":"track","anonymousId":"u1"}"#,
            r#"{"type":"track","userId":"A1"}"#,
            r#"{"type":"track","traits":"gone@example.com"}"#,
            "not json",
        ] {
            assert!(!s.matches(json.as_bytes()), "{json}");
        }
    }

    #[test]
    fn nothing_is_screened_until_someone_is_suppressed() {
        let suppression = Suppression::default();
        let batch = [br#"{"userId":"u1"}"#.as_slice(), br#"{"userId":"u2"}"#];
        assert_eq!(suppression.screen(batch.iter().copied()), None);
        suppression.replace(suppressed());
        assert_eq!(
            suppression.screen(batch.iter().copied()),
            Some(vec![true, false])
        );
    }
}
