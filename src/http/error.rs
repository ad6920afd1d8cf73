//! Every way a request can fail, mapped to a status and the JSON error body
//! `{"success":false,"error":{"code","message","field"?,"index"?}}`.

use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use serde::Serialize;

use crate::ingest::Rejection;
use crate::queue::QueueError;

#[derive(Debug)]
pub enum ApiError {
    /// Invalid input: 400.
    Invalid(Rejection),
    /// Body over the request limit (on the wire or decoded): 413.
    TooLarge {
        limit: usize,
    },
    /// Missing or unknown write key: 401.
    Unauthorized(&'static str),
    /// Content-Encoding fanout cannot decode: 415.
    UnsupportedEncoding,
    /// The body stalled, took too long, or was cut to free its slot: 408.
    BodyTimeout(super::BodyCut),
    /// Too many requests in flight: 429 + Retry-After.
    Overloaded {
        retry_after: u32,
    },
    /// The request's source is over its quota (`sources[].rate_limit`): 429 +
    /// Retry-After, the seconds until its bucket holds the request's events.
    Throttled {
        retry_after: u32,
        source: String,
    },
    /// The queue could not store the messages: 503 + Retry-After. Nothing was accepted.
    Unavailable {
        retry_after: u32,
        reason: String,
    },
    /// The queue did not confirm storing them (sent, no acknowledgement): 503 +
    /// Retry-After. They may be stored; a retry with the same messageIds is stored once.
    Uncertain {
        retry_after: u32,
        reason: String,
    },
    /// `/ready`: ingest cannot store now (full disk, full budget): 503 + Retry-After.
    NotReady {
        retry_after: u32,
        reason: String,
    },
    /// `/api/v1/event` only: the messageId was already accepted: 409.
    Duplicate(String),
    NotFound,
    MethodNotAllowed,
    /// A source function ran over its time limit: 504.
    FunctionTimeout(String),
    /// A store fanout depends on failed: 500.
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::FunctionTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Overloaded { .. } | ApiError::Throttled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable { .. }
            | ApiError::Uncertain { .. }
            | ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Duplicate(_) => StatusCode::CONFLICT,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The rejection this error reports: code, message and location.
    pub fn rejection(&self) -> Rejection {
        match self {
            ApiError::Invalid(r) => r.clone(),
            ApiError::TooLarge { limit } => Rejection::new(
                "request_too_large",
                format!("request body exceeds {limit} bytes (limits.max_request_bytes)"),
            ),
            ApiError::Unauthorized(why) => Rejection::new("unauthorized", *why),
            ApiError::Internal(why) => Rejection::new("internal", why.clone()),
            ApiError::FunctionTimeout(why) => Rejection::new("function_timeout", why.clone()),
            ApiError::UnsupportedEncoding => Rejection::new(
                "unsupported_encoding",
                "Content-Encoding must be gzip, deflate or identity",
            ),
            ApiError::BodyTimeout(why) => {
                Rejection::new("body_timeout", format!("{why}; send it again"))
            }
            ApiError::Overloaded { .. } => {
                Rejection::new("overloaded", "too many requests in flight; retry later")
            }
            ApiError::Throttled {
                retry_after,
                source,
            } => Rejection::new(
                "rate_limited",
                format!(
                    "source `{source}` is over its rate limit (sources[].rate_limit); retry                      after {retry_after} s"
                ),
            ),
            ApiError::Unavailable { reason, .. } => Rejection::new(
                "unavailable",
                format!("messages were not stored: {reason}; retry later"),
            ),
            ApiError::Uncertain { reason, .. } => Rejection::new(
                "unavailable",
                format!(
                    "the outcome is unknown, messages may or may not have been stored: \
                     {reason}; retry later with the same messageIds (those stored are \
                     not stored twice)"
                ),
            ),
            ApiError::NotReady { reason, .. } => Rejection::new("not_ready", reason.clone()),
            ApiError::Duplicate(id) => Rejection::field(
                "duplicate",
                "messageId",
                format!("messageId {id} was already accepted"),
            ),
            ApiError::NotFound => Rejection::new("not_found", "no such endpoint"),
            ApiError::MethodNotAllowed => {
                Rejection::new("method_not_allowed", "method not allowed here")
            }
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded { retry_after }
            | ApiError::Throttled { retry_after, .. }
            | ApiError::Unavailable { retry_after, .. }
            | ApiError::Uncertain { retry_after, .. }
            | ApiError::NotReady { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Renders with a custom body (the seed APIs have their own error shape).
    pub fn respond_with(&self, body: &impl Serialize) -> Response {
        let body = serde_json::to_string(body).expect("error bodies serialize");
        let mut response =
            (self.status(), [(CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self.log_entry());
        response
    }

    /// What the request log says about this error (see `ErrorLog`).
    fn log_entry(&self) -> ErrorLog {
        let rejection = self.rejection();
        let server_side = matches!(
            self,
            ApiError::Internal(_)
                | ApiError::FunctionTimeout(_)
                | ApiError::Unavailable { .. }
                | ApiError::Uncertain { .. }
                | ApiError::NotReady { .. }
        );
        ErrorLog {
            code: rejection.code,
            field: rejection.field,
            index: rejection.index,
            reason: server_side.then_some(rejection.message),
        }
    }

    pub fn from_queue(e: QueueError, retry_after: u32) -> ApiError {
        match e {
            QueueError::Uncertain(_) => ApiError::Uncertain {
                retry_after,
                reason: e.to_string(),
            },
            e => ApiError::Unavailable {
                retry_after,
                reason: e.to_string(),
            },
        }
    }
}

/// Rides on an error answer to the request log: the code and where, and for fanout's own
/// failures (5xx) the reason. Never a client error's message, which can quote the
/// client's values (a bad `type`, a serde error), and so personal data.
#[derive(Debug, Clone)]
pub struct ErrorLog {
    pub code: &'static str,
    pub field: Option<String>,
    pub index: Option<usize>,
    pub reason: Option<String>,
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError::Invalid(r)
    }
}

/// `{"success":false,"error":{…}}`, fields in this order.
#[derive(Serialize)]
struct ErrorBody {
    success: bool,
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Rejection {
            code,
            message,
            field,
            index,
        } = self.rejection();
        self.respond_with(&ErrorBody {
            success: false,
            error: ErrorDetail {
                code,
                message,
                field,
                index,
            },
        })
    }
}
