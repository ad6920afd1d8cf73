//! The live view over HTTP (operator routes, behind the admin token):
//! `GET /debugger/events` streams `live` events as Server-Sent Events (filters `source`,
//! `destination`, `type`), and `GET /debugger` is the page that shows them (its script
//! and style served beside it, so a strict Content-Security-Policy holds).
//!
//! The stream takes the token as `Authorization: Bearer`, as `?token=`, or as the
//! `fanout_admin` cookie that `POST /debugger/session` (Bearer) sets for the page: an
//! `HttpOnly` one the page's script never reads, holding an HMAC of the token (hex, so
//! any token's characters survive) rather than the token. Without a valid one the answer
//! is the other admin endpoints' (404 when no token is configured, else 401).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, ORIGIN, REFERRER_POLICY,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, StatusCode};
use subtle::ConstantTimeEq;

use super::admin::{authorize_token, bearer};
use super::{ApiError, App};
use crate::live::{self, Filter};

/// A comment line this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Events already waiting are written together, up to about this much.
const BATCH_BYTES: usize = 64 * 1024;

/// The page, its script and its style, in the binary.
const PAGE: &str = include_str!("debugger.html");
const SCRIPT: &str = include_str!("debugger.js");
const STYLE: &str = include_str!("debugger.css");

/// Only the page's own files and its stream: no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

const COOKIE_NAME: &str = "fanout_admin";

/// `GET /debugger/events?source=&destination=&type=`
pub async fn events(
    State(app): State<Arc<App>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize_viewer(&app, &params, &headers) {
        return e.into_response();
    }
    let filter = Filter {
        source: params.get("source").filter(|s| !s.is_empty()).cloned(),
        destination: params.get("destination").filter(|s| !s.is_empty()).cloned(),
        message_type: params.get("type").filter(|s| !s.is_empty()).cloned(),
    };
    let viewer = match live::subscribe() {
        Ok(viewer) => viewer,
        Err(full) => return too_many_viewers(full.max_viewers, app.retry_after),
    };
    let hello = Bytes::from_static(b"retry: 2000\n: connected\n\n");
    let stream = futures_util::stream::unfold(
        (viewer, filter, Some(hello)),
        |(mut viewer, filter, hello)| async move {
            if let Some(hello) = hello {
                return Some((Ok::<_, Infallible>(hello), (viewer, filter, None)));
            }
            loop {
                let next = tokio::select! {
                    _ = live::closed() => return None,
                    next = tokio::time::timeout(KEEP_ALIVE, viewer.next(BATCH_BYTES)) => next,
                };
                let chunk = match next {
                    Err(_) => Bytes::from_static(b": keep-alive\n\n"),
                    Ok(batch) => {
                        let mut text = String::new();
                        // This viewer fell behind: tell it how much it lost, then go on.
                        if batch.lost > 0 {
                            text.push_str(&dropped(batch.lost));
                        }
                        for event in batch.events.iter().filter(|e| filter.matches(e)) {
                            text.push_str("data: ");
                            text.push_str(&event.json);
                            text.push_str("\n\n");
                        }
                        if text.is_empty() {
                            continue;
                        }
                        Bytes::from(text)
                    }
                };
                return Some((Ok(chunk), (viewer, filter, None)));
            }
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The token from the header, the query or the page's cookie.
fn authorize_viewer(
    app: &App,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    if let Some(token) = bearer(headers).or(params.get("token").map(String::as_str)) {
        return authorize_token(app, token);
    }
    let Some(token) = &app.admin_token else {
        return Err(ApiError::NotFound);
    };
    let expected = session_value(token);
    let valid = cookies(headers, COOKIE_NAME)
        .any(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())));
    if valid {
        Ok(())
    } else {
        // The same answer as a wrong token: 401.
        authorize_token(app, "")
    }
}

/// 429 past `[admin] max_viewers`, naming the setting.
fn too_many_viewers(max_viewers: usize, retry_after: u32) -> Response {
    ApiError::Overloaded { retry_after }.respond_with(&serde_json::json!({
        "success": false,
        "error": {
            "code": "too_many_viewers",
            "message": format!(
                "the live view has {max_viewers} viewers, its most (admin.max_viewers); \
                 close one or retry later"
            ),
            "field": "admin.max_viewers",
        }
    }))
}

/// `POST /debugger/session` with `Authorization: Bearer <admin token>`: sets the page's
/// cookie (`Secure` when the page was loaded over https).
pub async fn session(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let given = bearer(&headers).unwrap_or_default();
    if let Err(e) = authorize_token(&app, given) {
        return e.into_response();
    }
    let mut cookie = format!(
        "{COOKIE_NAME}={}; Path=/debugger; HttpOnly; SameSite=Strict",
        session_value(given)
    );
    // The browser's own word for the scheme it used: right behind a TLS-terminating
    // proxy too, with nothing to trust from the proxy.
    let https = headers
        .get(ORIGIN)
        .is_some_and(|o| o.as_bytes().starts_with(b"https://"));
    if https {
        cookie.push_str("; Secure");
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        h.insert(SET_COOKIE, value);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What the cookie holds for `token`: an HMAC of it, in hex, good for `/debugger` only
/// (the other admin endpoints take the token itself).
fn session_value(token: &str) -> String {
    crate::destinations::hmac_sha256_signature(token.as_bytes(), b"fanout /debugger session")
        .trim_start_matches("sha256=")
        .to_string()
}

/// `GET /debugger`: the page (404 when no admin token is configured, like the other
/// operator pages). It reads the token from its URL's fragment, which never reaches a
/// server log.
pub async fn page(State(app): State<Arc<App>>) -> Response {
    served(&app, "text/html; charset=utf-8", PAGE)
}

/// `GET /debugger/debugger.js`
pub async fn script(State(app): State<Arc<App>>) -> Response {
    served(&app, "text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /debugger/debugger.css`
pub async fn style(State(app): State<Arc<App>>) -> Response {
    served(&app, "text/css; charset=utf-8", STYLE)
}

fn served(app: &App, content_type: &'static str, body: &'static str) -> Response {
    if app.admin_token.is_none() {
        return ApiError::NotFound.into_response();
    }
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        body,
    )
        .into_response()
}

/// The event telling a viewer it fell behind and lost `lost` events.
fn dropped(lost: u64) -> String {
    format!("data: {{\"kind\":\"dropped\",\"count\":{lost}}}\n\n")
}

/// Every value of cookie `name` the request carries.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(key, _)| *key == name)
        .map(|(_, value)| value)
}
