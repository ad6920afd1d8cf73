//! Privacy deletions (`suppress_with_delete` regulations): whom a deletion is about and
//! what a destination made of it. The regulations runner calls `Destination::erase`.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};

/// Whom a privacy deletion is about, with what fanout knows of them (the regulations
/// runner fills email/phone from the identity store when the regulation names a userId).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Subject {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// What a destination did with a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erasure {
    /// Deleted (or asked the destination to delete); `detail` says what, for the record.
    Done { detail: String },
    /// The kind has no way to delete what it holds or sent.
    NotSupported,
}

/// Why it could not (yet): `retry` true for what may pass later (network, 429, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EraseError {
    pub retry: bool,
    pub message: String,
}

impl EraseError {
    /// May pass later (network, 429, 5xx).
    pub fn retry(message: impl Into<String>) -> EraseError {
        EraseError {
            retry: true,
            message: message.into(),
        }
    }

    /// Cannot pass as it is (the destination refused it).
    pub fn failed(message: impl Into<String>) -> EraseError {
        EraseError {
            retry: false,
            message: message.into(),
        }
    }
}

/// The future `Destination::erase` returns (boxed, like `Sending`).
pub type Erasing<'a> = Pin<Box<dyn Future<Output = Result<Erasure, EraseError>> + Send + 'a>>;

/// The Segment message that asks a receiver to delete `subject`'s data, as Segment sends
/// its destinations for a deletion regulation: `type` "delete", the subject's `userId`
/// and `anonymousId`, a new `messageId`, the `timestamp` of the request; no traits (the
/// email and phone stay with fanout). Refused for a subject with neither id: the message
/// would name no one.
pub fn delete_message(subject: &Subject, now: DateTime<Utc>) -> Result<Vec<u8>, EraseError> {
    if subject.user_id.is_none() && subject.anonymous_id.is_none() {
        return Err(EraseError::failed(
            "a Segment delete message names a userId or anonymousId; this subject has neither",
        ));
    }
    let mut message = serde_json::Map::new();
    message.insert("type".into(), "delete".into());
    if let Some(user_id) = &subject.user_id {
        message.insert("userId".into(), user_id.as_str().into());
    }
    if let Some(anonymous_id) = &subject.anonymous_id {
        message.insert("anonymousId".into(), anonymous_id.as_str().into());
    }
    message.insert("messageId".into(), uuid::Uuid::new_v4().to_string().into());
    message.insert("timestamp".into(), crate::timestamp::format(now).into());
    message.insert("channel".into(), "server".into());
    message.insert(
        "context".into(),
        serde_json::json!({"library": {"name": "fanout", "version": env!("CARGO_PKG_VERSION")}}),
    );
    Ok(serde_json::Value::Object(message).to_string().into_bytes())
}

impl EraseError {
    /// What a failed request to `service` means for a deletion: retried for what may pass
    /// later (no answer, 408, 429, 5xx; a 429's `Retry-After` is in the message), else
    /// failed with the receiver's own account of why (its error detail).
    pub fn from_send(service: &str, error: super::SendError) -> EraseError {
        use super::SendError;
        let (status, retry_after, detail, answer) = match error {
            SendError::Retryable {
                status,
                retry_after,
                detail,
                answer,
            } => (status, retry_after, detail, answer),
            SendError::Rejected {
                status,
                detail,
                answer,
            } => (Some(status), None, detail, answer),
            SendError::PartlyRejected { .. } => {
                return EraseError::failed(format!("{service}: {error}"))
            }
        };
        let passes_later = matches!(status, None | Some(408 | 429 | 500..=599));
        let mut message = format!("{service}: {detail}");
        if let Some(why) = answer.as_deref().and_then(answer_detail) {
            message.push_str(&format!(": {why}"));
        }
        if let Some(wait) = retry_after {
            message.push_str(&format!(" (retry after {}s)", wait.as_secs()));
        }
        EraseError {
            retry: passes_later,
            message,
        }
    }
}

/// The receiver's explanation in an error answer: Klaviyo's `errors[].detail`, a
/// `message` or `error` text, else the answer itself, cut short.
fn answer_detail(answer: &str) -> Option<String> {
    let text = match serde_json::from_str::<serde_json::Value>(answer) {
        Ok(value) => {
            let details: Vec<&str> = value["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["detail"].as_str())
                .collect();
            if details.is_empty() {
                [
                    value.pointer("/error/message"),
                    value.get("message"),
                    value.get("error"),
                ]
                .into_iter()
                .flatten()
                .find_map(serde_json::Value::as_str)
                .map_or_else(|| answer.to_string(), str::to_string)
            } else {
                details.join("; ")
            }
        }
        Err(_) => answer.to_string(),
    };
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(500).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::SendError;
    use std::time::Duration;

    fn retryable(status: Option<u16>, answer: Option<&str>) -> SendError {
        SendError::Retryable {
            status,
            retry_after: (status == Some(429)).then_some(Duration::from_secs(30)),
            detail: status.map_or("cannot connect".into(), |s| format!("HTTP {s}")),
            answer: answer.map(str::to_string),
        }
    }

    #[test]
    fn network_429_and_5xx_are_retried_other_4xx_fail_with_the_detail() {
        for status in [None, Some(408), Some(429), Some(500), Some(503)] {
            let e = EraseError::from_send("Klaviyo", retryable(status, None));
            assert!(e.retry, "{status:?}: {e:?}");
        }
        let e = EraseError::from_send("Klaviyo", retryable(Some(429), None));
        assert!(e.message.contains("retry after 30s"), "{}", e.message);
        let answer = r#"{"errors":[{"id":"1","status":403,"code":"permission_denied",
            "title":"Forbidden","detail":"The API key is missing the data-privacy:write scope."}]}"#;
        let e = EraseError::from_send("Klaviyo", retryable(Some(403), Some(answer)));
        assert!(!e.retry);
        assert_eq!(
            e.message,
            "Klaviyo: HTTP 403: The API key is missing the data-privacy:write scope."
        );
        let rejected = SendError::Rejected {
            status: 400,
            detail: "HTTP 400 (invalid)".into(),
            answer: Some("not json at all".into()),
        };
        let e = EraseError::from_send("webhook", rejected);
        assert!(!e.retry);
        assert_eq!(e.message, "webhook: HTTP 400 (invalid): not json at all");
    }

    #[test]
    fn the_delete_message_names_the_subject_and_no_traits() {
        let now = crate::timestamp::parse("2026-12-07T08:00:00.123Z").unwrap();
        let subject = Subject {
            user_id: Some("u1".into()),
            email: Some("a@example.com".into()),
            ..Subject::default()
        };
        let message: serde_json::Value =
            serde_json::from_slice(&delete_message(&subject, now).unwrap()).unwrap();
        assert_eq!(message["type"], "delete");
        assert_eq!(message["userId"], "u1");
        assert!(message.get("anonymousId").is_none());
        assert_eq!(message["timestamp"], "2026-12-07T08:00:00.123Z");
        assert_eq!(message["messageId"].as_str().unwrap().len(), 36);
        assert!(!message.to_string().contains("a@example.com"));
        let email_only = Subject {
            email: Some("a@example.com".into()),
            ..Subject::default()
        };
        let e = delete_message(&email_only, now).unwrap_err();
        assert!(
            !e.retry && e.message.contains("userId or anonymousId"),
            "{e:?}"
        );
    }
}
