//! `kind = "webhook"`: POSTs JSON to a URL — a batch as an array, or one message per
//! request — with configured headers and an optional HMAC-SHA256 signature:
//! `X-Fanout-Signature: sha256=<hex>` over the JSON body (before any gzip), keyed with
//! the secret from `signing_secret_env`.

use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use sha2::Sha256;

use super::{http, json_array, secret_from_env, Destination, SendError};
use crate::config::{DestinationConfig, WebhookPayload};

pub const SIGNATURE_HEADER: &str = "x-fanout-signature";

pub struct WebhookDestination {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    secret: Option<Vec<u8>>,
    payload: WebhookPayload,
    gzip: bool,
}

impl WebhookDestination {
    pub fn new(config: &DestinationConfig) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
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
        let secret = match &config.signing_secret_env {
            Some(var) => {
                Some(secret_from_env(&config.name, "signing_secret_env", var)?.into_bytes())
            }
            None => None,
        };
        Ok(WebhookDestination {
            client: http::client(config.timeout())?,
            url: config.url.clone().unwrap_or_default(),
            headers,
            secret,
            payload: config.payload.unwrap_or_default(),
            gzip: config.gzip.unwrap_or(false),
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

impl Destination for WebhookDestination {
    async fn send(&self, messages: &[&[u8]]) -> Result<u64, SendError> {
        let body = match (self.payload, messages) {
            (WebhookPayload::Message, [one]) => one.to_vec(),
            _ => {
                let mut body =
                    Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 2);
                json_array(messages, &mut body);
                body
            }
        };
        let mut request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        http::send_batch(request, body, self.gzip).await
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
