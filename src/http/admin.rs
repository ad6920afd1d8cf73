//! Operator endpoints, behind a bearer token from `[admin] token_env`: dead letters (list,
//! replay, and take in again what a tracking plan blocked), replay from the retained log,
//! and reload. Without a token configured they do not exist (404).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::query::Query;
use super::{ApiError, App};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::control::{Control, ReloadRequest, ReplayRefused, ReplayRequest};
use crate::ingest::Rejection;
use crate::queue::dead_letters::MAX_PAGE;
use crate::tracking_plan::{RetakeError, DEAD_LETTER_NAME};

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    destination: Option<String>,
}

/// Checks the bearer token in constant time.
pub(super) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
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

/// A query parameter the endpoint cannot go without: 400 naming it, with a hint.
fn required(value: Option<String>, field: &str, hint: &str) -> Result<String, ApiError> {
    value.ok_or_else(|| ApiError::Invalid(Rejection::field("missing_field", field, hint)))
}

/// The `?destination=NAME` both replay endpoints need.
fn required_destination(value: Option<String>) -> Result<String, ApiError> {
    required(
        value,
        "destination",
        "name the destination: ?destination=NAME",
    )
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::Internal(format!("dead-letter store: {e:#}"))
}

/// `?destination=NAME&limit=N&after=ID` of the listing.
#[derive(Deserialize)]
pub struct DeadLetterPageQuery {
    destination: Option<String>,
    limit: Option<usize>,
    after: Option<i64>,
}

/// `GET /admin/dead-letters?destination=NAME&limit=N&after=ID`: one page, oldest first,
/// with `next`, the `after` of the next page (null on the last). Paged because a page is
/// held in memory whole.
pub async fn list_dead_letters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<DeadLetterPageQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let limit = query.limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(Rejection::field(
            "invalid_field",
            "limit",
            format!("limit is 1 to {MAX_PAGE}; follow `next` (as ?after=) for more"),
        )));
    }
    let page = app
        .dead_letters
        .list(
            query.destination.as_deref(),
            query.after.unwrap_or(0),
            limit,
        )
        .await
        .map_err(internal)?;
    Ok(Json(page).into_response())
}

/// `POST /admin/dead-letters/replay?destination=NAME`
pub async fn replay_dead_letters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let destination = required_destination(query.destination)?;
    if destination == DEAD_LETTER_NAME {
        return replay_blocked(&app).await;
    }
    let replayed = app
        .dead_letters
        .request_replay(&destination, app.clock.now())
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "replayed": replayed })).into_response())
}

/// `?destination=tracking_plan`: what tracking plans blocked, taken in again.
async fn replay_blocked(app: &App) -> Result<Response, ApiError> {
    let sources = app.sources.load_full();
    let retaken = crate::tracking_plan::retake_blocked(
        &app.queue,
        &app.dead_letters,
        |source: &str| sources.plan(source).cloned(),
        app.clock.now(),
    )
    .await
    .map_err(|e| match e {
        RetakeError::Store(e) => internal(e),
        RetakeError::Queue(e) => ApiError::from_queue(e, app.retry_after),
    })?;
    Ok(Json(serde_json::json!({
        "replayed": retaken.replayed,
        "still_blocked": retaken.still_blocked,
    }))
    .into_response())
}

/// Hands the server's control loop a request made with a reply channel, and waits for
/// the answer.
async fn ask<T>(
    app: &App,
    request: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Control,
) -> Result<T, ApiError> {
    let gone = || ApiError::Internal("the server is shutting down".into());
    let (reply, answer) = tokio::sync::oneshot::channel();
    app.control.send(request(reply)).await.map_err(|_| gone())?;
    answer.await.map_err(|_| gone())
}

#[derive(Deserialize)]
pub struct ReplayQuery {
    destination: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// `POST /admin/replay?destination=NAME&since=RFC3339[&until=RFC3339]`: that destination
/// reads the retained log again from the first message accepted at or after `since`.
pub async fn replay(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(query): Query<ReplayQuery>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers)?;
    let destination = required_destination(query.destination)?;
    let time = |field: &str, text: &str| {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                ApiError::Invalid(Rejection::field(
                    "invalid_time",
                    field,
                    format!("`{text}` is not an RFC 3339 time (e.g. 2026-11-29T10:00:00Z): {e}"),
                ))
            })
    };
    let since = required(
        query.since,
        "since",
        "say from when: ?since=2026-11-29T10:00:00Z",
    )?;
    let since = time("since", &since)?;
    let until = match query.until {
        Some(until) => Some(time("until", &until)?),
        None => None,
    };
    if until.is_some_and(|until| until < since) {
        return Err(ApiError::Invalid(Rejection::field(
            "invalid_time",
            "until",
            "`until` is before `since`",
        )));
    }
    let asked = ask(&app, |reply| {
        Control::Replay(ReplayRequest {
            destination: destination.clone(),
            since,
            until,
            reply,
        })
    });
    match asked.await? {
        Ok(messages) => Ok(Json(serde_json::json!({
            "destination": destination,
            "since": since.to_rfc3339_opts(SecondsFormat::Secs, true),
            "messages": messages,
        }))
        .into_response()),
        Err(ReplayRefused::UnknownDestination(name)) => Err(ApiError::Invalid(Rejection::field(
            "unknown_destination",
            "destination",
            format!("no running destination `{name}`"),
        ))),
        Err(ReplayRefused::NotRetained { oldest }) => {
            let message = match oldest {
                Some(oldest) => format!(
                    "the log no longer holds messages accepted at {}; the oldest available \
                     was accepted at {} (server.retention keeps more)",
                    since.to_rfc3339_opts(SecondsFormat::Secs, true),
                    oldest.to_rfc3339_opts(SecondsFormat::Secs, true)
                ),
                None => "the log holds no messages (server.retention keeps them)".into(),
            };
            Err(ApiError::Invalid(Rejection::field(
                "not_retained",
                "since",
                message,
            )))
        }
        Err(ReplayRefused::Failed(e)) => Err(ApiError::Internal(format!("replay failed: {e:#}"))),
    }
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
    let asked = ask(&app, |reply| {
        Control::Reload(ReloadRequest {
            purge: query.purge,
            reply,
        })
    });
    match asked.await? {
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
