//! `kind = "webhook"`: POSTs JSON to a URL — a batch as an array, or one message per
//! request — with configured headers and an optional HMAC-SHA256 signature:
//! `X-Fanout-Signature: sha256=<hex>` over the JSON body (before any gzip), keyed with
//! the secret from `signing_secret_env`.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde::Deserialize;
use sha2::Sha256;

use super::{
    check_url, delete_message, http, json_array, secret_from_env, AnyDestination, BatchShape,
    Destination, DestinationConfig, EraseError, Erasing, Erasure, KeyError, Kind, Outgoing,
    Sending, Subject,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;

/// `kind = "webhook"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL posted to.
    pub url: String,
    /// Headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Environment variable with the HMAC-SHA256 signing secret.
    pub signing_secret_env: Option<String>,
    /// A JSON array of messages per request (default), or one message per request.
    #[serde(default)]
    pub payload: WebhookPayload,
    /// Gzip the request body.
    #[serde(default)]
    pub gzip: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookPayload {
    /// `[message, …]`, one request per batch.
    #[default]
    Array,
    /// `message`, one request per message.
    Message,
}

impl Kind for WebhookConfig {
    const NAME: &'static str = "webhook";
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        check_url("url", &self.url)?;
        for name in self.headers.keys() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(KeyError::new(
                    format!("headers.{name}"),
                    "not a valid header name",
                ));
            }
        }
        Ok(())
    }

    fn batch_shape(&self) -> BatchShape {
        BatchShape {
            one_per_request: self.payload == WebhookPayload::Message,
            ..BatchShape::new(100, 1024 * 1024, 200)
        }
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(WebhookDestination::new(config, self, clock)?))
    }
}

pub const SIGNATURE_HEADER: &str = "x-fanout-signature";

pub struct WebhookDestination {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    secret: Option<Vec<u8>>,
    payload: WebhookPayload,
    gzip: bool,
    clock: Clock,
}

impl WebhookDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &WebhookConfig,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        for (name, value) in &own.headers {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value).map_err(|_| {
                    anyhow::anyhow!(
                        "destination `{}`: header `{name}` has an invalid value",
                        config.name
                    )
                })?,
            );
        }
        let secret = match &own.signing_secret_env {
            Some(var) => {
                Some(secret_from_env(&config.name, "signing_secret_env", var)?.into_bytes())
            }
            None => None,
        };
        Ok(WebhookDestination {
            client: http::client(config.timeout())?,
            url: own.url.clone(),
            headers,
            secret,
            payload: own.payload,
            gzip: own.gzip,
            clock,
        })
    }
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl WebhookDestination {
    /// The request for `body`: the configured headers, signed when a secret is set.
    fn request(&self, body: &[u8]) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        request
    }
}

impl Destination for WebhookDestination {
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        let body = match (self.payload, batch) {
            (WebhookPayload::Message, [one]) => one.json.to_vec(),
            _ => {
                let mut body =
                    Vec::with_capacity(batch.iter().map(|m| m.json.len() + 1).sum::<usize>() + 2);
                json_array(batch, &mut body);
                body
            }
        };
        let request = self.request(&body);
        Box::pin(http::send_batch(request, body, self.gzip, self.clock))
    }

    /// Posts a Segment delete message, shaped as the destination's messages are (alone
    /// or in an array of one) and signed like them.
    fn erase<'a>(&'a self, subject: &'a Subject) -> Erasing<'a> {
        Box::pin(async move {
            let message = delete_message(subject, self.clock.now())?;
            let body = match self.payload {
                WebhookPayload::Message => message,
                WebhookPayload::Array => [b"[".as_slice(), &message, b"]"].concat(),
            };
            http::send_batch(self.request(&body), body, self.gzip, self.clock)
                .await
                .map_err(|e| EraseError::from_send("webhook", e))?;
            Ok(Erasure::Done {
                detail: "delete message accepted".into(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
