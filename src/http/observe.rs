//! The outermost layer: every request gets an id (`x-request-id`, the client's own if it
//! sent one, else a new UUID; echoed on the answer) and a log span naming it, its route
//! template and, once known, its source. On the way out: the request counter and latency
//! histogram by route template, one debug line per request, and one warn line for each
//! answer that refuses or fails, with its code and field but never its message (messages
//! can quote the client's values).
//!
//! One hand-written layer instead of tower-http's request-id and trace layers and a
//! middleware function: on single-event requests those three cost about a tenth of the
//! server's CPU (a span, a response-body wrapper, two header passes); this one creates the
//! span once, with every field it can know, and enters it only while the request runs.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode};
use tower::{Layer, Service};
use tracing::Instrument;

use super::error::ErrorLog;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let id = request
            .headers()
            .get(&X_REQUEST_ID)
            .cloned()
            .unwrap_or_else(new_request_id);
        // The template, not the raw path: label values must stay few, and a raw path can
        // carry anything, a write key included.
        let path = request.extensions().get::<MatchedPath>().cloned();
        // At info, so the warn line of a refused request carries the id and source too;
        // `source` is recorded once the write key is known (never the key itself).
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = path.as_ref().map_or("unmatched", MatchedPath::as_str),
            id = id.to_str().unwrap_or(""),
            source = tracing::field::Empty,
        );
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let mut answer = pin!(answer.instrument(span));
            let mut response = answer.as_mut().await?;
            let path = path.as_ref().map_or("unmatched", MatchedPath::as_str);
            answer
                .span()
                .in_scope(|| finished(path, &response, started));
            response.headers_mut().entry(&X_REQUEST_ID).or_insert(id);
            Ok(response)
        })
    }
}

fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// Counts the answer and logs it: at debug always, at warn when it refuses or fails.
fn finished(path: &str, response: &Response, started: Instant) {
    let status = response.status();
    let latency = started.elapsed();
    crate::metrics::http_request(path, status.as_u16(), latency);
    tracing::debug!(
        status = status.as_u16(),
        ?latency,
        "finished processing request"
    );
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
