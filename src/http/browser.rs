//! What browsers need besides the tracking calls: the settings the browser library
//! (analytics-next) fetches from its CDN, and Segment's pixel API.
//!
//! - `GET /v1/projects/{writeKey}/settings`: a site that sets the snippet's `cdnURL` to
//!   fanout gets an answer pointing the library's `Segment.io` integration back at fanout
//!   (`apiHost` from `[browser] api_host`, else the request's `Host`; `protocol` from
//!   `[browser] protocol`, else `http`), no device-mode plugins and no telemetry. From a
//!   peer in `server.trusted_proxies`, `X-Forwarded-Host` and `X-Forwarded-Proto` stand
//!   for the client's host and scheme. Without `api_host` the answer depends on the
//!   request, so it is `private, no-store`. An unknown key is a 404 JSON error, so a typo
//!   shows in the browser console.
//! - `GET /v1/pixel/{track,page,screen,identify,group,alias}?data=<base64 JSON>`: the JSON
//!   (with `writeKey` inside) is taken exactly like a POST of that call. An `<img>` cannot
//!   read a JSON body, so every answer is the same 1×1 GIF and the status says how it went:
//!   200 stored, 400 bad `data` or message, 401 unknown key, 404 unknown call, 413 too large,
//!   503 (with `Retry-After`) not stored now. A HEAD gets the GIF's headers (200, or 404
//!   for an unknown call) and stores nothing.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, RETRY_AFTER, VARY};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;

use super::error::ApiError;
use super::{handlers, App, Peer};
use crate::ingest::Rejection;
use crate::message::MessageType;

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// `GET /v1/projects/{writeKey}/settings`.
pub async fn settings(
    State(app): State<Arc<App>>,
    Path(write_key): Path<String>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let sources = app.sources.load();
    let Some(source) = sources.authenticate(&write_key) else {
        let body = json!({"success": false, "code": "unknown_write_key",
                          "message": "no source has this write key"});
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    };
    // Anyone can send X-Forwarded-*: only a proxy of ours is believed.
    let from_proxy = peer.is_some_and(|Extension(Peer(peer))| {
        let ip = peer.ip().to_canonical();
        app.trusted_proxies.iter().any(|net| net.contains(&ip))
    });
    // The request headers the answer depends on, for `Vary`.
    let mut shaped_by = Vec::new();
    let host = match &app.browser.api_host {
        Some(host) => host.clone(),
        None => {
            shaped_by.push("Host");
            let via_proxy = if from_proxy {
                shaped_by.push("X-Forwarded-Host");
                forwarded(&headers, "x-forwarded-host")
            } else {
                None
            };
            via_proxy
                .or_else(|| forwarded(&headers, HOST.as_str()))
                .unwrap_or_else(|| "localhost".to_string())
        }
    };
    let protocol = match &app.browser.protocol {
        Some(protocol) => protocol.clone(),
        None if from_proxy => {
            shaped_by.push("X-Forwarded-Proto");
            forwarded(&headers, "x-forwarded-proto")
                .filter(|p| p == "https")
                .unwrap_or_else(|| "http".to_string())
        }
        None => "http".to_string(),
    };
    let mut segment = json!({
        "apiKey": write_key,
        "apiHost": format!("{host}/v1"),
        "protocol": protocol,
        "unbundledIntegrations": [],
        "addBundledMetadata": true,
        "maybeBundledConfigIds": {},
        "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
    });
    if let Some(batching) = sources.batching(&source) {
        segment["deliveryStrategy"] = json!({
            "strategy": "batching",
            "config": {"size": batching.size, "timeout": batching.timeout.as_millis() as u64},
        });
    }
    let everything = json!({"__default": {"enabled": true, "integrations": {}}});
    let body = json!({
        "integrations": {"Segment.io": segment},
        "plan": {"track": everything, "identify": everything, "group": everything},
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": [],
        "consentSettings": {"allCategories": []},
    });
    // Shaped by the request's Host, the answer must not reach another visitor from a
    // shared cache that keys on the URL alone (it would send their events elsewhere).
    let cache = match app.browser.api_host {
        Some(_) => "max-age=60",
        None => "private, no-store",
    };
    let mut response = ([(CACHE_CONTROL, cache)], axum::Json(body)).into_response();
    if !shaped_by.is_empty() {
        let vary = HeaderValue::from_str(&shaped_by.join(", ")).expect("header names");
        response.headers_mut().append(VARY, vary);
    }
    response
}

/// The first value of a header, as text.
fn forwarded(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// `GET /v1/pixel/{call}?data=<base64 JSON>`.
pub async fn pixel(
    State(app): State<Arc<App>>,
    method: Method,
    Path(call): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let Some(kind) = MessageType::parse(&call) else {
        return gif(ApiError::NotFound.into_response());
    };
    // A HEAD (a link checker, a mail scanner's preview) gets the GIF's headers and stores
    // nothing: only a GET is the pixel being loaded.
    if method == Method::HEAD {
        return gif(StatusCode::OK.into_response());
    }
    let data = query.ok().and_then(|Query(mut q)| q.remove("data"));
    let body = match data_of(data) {
        Ok(body) => body,
        Err(rejection) => return gif(ApiError::Invalid(rejection).into_response()),
    };
    let answer = handlers::accept_segment(&app, Some(kind), &HeaderMap::new(), Body::from(body))
        .await
        .unwrap_or_else(IntoResponse::into_response);
    gif(answer)
}

/// The decoded `data` parameter: standard or URL-safe base64, padded or not.
fn data_of(data: Option<String>) -> Result<Vec<u8>, Rejection> {
    let invalid = || {
        Rejection::field(
            "invalid_pixel",
            "data",
            "`data` must be base64 of a JSON message",
        )
    };
    let data = data.ok_or_else(invalid)?;
    // A `+` of the base64 alphabet arrives as a space when the URL did not escape it.
    let data = data.trim().replace(' ', "+");
    let trimmed = data.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| invalid())
}

/// The pixel with `answer`'s status (and `Retry-After`, if any).
fn gif(answer: Response) -> Response {
    let mut response = Response::new(Body::from(PIXEL));
    *response.status_mut() = answer.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(retry) = answer.headers().get(RETRY_AFTER) {
        headers.insert(RETRY_AFTER, retry.clone());
    }
    response
}
