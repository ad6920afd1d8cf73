//! Per request: the request counter and latency histogram by route template, and one
//! warn line for each answer that refuses or fails, with its code and field but never
//! its message (messages can quote the client's values). The line carries the request
//! span's id and source.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::StatusCode;

use super::error::ErrorLog;

pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The template, not the raw path: label values must stay few.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let path = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    tracing::Span::current().record("path", path);
    let response = next.run(request).await;
    let status = response.status();
    crate::metrics::http_request(path, status.as_u16(), started.elapsed());
    if status.is_client_error() || status.is_server_error() {
        tell_live(path, status, response.extensions().get::<ErrorLog>());
    }
    // A load balancer polls `/ready`: while it answers 503, the queue logs why (once, as
    // it changes), not each poll.
    if worth_a_warning(status) && path != "/ready" {
        let error = response.extensions().get::<ErrorLog>();
        tracing::warn!(
            status = status.as_u16(),
            code = error.map(|e| e.code),
            field = error.and_then(|e| e.field.as_deref()),
            index = error.and_then(|e| e.index),
            reason = error.and_then(|e| e.reason.as_deref()),
            "{}",
            if status.is_server_error() {
                "request failed"
            } else {
                "request refused"
            }
        );
    }
    response
}

/// Refusals of what a client sent, and fanout's own failures. Unknown paths and methods
/// (scanners), duplicates (retries), overload (429, answered before any work) and bodies
/// cut short (408: slow clients, summed up by the admission layer instead) would flood
/// the log just when it hurts: they are only counted, and logged at debug with every
/// request.
fn worth_a_warning(status: StatusCode) -> bool {
    status.is_server_error()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::NOT_FOUND
                    | StatusCode::METHOD_NOT_ALLOWED
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::CONFLICT
                    | StatusCode::TOO_MANY_REQUESTS
            ))
}

/// A refused or failed ingest request, for the live view: its status, code, field and
/// index (never the key, nor the message's values).
fn tell_live(path: &str, status: StatusCode, error: Option<&ErrorLog>) {
    let ingest = ["/v1/", "/event/", "/api/"]
        .iter()
        .any(|p| path.starts_with(p));
    if !ingest || !crate::live::watching() {
        return;
    }
    crate::live::publish(
        "refused",
        None,
        None,
        None,
        serde_json::json!({
            "path": path,
            "status": status.as_u16(),
            "code": error.map(|e| e.code),
            "field": error.and_then(|e| e.field.as_deref()),
            "index": error.and_then(|e| e.index),
        }),
        None,
    );
}
