//! The live view over HTTP (operator routes, behind the admin token):
//! `GET /debugger/events` streams `live` events as Server-Sent Events (filters `source`,
//! `destination`, `type`), and `GET /debugger` is the page that shows them.
//!
//! The token may come as `Authorization: Bearer`, as `?token=` (an `EventSource` cannot
//! set headers) or as the `fanout_admin` cookie the page sets; without a valid one the
//! answer is the other admin endpoints' (404 when no token is configured, else 401).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE};
use http::{HeaderMap, HeaderValue};

use super::admin::{authorize_token, bearer};
use super::{ApiError, App};
use crate::live::{self, Filter};

/// A comment line this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Events already waiting are written together, up to about this much.
const BATCH_BYTES: usize = 64 * 1024;

/// The page: HTML, CSS and JS in one file, in the binary.
const PAGE: &str = include_str!("debugger.html");

/// `GET /debugger/events?source=&destination=&type=`
pub async fn events(
    State(app): State<Arc<App>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let token = bearer(&headers)
        .map(str::to_string)
        .or_else(|| params.get("token").cloned())
        .or_else(|| cookie(&headers, "fanout_admin"))
        .unwrap_or_default();
    if let Err(e) = authorize_token(&app, &token) {
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

/// `GET /debugger`: the page (404 when no admin token is configured, like the other
/// operator pages). It reads the token from its URL's fragment, which never reaches a
/// server log.
pub async fn page(State(app): State<Arc<App>>) -> Response {
    if app.admin_token.is_none() {
        return ApiError::NotFound.into_response();
    }
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        PAGE,
    )
        .into_response()
}

/// The event telling a viewer it fell behind and lost `lost` events.
fn dropped(lost: u64) -> String {
    format!("data: {{\"kind\":\"dropped\",\"count\":{lost}}}\n\n")
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
}
