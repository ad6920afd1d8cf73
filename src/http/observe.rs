//! The outermost layer: every request gets an id (`x-request-id`, the client's own if it
//! is 1 to 128 visible ASCII characters, else a new UUID; echoed on the answer) and a log
//! span naming it, its route template and, once known, its source. On the way out: the
//! request counter and latency histogram by route template, one debug line per request,
//! and a warn line for an answer that refuses or fails, with its code and field but never
//! its message (messages can quote the client's values). Warn lines are spaced out per
//! reason (status and code), so a flood of refusals cannot flood the log.
//!
//! One hand-written layer instead of tower-http's request-id and trace layers and a
//! middleware function: on single-event requests those three cost about a tenth of the
//! server's CPU (a span, a response-body wrapper, two header passes); this one creates the
//! span once, with every field it can know, and enters it only while the request runs.
//! The span is at debug: at info, making it (its fields formatted by the log's writer)
//! cost 4 % of a single-event request's CPU (BENCHMARKS.md, issue 33), so the warn line
//! names the id, route and source itself; the source reaches it through a task-local.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode};
use tower::{Layer, Service};
use tracing::Instrument;

use super::error::ErrorLog;
use crate::throttle::LogThrottle;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept: it is in every log line of its request.
const MAX_REQUEST_ID: usize = 128;
/// Warn lines of one reason (status and code): the first, then at most one per interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ObserveLayer {
    warnings: Arc<WarnLines>,
}

impl Default for ObserveLayer {
    fn default() -> Self {
        ObserveLayer {
            warnings: Arc::new(WarnLines::new(WARN_INTERVAL)),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            warnings: self.warnings.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    warnings: Arc<WarnLines>,
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
            .filter(|id| is_fit_request_id(id))
            .cloned()
            .unwrap_or_else(new_request_id);
        // The template, not the raw path: label values must stay few, and a raw path can
        // carry anything, a write key included.
        let path = request.extensions().get::<MatchedPath>().cloned();
        // At debug (see above): every line of the request carries its fields when on.
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = path.as_ref().map_or("unmatched", MatchedPath::as_str),
            id = id.to_str().unwrap_or(""),
            source = tracing::field::Empty,
        );
        let method = request.method().clone();
        let answer = span.in_scope(|| self.inner.call(request));
        let warnings = self.warnings.clone();
        Box::pin(async move {
            let answer = answer.instrument(span.clone());
            let mut answer = pin!(REQUEST_SOURCE.scope(Cell::new(None), answer));
            let mut response = answer.as_mut().await?;
            let source = answer.as_mut().take_value().and_then(Cell::into_inner);
            let request = Finished {
                method: &method,
                path: path.as_ref().map_or("unmatched", MatchedPath::as_str),
                id: id.to_str().unwrap_or(""),
                source: source.as_deref(),
            };
            span.in_scope(|| finished(&request, &response, started, &warnings));
            response.headers_mut().entry(&X_REQUEST_ID).or_insert(id);
            Ok(response)
        })
    }
}

tokio::task_local! {
    /// The source of the request being answered, once its write key is known.
    static REQUEST_SOURCE: Cell<Option<Arc<str>>>;
}

/// Names the request's source in its log span and its warn line (the source's name,
/// never its key). Outside a request (a test calling a handler) it does nothing.
pub(super) fn note_source(source: &Arc<str>) {
    tracing::Span::current().record("source", tracing::field::display(source));
    let _ = REQUEST_SOURCE.try_with(|slot| slot.set(Some(source.clone())));
}

/// What the warn line of a refused or failed request says about the request.
struct Finished<'a> {
    method: &'a http::Method,
    path: &'a str,
    id: &'a str,
    source: Option<&'a str>,
}

/// 1 to 128 visible ASCII characters (no space or control): short enough to log on every
/// line of its request, and plain enough to read there.
fn is_fit_request_id(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
}

fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// Counts the answer and logs it: at debug always, at warn when it refuses or fails (as
/// often as `warnings` lets that reason through).
fn finished(request: &Finished, response: &Response, started: Instant, warnings: &WarnLines) {
    let path = request.path;
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
        let Some(suppressed) = warnings.admit(status, error.map(|e| e.code)) else {
            return;
        };
        tracing::warn!(
            method = %request.method,
            path,
            id = request.id,
            source = request.source,
            status = status.as_u16(),
            code = error.map(|e| e.code),
            field = error.and_then(|e| e.field.as_deref()),
            index = error.and_then(|e| e.index),
            reason = error.and_then(|e| e.reason.as_deref()),
            suppressed = (suppressed > 0).then_some(suppressed),
            "{}",
            if status.is_server_error() {
                "request failed"
            } else {
                "request refused"
            }
        );
    }
}

/// The warn lines of refused and failed requests, spaced out per reason: a client can
/// send refusals as fast as the network allows, and each line would cost disk.
struct WarnLines {
    interval: Duration,
    /// By status and code: a bounded set (codes are fixed strings).
    reasons: Mutex<HashMap<(StatusCode, &'static str), Reason>>,
}

/// One reason's throttle, and the lines it held back since its last line.
struct Reason {
    throttle: LogThrottle,
    suppressed: u64,
}

impl WarnLines {
    fn new(interval: Duration) -> WarnLines {
        WarnLines {
            interval,
            reasons: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line for this reason is written now: if so, how many were held back
    /// since the last one (the line says so); if not, this one is counted as held back.
    fn admit(&self, status: StatusCode, code: Option<&'static str>) -> Option<u64> {
        let mut reasons = self.reasons.lock().expect("warn lines lock poisoned");
        let reason = reasons
            .entry((status, code.unwrap_or("")))
            .or_insert_with(|| Reason {
                throttle: LogThrottle::new(self.interval),
                suppressed: 0,
            });
        if reason.throttle.ready() {
            Some(std::mem::take(&mut reason.suppressed))
        } else {
            reason.suppressed += 1;
            None
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_kept_only_when_short_and_visible() {
        let fit = |bytes: &[u8]| is_fit_request_id(&HeaderValue::from_bytes(bytes).unwrap());
        assert!(fit(b"req-42_OK:/=+~"));
        assert!(fit("k".repeat(128).as_bytes()));
        assert!(!fit("k".repeat(129).as_bytes()));
        assert!(!fit(b""));
        assert!(!fit(b"two words"));
        assert!(!fit(b"tab\there"));
        assert!(!fit(b"caf\xe9"));
    }

    #[test]
    fn warn_lines_are_spaced_out_per_reason_and_count_what_was_held_back() {
        let lines = WarnLines::new(Duration::from_millis(50));
        let unauthorized = (StatusCode::UNAUTHORIZED, Some("unauthorized"));
        assert_eq!(lines.admit(unauthorized.0, unauthorized.1), Some(0));
        for _ in 0..5 {
            assert_eq!(lines.admit(unauthorized.0, unauthorized.1), None);
        }
        // Another reason has its own throttle.
        assert_eq!(
            lines.admit(StatusCode::BAD_REQUEST, Some("invalid_json")),
            Some(0)
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(lines.admit(unauthorized.0, unauthorized.1), Some(5));
        assert_eq!(lines.admit(unauthorized.0, unauthorized.1), None);
    }
}
