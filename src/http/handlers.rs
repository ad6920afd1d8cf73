//! Request handlers: authenticate, read the body, run ingest, append to the queue,
//! answer. A 200 is sent only after the queue has fsynced the request's messages.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::json;

use super::observe::note_source;
use super::{ApiError, App, BodyCut};
use crate::auth::{self, Credential};
use crate::ingest::{seed, segment, Rejection};
use crate::message::MessageType;
use crate::metrics::EventTally;
use crate::queue::dead_letters::{Failure, NewLetter, Reason};
use crate::queue::RecordBatch;

/// Exactly what Segment answers; clients treat anything else as a failure.
const SUCCESS: &str = r#"{"success":true}"#;

pub(super) fn success() -> Response {
    ([(CONTENT_TYPE, "application/json")], SUCCESS).into_response()
}

/// The `/event/batch` answer, in the field order the seed's service uses.
#[derive(Serialize)]
struct EventBatchAnswer<'a> {
    success: bool,
    total: usize,
    processed: usize,
    errors: usize,
    batch: &'a [seed::ItemReport],
}

fn json_response(body: &impl Serialize) -> Response {
    let body = serde_json::to_string(body).expect("answers serialize");
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/v1/track`, `/v1/t`, … : one message; the type comes from the path.
pub async fn single(
    State(app): State<Arc<App>>,
    kind: MessageType,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    accept_segment(&app, Some(kind), &parts.headers, body).await
}

/// `/v1/batch`, `/v1/import`, `/v1/b`.
pub async fn batch(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    accept_segment(&app, None, &parts.headers, body).await
}

/// The Segment API's path through the pipeline: a single call of type `kind`, or a batch.
pub(super) async fn accept_segment(
    app: &App,
    kind: Option<MessageType>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received_at = app.clock.now();
    let header_source = app.header_source(headers)?;
    if let Some(source) = &header_source {
        note_source(source);
    }
    let body = read_body(body, app.limits.max_request_bytes)
        .await
        .map_err(|e| refused(header_source.as_deref(), kind, 1, e))?;
    ingest_segment(app, kind, header_source, &body, received_at).await
}

/// Ingests a Segment API body (a single call of type `kind`, or a batch): validation,
/// the source (the header's, else the body's `writeKey`), dedupe, tracking plan, durable
/// storage. Source functions hand their messages here as one batch.
pub(super) async fn ingest_segment(
    app: &App,
    kind: Option<MessageType>,
    header_source: Option<Arc<str>>,
    body: &[u8],
    received_at: chrono::DateTime<chrono::Utc>,
) -> Result<Response, ApiError> {
    let request = match kind {
        Some(kind) => segment::parse_single(body, kind, received_at),
        None => segment::parse_batch(body, &app.limits, received_at),
    }
    .map_err(|e| refused(header_source.as_deref(), kind, 1, e.into()))?;
    // Recorded once: a span field recorded twice is logged twice.
    let from_body = header_source.is_none();
    let source = app.source(header_source, request.write_key())?;
    if from_body {
        note_source(&source);
    }
    let records = request
        .encode(&source, &app.limits)
        .map_err(|e| refused(Some(&source), kind, request.len(), e.into()))?;
    // Duplicates are answered like everything else (as Segment does): dropped, not refused.
    app.store_new(&source, records).await?;
    Ok(success())
}

/// `/v1/m`: the browser library's own telemetry. Accepted and dropped.
pub async fn client_metrics() -> Response {
    success()
}

/// `POST /event/batch` (seed 001): each item accepted or refused on its own, with a
/// per-item report.
pub async fn event_batch(
    State(app): State<Arc<App>>,
    request: Request,
) -> Result<Response, ApiError> {
    let received_at = app.clock.now();
    let (parts, body) = request.into_parts();
    let source = app
        .header_source(&parts.headers)?
        .ok_or(ApiError::Unauthorized("missing write key"))?;
    note_source(&source);
    let body = read_body(body, app.limits.max_request_bytes)
        .await
        .map_err(|e| refused(Some(&source), None, 1, e))?;
    let items = seed::parse_event_batch(&body, &app.limits)
        .map_err(|e| refused(Some(&source), None, 1, e.into()))?;
    let mut records = RecordBatch::with_capacity(body.len() + 160 * items.len());
    let mut report =
        seed::encode_event_batch(&items, &source, received_at, &app.limits, &mut records);
    let refused_items = report.iter().filter(|r| !r.success).map(|r| r.kind);
    let refused_count = crate::metrics::rejected_items(&source, refused_items);
    if refused_count > 0 {
        // The items' messages can quote their values: the client has them in the answer.
        tracing::warn!(source = %source, refused = refused_count, "event batch items refused");
    }
    let duplicate = app.store_new(&source, records).await?;
    for item in &mut report {
        if item.record.is_some_and(|r| duplicate[r]) {
            item.processed = false;
        }
    }
    let answer = EventBatchAnswer {
        success: true,
        total: report.len(),
        processed: report.iter().filter(|r| r.processed).count(),
        errors: report.iter().filter(|r| !r.success).count(),
        batch: &report,
    };
    Ok(json_response(&answer))
}

/// `POST /api/v1/event` (seed 000): one event; errors in the seed's `{"message"}` shape.
pub async fn person_event(State(app): State<Arc<App>>, request: Request) -> Response {
    let result = async {
        let received_at = app.clock.now();
        let (parts, body) = request.into_parts();
        let source = app
            .header_source(&parts.headers)?
            .ok_or(ApiError::Unauthorized("missing write key"))?;
        note_source(&source);
        let body = read_body(body, app.limits.max_request_bytes)
            .await
            .map_err(|e| refused(Some(&source), None, 1, e))?;
        let mut records = RecordBatch::with_capacity(body.len() + 160);
        let message_id =
            seed::encode_person_event(&body, &source, received_at, &app.limits, &mut records)
                .map_err(|e| refused(Some(&source), None, 1, e.into()))?;
        if app.store_new(&source, records).await?[0] {
            return Err(ApiError::Duplicate(message_id));
        }
        Ok::<_, ApiError>(message_id)
    }
    .await;
    match result {
        Ok(id) => json_response(&json!({ "success": true, "messageId": id })),
        Err(e) => e.respond_with(&json!({ "message": e.rejection().message })),
    }
}

/// Liveness: the process answers.
pub async fn health() -> Response {
    ([(CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}

/// Readiness: ingest can store (the queue's disk and budget have room), so a load
/// balancer sends traffic elsewhere while it cannot, and back once it can.
pub async fn ready(State(app): State<Arc<App>>) -> Response {
    match app.queue.readiness() {
        Ok(()) => (
            [(CONTENT_TYPE, "application/json")],
            r#"{"status":"ready"}"#,
        )
            .into_response(),
        Err(reason) => ApiError::NotReady {
            retry_after: app.retry_after,
            reason,
        }
        .into_response(),
    }
}

impl App {
    /// The source named by the request's auth header; `None` when there is no header.
    pub(super) fn header_source(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, ApiError> {
        match auth::credential(headers) {
            Credential::Missing => Ok(None),
            Credential::Key(key) => self
                .sources
                .load()
                .authenticate(&key)
                .map(Some)
                .ok_or(ApiError::Unauthorized("unknown write key")),
            Credential::Malformed(why) => Err(ApiError::Unauthorized(why)),
        }
    }

    /// The header's source, else the one named by the body's `writeKey`.
    fn source(
        &self,
        from_header: Option<Arc<str>>,
        body_key: Option<&str>,
    ) -> Result<Arc<str>, ApiError> {
        match (from_header, body_key) {
            (Some(source), _) => Ok(source),
            (None, Some(key)) => self
                .sources
                .load()
                .authenticate(key)
                .ok_or(ApiError::Unauthorized("unknown write key")),
            (None, None) => Err(ApiError::Unauthorized("missing write key")),
        }
    }

    /// Drops duplicates, stores the rest durably, then adds their keys to the dedupe
    /// window. Returns, per record, whether it was a duplicate.
    async fn store_new(
        &self,
        source: &str,
        mut records: RecordBatch,
    ) -> Result<Vec<bool>, ApiError> {
        // Counted in events, duplicates included: they cost the work of a check too.
        let quota = self.sources.load().quota(source).cloned();
        if let Some(quota) = quota {
            let events = u32::try_from(records.len()).unwrap_or(u32::MAX);
            if let Err(wait) = quota.try_acquire(events).await {
                crate::metrics::source_throttled(source, u64::from(events));
                return Err(ApiError::Throttled {
                    // Whole seconds, as the header carries them, rounded up.
                    retry_after: wait.as_secs_f64().ceil().clamp(1.0, 3600.0) as u32,
                    source: source.to_string(),
                });
            }
        }
        let reservation = self
            .dedupe
            .reserve(source, records.tags())
            .await
            .map_err(|e| ApiError::Unavailable {
                retry_after: self.retry_after,
                reason: e.to_string(),
            })?;
        let duplicate: Vec<bool> = (0..records.len())
            .map(|i| reservation.is_duplicate(i))
            .collect();
        // A suppressed subject's messages are answered as if accepted, and never stored.
        let suppressed = self
            .suppression
            .screen(records.messages().map(|(_, json)| json));
        let is_suppressed = |i: usize| suppressed.as_ref().is_some_and(|s| s[i]);
        let mut tally = EventTally::default();
        for (i, (kind, &duplicate)) in records.kinds().zip(&duplicate).enumerate() {
            if !is_suppressed(i) {
                tally.add(kind, duplicate);
            }
        }
        let suppressed_count = (0..records.len()).filter(|&i| is_suppressed(i)).count();
        // Only while someone watches the live view: (kind, type, summary, message) each.
        let watching = crate::live::watching();
        let mut watched = Vec::new();
        if watching {
            watched = live_view(&records, |i| duplicate[i].then_some("duplicate"));
        }
        records.retain(|i| !duplicate[i] && !is_suppressed(i));
        let plan = self.sources.load().plan(source).cloned();
        let mut blocked = Vec::new();
        if let Some(plan) = plan {
            (records, blocked) =
                crate::tracking_plan::apply_to_batch_off_workers(plan, source, records).await;
            for letter in &blocked {
                tally.block(letter.kind);
            }
        }
        if watching {
            watched.extend(live_view(&records, |_| Some("accepted")));
            watched.extend(blocked.iter().map(blocked_view));
        }
        // From here the messages may become durable even if the client goes away, and
        // then their keys must enter the window: a dropped request hands the rest to a
        // task of its own.
        let queue = self.queue.clone();
        let identity = self.identity.clone();
        let dead_letters = self.dead_letters.clone();
        let retry_after = self.retry_after;
        let source = source.to_owned();
        let now = self.clock.now();
        FinishAnyway::new(async move {
            let unavailable = |reason: String| ApiError::Unavailable {
                retry_after,
                reason,
            };
            // Blocked messages are kept before the rest is stored: if that fails, nothing
            // is stored, no key enters the window, and the client's retry redoes it all.
            if !blocked.is_empty() {
                let letters = plan_letters(&source, &blocked, now);
                dead_letters
                    .record(crate::tracking_plan::DEAD_LETTER_NAME, &letters, &[], now)
                    .await
                    .map_err(|e| unavailable(format!("cannot store blocked messages: {e:#}")))?;
            }
            if !records.is_empty() {
                // Before storing: what is stored after an identify is read after this.
                identity.learn(records.messages()).await;
                queue
                    .append(records)
                    .await
                    .map_err(|e| ApiError::from_queue(e, retry_after))?;
            }
            reservation.commit().await;
            tally.record(&source);
            crate::metrics::suppressed(&source, suppressed_count as u64);
            for (kind, message_type, fields, json) in watched {
                let raw = json.as_deref().map(|json| ("message", json));
                crate::live::publish(kind, Some(&source), None, message_type, fields, raw);
            }
            Ok::<_, ApiError>(())
        })
        .await?;
        Ok(duplicate)
    }
}

/// Runs a future in place; dropped before it completes (the client went away), it hands
/// what is left to a task of its own. A task for every request would cost a spawn and a
/// wake-up each time; this costs them only when a client leaves mid-way.
struct FinishAnyway<F: Future<Output: Send> + Send + 'static> {
    rest: Option<Pin<Box<F>>>,
}

impl<F: Future<Output: Send> + Send + 'static> FinishAnyway<F> {
    fn new(future: F) -> Self {
        FinishAnyway {
            rest: Some(Box::pin(future)),
        }
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for FinishAnyway<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let rest = self.rest.as_mut().expect("polled after it completed");
        let output = std::task::ready!(rest.as_mut().poll(cx));
        self.rest = None;
        Poll::Ready(output)
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for FinishAnyway<F> {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            // Without a runtime (the process is ending) there is nothing to finish on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(rest);
            }
        }
    }
}

/// Counts the messages of a request refused for what it sent, once its source is known;
/// `messages` is 1 when they could not be counted. Returns the error.
fn refused(
    source: Option<&str>,
    kind: Option<MessageType>,
    messages: usize,
    error: ApiError,
) -> ApiError {
    if let (Some(source), ApiError::Invalid(_) | ApiError::TooLarge { .. }) = (source, &error) {
        crate::metrics::rejected(source, kind, messages as u64);
    }
    error
}

/// Collects the (decoded) body, refusing more than `limit` bytes. A UTF-8 byte-order
/// mark in front of the JSON (some HTTP stacks add one) is dropped.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            if bytes.starts_with(BOM) {
                Ok(bytes.slice(BOM.len()..))
            } else {
                Ok(bytes)
            }
        }
        Err(e) if cause::<LengthLimitError>(e.as_ref()).is_some() => {
            Err(ApiError::TooLarge { limit })
        }
        Err(e) => match cause::<BodyCut>(e.as_ref()) {
            Some(&why) => Err(ApiError::BodyTimeout(why)),
            None => Err(ApiError::Invalid(Rejection::new(
                "unreadable_body",
                format!("could not read the request body (bad gzip/deflate data?): {e}"),
            ))),
        },
    }
}

/// The first error of type `E` in `e`'s chain of sources.
fn cause<'e, E: StdError + 'static>(mut e: &'e (dyn StdError + 'static)) -> Option<&'e E> {
    loop {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        e = e.source()?;
    }
}

/// The live view's events for a request's messages, published once they are stored:
/// (kind, type, fields, the message unless a duplicate). `kind_of(index)` names each
/// record's event, or leaves it out.
fn live_view(
    records: &RecordBatch,
    kind_of: impl Fn(usize) -> Option<&'static str>,
) -> Vec<LiveMessage> {
    let bytes = records.bytes();
    records
        .framed()
        .zip(records.kinds())
        .enumerate()
        .filter_map(|(index, ((range, _), message_type))| {
            let kind = kind_of(index)?;
            let json = match crate::queue::record::read_record(&mut &bytes[range]) {
                Ok(crate::queue::record::ReadOutcome::Record { json, .. }) => json,
                _ => return None,
            };
            let (fields, _) = crate::live::summary(&json);
            // A duplicate was shown whole when it was accepted.
            let json = (kind != "duplicate").then_some(json);
            Some((kind, Some(message_type), fields, json))
        })
        .collect()
}

/// A message the tracking plan blocked, for the live view: with its violations.
fn blocked_view(blocked: &crate::tracking_plan::Blocked) -> LiveMessage {
    let (mut fields, _) = crate::live::summary(&blocked.json);
    if let Some(object) = fields.as_object_mut() {
        object.insert("violations".into(), json!(blocked.violations));
    }
    (
        "blocked",
        Some(blocked.kind),
        fields,
        Some(blocked.json.clone()),
    )
}

/// Dead letters of the source for messages its plan blocked: reason `tracking_plan`, the
/// schema errors as the response.
fn plan_letters(
    source: &str,
    blocked: &[crate::tracking_plan::Blocked],
    at: chrono::DateTime<chrono::Utc>,
) -> Vec<NewLetter> {
    blocked
        .iter()
        .map(|b| {
            let failure = Failure {
                reason: Reason::Refused(crate::tracking_plan::DEAD_LETTER_NAME.into()),
                status: None,
                response: json!({ "violations": b.violations }).to_string(),
                attempts: 0,
                first_attempt_at: at,
            };
            (source.to_string(), b.json.clone(), Arc::new(failure))
        })
        .collect()
}

type LiveMessage = (
    &'static str,
    Option<MessageType>,
    serde_json::Value,
    Option<Vec<u8>>,
);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::FinishAnyway;

    #[tokio::test]
    async fn work_dropped_midway_is_finished_in_a_task() {
        let (gate, at_gate) = oneshot::channel::<()>();
        let (finished, was_finished) = oneshot::channel();
        let mut work = FinishAnyway::new(async move {
            at_gate.await.expect("the gate opens");
            finished.send(()).expect("the test waits");
        });
        let waited = tokio::time::timeout(Duration::from_millis(10), &mut work).await;
        assert!(waited.is_err(), "it waits at the gate");
        drop(work);
        gate.send(()).expect("the work still waits at the gate");
        tokio::time::timeout(Duration::from_secs(5), was_finished)
            .await
            .expect("finished after its caller went away")
            .expect("the work ran to its end");
    }

    #[tokio::test]
    async fn work_run_to_its_end_answers_in_place() {
        let answer = FinishAnyway::new(async { 7 }).await;
        assert_eq!(answer, 7);
    }
}
