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

use serde::Deserialize;

use super::{
    check_url, http, secret_from_env, AnyDestination, BatchShape, Destination, DestinationConfig,
    KeyError, Kind, Outgoing, Preview, Sending,
};
use crate::clock::Clock;
use crate::json::{write_object, RawObject};
use crate::queue::Checkpoint;

pub const DEFAULT_URL: &str = "https://api.segment.io";
/// Segment's `/v1/batch` limits (and those of any fanout downstream).
pub const SEGMENT_MAX_EVENTS: usize = 2500;
/// 500 KB, less room for `{"batch":[` … `]}`.
pub const SEGMENT_MAX_BYTES: usize = 500 * 1024 - 64;

/// `kind = "segment"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// The base URL; `/v1/batch` is appended (default `https://api.segment.io`).
    pub url: Option<String>,
    /// Environment variable with the write key sent as Basic auth.
    pub write_key_env: String,
    /// Gzip the request body.
    #[serde(default)]
    pub gzip: bool,
}

impl Kind for SegmentConfig {
    const NAME: &'static str = "segment";
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        self.url
            .as_deref()
            .map_or(Ok(()), |url| check_url("url", url))
    }

    fn batch_shape(&self) -> BatchShape {
        BatchShape {
            max_events: SEGMENT_MAX_EVENTS,
            max_bytes: SEGMENT_MAX_BYTES,
            limited_by: "Segment's limits: 2 500 messages and 500 KB a request",
            ..BatchShape::new(500, SEGMENT_MAX_BYTES, 1000)
        }
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(SegmentDestination::new(config, self, clock)?))
    }

    /// The message as relayed: without its `sentAt`.
    fn preview(&self, message: &[u8], _: Clock) -> anyhow::Result<Preview> {
        let batch: serde_json::Value = serde_json::from_slice(&batch_body(&[Outgoing {
            source: "",
            json: message,
            prepared: None,
        }]))?;
        Ok(Preview::Send(batch["batch"][0].clone()))
    }
}

pub struct SegmentDestination {
    client: reqwest::Client,
    endpoint: String,
    authorization: HeaderValue,
    gzip: bool,
    clock: Clock,
}

impl SegmentDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &SegmentConfig,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let key = secret_from_env(&config.name, "write_key_env", &own.write_key_env)?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))?;
        authorization.set_sensitive(true);
        let base = own.url.as_deref().unwrap_or(DEFAULT_URL);
        Ok(SegmentDestination {
            client: http::client(config.timeout())?,
            endpoint: format!("{}/v1/batch", base.trim_end_matches('/')),
            authorization,
            gzip: own.gzip,
            clock,
        })
    }
}

/// `{"batch":[…]}` with each message's `sentAt` left out.
pub fn batch_body(batch: &[Outgoing<'_>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch.iter().map(|m| m.json.len() + 1).sum::<usize>() + 12);
    body.extend_from_slice(b"{\"batch\":[");
    for (i, message) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_without_sent_at(message.json, &mut body);
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
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        let body = batch_body(batch);
        let request = self
            .client
            .post(&self.endpoint)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json");
        Box::pin(http::send_batch(request, body, self.gzip, self.clock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_leaves_out_sent_at_only() {
        let a = br#"{"type":"track","sentAt":"2026-01-01T00:00:00Z","event":"E","properties":{"sentAt":1}}"#;
        let b = br#"{"type":"identify","userId":"u"}"#;
        let batch = [a.as_slice(), b.as_slice()].map(|json| Outgoing {
            source: "",
            json,
            prepared: None,
        });
        let body: serde_json::Value = serde_json::from_slice(&batch_body(&batch)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"batch": [
                {"type": "track", "event": "E", "properties": {"sentAt": 1}},
                {"type": "identify", "userId": "u"}
            ]})
        );
    }
}
