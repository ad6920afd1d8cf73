//! Operator endpoints, behind a bearer token from `[admin] token_env`: list dead letters
//! and mark them for replay. Without a token configured they do not exist (404).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{ApiError, App};
use crate::delivery::Changes;
use crate::ingest::Rejection;
use crate::message::{MessageType, Stamp, Tag};
use crate::queue::RecordBatch;
use crate::tracking_plan::{Verdict, DEAD_LETTER_NAME};
use serde_json::Value;

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    destination: Option<String>,
    limit: Option<usize>,
}

/// Checks the bearer token in constant time.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    authorize_token(app, bearer(headers).unwrap_or_default())
}

/// The `Authorization: Bearer` token, if one was sent.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is the admin token (404 when there is none, as if the route did not
/// exist).
pub(super) fn authorize_token(app: &App, given: &str) -> Result<(), ApiError> {
    let Some(token) = &app.admin_token else {
        return Err(ApiError::NotFound);
    };
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "admin endpoints need `Authorization: Bearer <admin token>`",
        ))
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::Internal(format!("dead-letter store: {e:#}"))
}

/// `GET /admin/dead-letters?destination=NAME&limit=N`
pub async fn list_dead_letters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let limit = query.limit.unwrap_or(1000).min(100_000);
    let letters = app
        .dead_letters
        .list(query.destination.as_deref(), limit)
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "dead_letters": letters })).into_response())
}

/// `POST /admin/dead-letters/replay?destination=NAME`
pub async fn replay_dead_letters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let Some(destination) = query.destination else {
        return Err(ApiError::Invalid(Rejection::field(
            "missing_field",
            "destination",
            "name the destination: ?destination=NAME",
        )));
    };
    if destination == DEAD_LETTER_NAME {
        return replay_blocked(&app).await;
    }
    let replayed = app
        .dead_letters
        .request_replay(&destination)
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "replayed": replayed })).into_response())
}

/// Messages a tracking plan blocked, taken in again after the plan was fixed: each goes
/// through its source's plan as it is now; those it lets through are appended to the log
/// (with their messageIds, no dedupe key) and their letters removed, the others stay.
async fn replay_blocked(app: &App) -> Result<Response, ApiError> {
    /// Letters stored (and removed) per round.
    const ROUND: usize = 500;
    let letters = app
        .dead_letters
        .list(Some(DEAD_LETTER_NAME), 1_000_000)
        .await
        .map_err(internal)?;
    let (mut replayed, mut still_blocked) = (0, 0);
    let accepted_at = app.clock.now().timestamp().clamp(0, i64::from(u32::MAX)) as u32;
    for round in letters.chunks(ROUND) {
        let sources = app.sources.load();
        let mut by_source: Vec<(&str, RecordBatch)> = Vec::new();
        let mut done = Vec::new();
        for letter in round {
            let Ok(mut message) = serde_json::from_str::<Value>(letter.message.get()) else {
                continue;
            };
            if let Some(plan) = sources.plan(&letter.source) {
                if let Verdict::Blocked { .. } = plan.apply(&mut message) {
                    // It keeps its letter, with the violations it was blocked for.
                    still_blocked += 1;
                    continue;
                }
            }
            let kind = message
                .get("type")
                .and_then(Value::as_str)
                .and_then(MessageType::parse)
                .unwrap_or(MessageType::Track);
            let json = serde_json::to_vec(&message).expect("a Value serializes");
            let stamp = Stamp {
                tag: Tag {
                    key: [0; 3],
                    accepted_at,
                },
                user: crate::routing::user_key(&json),
            };
            let at = match by_source.iter().position(|(s, _)| *s == letter.source) {
                Some(at) => at,
                None => {
                    by_source.push((&letter.source, RecordBatch::with_capacity(64 * 1024)));
                    by_source.len() - 1
                }
            };
            let _ = by_source[at].1.push_with(&letter.source, kind, |out| {
                out.extend_from_slice(&json);
                Ok::<_, std::convert::Infallible>(stamp)
            });
            done.push(letter.id);
        }
        for (_, records) in by_source {
            replayed += records.len();
            app.queue
                .append(records)
                .await
                .map_err(|e| ApiError::from_queue(e, app.retry_after))?;
        }
        // Stored first: a failure here repeats these messages at the next replay rather
        // than losing them.
        app.dead_letters.remove(done).await.map_err(internal)?;
    }
    tracing::info!(replayed, still_blocked, "blocked messages replayed");
    Ok(
        Json(serde_json::json!({ "replayed": replayed, "still_blocked": still_blocked }))
            .into_response(),
    )
}

/// A reload asked for over HTTP; the server answers on `reply`.
pub struct ReloadRequest {
    pub purge: bool,
    pub reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

/// What a reload did, or why it was refused.
pub type ReloadOutcome = Result<Reloaded, String>;

#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    pub sources: usize,
    #[serde(flatten)]
    pub destinations: Changes,
    /// Sections that changed but only take effect at a restart.
    pub restart_needed: Vec<&'static str>,
    /// Destinations no longer configured whose cursors still hold queued data.
    pub unpurged: Vec<String>,
    pub purged: Vec<String>,
}

#[derive(Deserialize)]
pub struct ReloadQuery {
    #[serde(default)]
    purge: bool,
}

/// `POST /admin/reload[?purge=true]`: the same reload as SIGHUP, answered with what
/// changed (200) or why the new config was refused (400; the old one keeps running).
pub async fn reload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<ReloadQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = ReloadRequest {
        purge: query.purge,
        reply,
    };
    let gone = || ApiError::Internal("the server is shutting down".into());
    app.reload.send(request).await.map_err(|_| gone())?;
    match answer.await.map_err(|_| gone())? {
        // Partly applied: the new write keys are live, and some destination did not start.
        Ok(done) if !done.destinations.failed.is_empty() => Ok((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "reloaded": "partly", "changes": done })),
        )
            .into_response()),
        Ok(done) => {
            Ok(Json(serde_json::json!({ "reloaded": true, "changes": done })).into_response())
        }
        Err(reason) => Err(ApiError::Invalid(Rejection::new("invalid_config", reason))),
    }
}
