//! A destination's insert function (`insert_function`): run on each message of a batch
//! before the destination sees it. It returns the message to send (changed or not),
//! `null`/`undefined` to skip it for this destination (reason `insert_function`), or
//! throws: `RetryError`, a `fetch` network error or the time limit are tried again with
//! the destination's backoff; `EventNotSupported` or a missing handler skip it
//! (`event_not_supported`); anything else dead-letters it (reason `insert_function`).

use serde_json::Value;
use tokio::time::Instant;

use super::context::DeliveryContext;
use crate::destinations::handler_of;
use crate::functions::{FailureKind, Outcome, Sandboxed};
use crate::queue::dead_letters::{Failure, Reason};

/// What became of one message.
pub(super) enum Inserted {
    /// Send this (the function's answer, as JSON).
    Send(Vec<u8>),
    Skip(&'static str),
    Dead(Failure),
    /// Shutdown came first; the message is still owed.
    Stopped,
}

pub(super) async fn apply(context: &DeliveryContext, insert: &Sandboxed, json: &[u8]) -> Inserted {
    let function = &insert.function;
    let Some(handler) = handler_of(json).filter(|h| function.has(h)) else {
        return Inserted::Skip("event_not_supported");
    };
    let event = String::from_utf8_lossy(json).into_owned();
    let first = Instant::now();
    let first_wall = context.clock.now();
    let mut stop = context.stop.clone();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = function
            .call(handler, vec![event.clone(), insert.settings.clone()])
            .await;
        let dead = |reason: Reason, response: String| {
            Inserted::Dead(Failure {
                reason,
                status: None,
                response,
                attempts,
                first_attempt_at: first_wall,
            })
        };
        let failure = match outcome {
            Outcome::Returned(Value::Null) => return Inserted::Skip("insert_function"),
            Outcome::Returned(message @ Value::Object(_)) => {
                // serde_json writes U+2028/2029 raw: stored messages stay one line each.
                let mut json = message.to_string().into_bytes();
                crate::json::keep_on_one_line(&mut json, 0);
                return Inserted::Send(json);
            }
            Outcome::Returned(other) => {
                let what = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    _ => "a number or boolean",
                };
                return dead(
                    Reason::Refused("insert_function".into()),
                    format!("{handler} returned {what}, not a message"),
                );
            }
            Outcome::Failed(failure) => failure,
        };
        let response = match &failure.stack {
            Some(stack) => format!("{}\n{stack}", failure.message),
            None => failure.message.clone(),
        };
        match failure.kind {
            FailureKind::NotSupported => return Inserted::Skip("event_not_supported"),
            FailureKind::Invalid | FailureKind::Error => {
                return dead(Reason::Refused("insert_function".into()), response)
            }
            FailureKind::Retry | FailureKind::Timeout => {}
        }
        let now = Instant::now();
        if context.policy.exhausted(attempts, first, now) {
            return dead(Reason::RetriesExhausted, response);
        }
        let delay = context.policy.backoff.delay(attempts, None);
        tracing::warn!(
            destination = %context.name,
            attempts,
            retry_in_ms = delay.as_millis() as u64,
            error = %failure.message,
            "insert function failed; will retry"
        );
        tokio::select! {
            _ = tokio::time::sleep_until(now + delay) => {}
            _ = stop.wait_for(|&s| s) => return Inserted::Stopped,
        }
    }
}

/// Shows the live view the message before and after the insert function (`inserted`);
/// what is sent follows as the destination's outcome.
pub(super) fn tell_inserted(context: &DeliveryContext, source: &str, before: &[u8], after: &[u8]) {
    if !crate::live::watching() {
        return;
    }
    let (mut fields, message_type) = crate::live::summary(before);
    fields["before"] = serde_json::from_slice(before).unwrap_or(Value::Null);
    fields["after"] = serde_json::from_slice(after).unwrap_or(Value::Null);
    crate::live::publish(
        "inserted",
        Some(source),
        Some(&context.name),
        message_type,
        fields,
        None,
    );
}
