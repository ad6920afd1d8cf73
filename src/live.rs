//! The live view: each happening — a message accepted, a duplicate, a request refused, and
//! per destination delivered, skipped, retried or dead-lettered — as an event for whoever
//! watches (`GET /debugger/events`, the `/debugger` page, `fanout tap`).
//!
//! Events are built only while someone watches (a receiver count, one atomic read, is all
//! ingest and delivery pay otherwise). They go through one broadcast ring of `BUFFER`
//! events: publishing never waits, and a viewer that falls more than that behind loses the
//! oldest and is told how many (a `dropped` event), so no viewer can slow the pipeline.

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::message::MessageType;

/// Events a viewer may fall behind by before it loses some.
pub const BUFFER: usize = 4096;

/// One happening, serialized once for every viewer.
#[derive(Debug)]
pub struct LiveEvent {
    pub source: Option<String>,
    pub destination: Option<String>,
    pub message_type: Option<&'static str>,
    /// The event as sent to viewers: `{"kind": …, …}`.
    pub json: String,
}

/// Set at shutdown: every viewer's stream ends.
fn closing() -> &'static tokio::sync::watch::Sender<bool> {
    static CLOSING: OnceLock<tokio::sync::watch::Sender<bool>> = OnceLock::new();
    CLOSING.get_or_init(|| tokio::sync::watch::channel(false).0)
}

pub fn close_viewers() {
    closing().send_replace(true);
}

/// Resolves when the process shuts down.
pub async fn closed() {
    let mut rx = closing().subscribe();
    let _ = rx.wait_for(|&c| c).await;
}

fn hub() -> &'static broadcast::Sender<Arc<LiveEvent>> {
    static HUB: OnceLock<broadcast::Sender<Arc<LiveEvent>>> = OnceLock::new();
    HUB.get_or_init(|| broadcast::channel(BUFFER).0)
}

/// Whether anyone watches: check before building an event.
pub fn watching() -> bool {
    hub().receiver_count() > 0
}

pub fn subscribe() -> broadcast::Receiver<Arc<LiveEvent>> {
    hub().subscribe()
}

/// Sends `fields` (an object) as an event of `kind`, stamped with the time; `raw` is a
/// JSON document (a message as stored) added under its name as it is, unparsed.
pub fn publish(
    kind: &'static str,
    source: Option<&str>,
    destination: Option<&str>,
    message_type: Option<MessageType>,
    mut fields: Value,
    raw: Option<(&'static str, &[u8])>,
) {
    if let Some(object) = fields.as_object_mut() {
        object.insert("kind".into(), json!(kind));
        object.insert(
            "at".into(),
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        if let Some(source) = source {
            object.insert("source".into(), json!(source));
        }
        if let Some(destination) = destination {
            object.insert("destination".into(), json!(destination));
        }
        if let Some(t) = message_type {
            object.insert("type".into(), json!(t.as_str()));
        }
    }
    let mut json = fields.to_string();
    if let Some((name, document)) = raw {
        if json.ends_with('}') && std::str::from_utf8(document).is_ok() {
            json.pop();
            if json.len() > 1 {
                json.push(',');
            }
            json.push_str(&format!("\"{name}\":"));
            json.push_str(std::str::from_utf8(document).unwrap_or("null"));
            json.push('}');
        }
    }
    // serde_json leaves the line separators JSON allows in strings raw (a message's event
    // name in the summary), and `fanout tap` prints each event as one line.
    let mut bytes = json.into_bytes();
    crate::json::keep_on_one_line(&mut bytes, 0);
    let json = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let event = LiveEvent {
        source: source.map(str::to_string),
        destination: destination.map(str::to_string),
        message_type: message_type.map(MessageType::as_str),
        json,
    };
    // No receiver left between the check and now: nothing to do.
    let _ = hub().send(Arc::new(event));
}

/// What a viewer asked to see; `None` fields match everything.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    pub source: Option<String>,
    pub destination: Option<String>,
    #[serde(rename = "type")]
    pub message_type: Option<String>,
}

impl Filter {
    pub fn matches(&self, event: &LiveEvent) -> bool {
        let field = |wanted: &Option<String>, have: Option<&str>| {
            wanted.as_deref().is_none_or(|w| have == Some(w))
        };
        field(&self.source, event.source.as_deref())
            && field(&self.destination, event.destination.as_deref())
            && field(&self.message_type, event.message_type)
    }
}

/// The parts of a stored message a viewer's table shows, read without building the
/// whole document: `{"messageId", "event"}` (a track's event, else a page's name).
pub fn summary(json: &[u8]) -> (Value, Option<MessageType>) {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "messageId", borrow)]
        message_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        event: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        name: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "type", borrow)]
        message_type: Option<std::borrow::Cow<'a, str>>,
    }
    match serde_json::from_slice::<Peek>(json) {
        Ok(p) => (
            json!({"messageId": p.message_id, "event": p.event.or(p.name)}),
            p.message_type.as_deref().and_then(MessageType::parse),
        ),
        Err(_) => (json!({}), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line_whatever_its_fields_hold() {
        let mut viewer = subscribe();
        let name = "a\u{2028}b\u{85}\u{2029}";
        publish(
            "accepted",
            Some("one-line-test"),
            None,
            None,
            json!({ "event": name }),
            Some(("message", br#"{"p":"\u2028"}"#)),
        );
        let event = loop {
            match viewer.try_recv() {
                Ok(event) if event.source.as_deref() == Some("one-line-test") => break event,
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(e) => panic!("the event was not published: {e}"),
            }
        };
        assert!(!crate::json::breaks_lines(&event.json), "{:?}", event.json);
        let parsed: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(parsed["event"], name);
        assert_eq!(parsed["message"]["p"], "\u{2028}");
    }
}
