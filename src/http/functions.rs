//! `POST`/`GET /v1/functions/{writeKey}`: a source function's webhook. The key in the
//! path names the source (Basic/Bearer auth too); its `onRequest` turns the request into
//! messages, ingested as one `/v1/batch` of that source before the answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use http::header::HOST;

use super::handlers::{ingest_segment, read_body};
use super::{ApiError, App};
use crate::functions::{FailureKind, RawRequest};
use crate::ingest::Rejection;
use crate::throttle::LogThrottle;

/// One log line per interval about failing source functions: a webhook retried in a loop
/// must not flood the logs.
static FAILURE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

pub async fn source_function(
    State(app): State<Arc<App>>,
    Path(write_key): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let received_at = app.clock.now();
    let (parts, body) = request.into_parts();
    // The path's key first: a webhook sender may put its own token in Authorization.
    let from_path = app.sources.load().authenticate(&write_key);
    let source = match from_path {
        Some(source) => source,
        None => app
            .header_source(&parts.headers)?
            .ok_or(ApiError::Unauthorized("unknown write key"))?,
    };
    let Some(function) = app.sources.load().function(&source).cloned() else {
        return Err(ApiError::Invalid(Rejection::new(
            "no_function",
            format!("source `{source}` has no function (sources[].function)"),
        )));
    };
    let body = read_body(body, app.limits.max_request_bytes).await?;
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let Ok(value) = value.to_str() else { continue };
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    let host = headers
        .get(HOST.as_str())
        .map_or("localhost", String::as_str);
    let url = format!("http://{host}{}", parts.uri);
    let raw = RawRequest {
        method: parts.method.as_str(),
        url,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
    };
    let emitted = match function.run(&raw).await {
        Ok(emitted) => emitted,
        Err(failure) => {
            let message = failure.message;
            return Err(match failure.kind {
                FailureKind::Invalid => {
                    ApiError::Invalid(Rejection::new("validation_error", message))
                }
                FailureKind::NotSupported => {
                    ApiError::Invalid(Rejection::new("event_not_supported", message))
                }
                FailureKind::Timeout => ApiError::FunctionTimeout(format!(
                    "{}: onRequest ran over its time limit",
                    function.file
                )),
                FailureKind::Retry | FailureKind::Error => {
                    // The function's error and stack; never the request body.
                    if FAILURE_LOG.ready() {
                        tracing::warn!(
                            source = %source,
                            file = %function.file,
                            error = %message,
                            stack = failure.stack.as_deref().unwrap_or(""),
                            "source function failed"
                        );
                    }
                    ApiError::Internal(format!("the source function failed: {message}"))
                }
            });
        }
    };
    if emitted.sets > 0 {
        tracing::info!(source = %source, sets = emitted.sets,
            "source function called Segment.set, which fanout does not store");
    }
    if emitted.messages.is_empty() {
        return Ok(super::handlers::success());
    }
    let batch = serde_json::to_vec(&serde_json::json!({ "batch": emitted.messages }))
        .expect("JSON values serialize");
    ingest_segment(&app, None, Some(source), &batch, received_at)
        .await
        .map_err(|e| match e {
            ApiError::Invalid(mut r) => {
                r.message = format!("a message onRequest emitted was refused: {}", r.message);
                ApiError::Invalid(r)
            }
            e => e,
        })
}
