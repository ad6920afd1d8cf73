//! `kind = "segment"`: relays to Segment's HTTP API, or anything that speaks it (another
//! fanout), as `POST {url}/v1/batch` with the write key as Basic auth. The engine keeps
//! each batch within Segment's limits (2 500 messages, 500 KB).
//!
//! Messages go as stored, with `timestamp` already corrected, except `sentAt`: it is the
//! client's send time, and a receiver that finds it would correct the timestamp a second
//! time by however long the message waited here. Without it, the receiver keeps
//! `timestamp` as given (and `originalTimestamp` still records the client's clock).

use base64::Engine as _;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::value::RawValue;

use super::{http, secret_from_env, Destination, SendError};
use crate::config::DestinationConfig;
use crate::json::{write_object, RawObject};

pub const DEFAULT_URL: &str = "https://api.segment.io";

pub struct SegmentDestination {
    client: reqwest::Client,
    endpoint: String,
    authorization: HeaderValue,
    gzip: bool,
}

impl SegmentDestination {
    pub fn new(config: &DestinationConfig) -> anyhow::Result<Self> {
        let var = config.write_key_env.as_deref().unwrap_or_default();
        let key = secret_from_env(&config.name, "write_key_env", var)?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))?;
        authorization.set_sensitive(true);
        let base = config.url.as_deref().unwrap_or(DEFAULT_URL);
        Ok(SegmentDestination {
            client: http::client(config.timeout())?,
            endpoint: format!("{}/v1/batch", base.trim_end_matches('/')),
            authorization,
            gzip: config.gzip.unwrap_or(false),
        })
    }
}

/// `{"batch":[…]}` with each message's `sentAt` left out.
pub fn batch_body(messages: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 12);
    body.extend_from_slice(b"{\"batch\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_without_sent_at(message, &mut body);
    }
    body.extend_from_slice(b"]}");
    body
}

fn write_without_sent_at(message: &[u8], out: &mut Vec<u8>) {
    // Most messages have no sentAt of their own; skip the parse for them.
    if memchr::memmem::find(message, b"\"sentAt\"").is_some() {
        let parsed = std::str::from_utf8(message)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .and_then(RawObject::parse);
        if let Some(mut object) = parsed {
            object.remove("sentAt");
            write_object(out, object.iter().map(|(k, v)| (k, v.get())));
            return;
        }
    }
    out.extend_from_slice(message);
}

impl Destination for SegmentDestination {
    async fn send(&self, messages: &[&[u8]]) -> Result<u64, SendError> {
        let body = batch_body(messages);
        let request = self
            .client
            .post(&self.endpoint)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json");
        http::send_batch(request, body, self.gzip).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_leaves_out_sent_at_only() {
        let a = br#"{"type":"track","sentAt":"2026-01-01T00:00:00Z","event":"E","properties":{"sentAt":1}}"#;
        let b = br#"{"type":"identify","userId":"u"}"#;
        let body: serde_json::Value = serde_json::from_slice(&batch_body(&[a, b])).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"batch": [
                {"type": "track", "event": "E", "properties": {"sentAt": 1}},
                {"type": "identify", "userId": "u"}
            ]})
        );
    }
}
