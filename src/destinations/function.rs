//! `kind = "function"`: a Segment destination function (`onTrack(event, settings)`, …)
//! run in fanout's JavaScript runtime (`crate::functions`). By default one message per
//! call. With `batch.max_events` above 1, a file that defines `onBatch(events, settings)`
//! gets each batch in one call and may settle each event by a returned
//! `{status, errormessage}`; otherwise the batch's messages call their handlers in turn.
//! A handler that returns delivers the message; `RetryError`, a `fetch` network error or
//! the time limit retry it with the destination's backoff (and, calling message by
//! message, the rest of the batch after it, so that order holds and nothing delivered
//! goes again); a missing handler or `EventNotSupported` skips it
//! (`event_not_supported`); `ValidationError`, `InvalidEventPayload` or any other error
//! dead-letters it with the error's message and stack.

use std::borrow::Cow;
use std::path::Path;

use serde::Deserialize;

use super::{
    delete_message, AnyDestination, BatchShape, Check, Destination, DestinationConfig, EraseError,
    Erasing, Erasure, KeyError, Kind, Outgoing, Refusal, RefusalKind, SendError, Sending, Subject,
};
use crate::clock::Clock;
use crate::functions::{self, FailureKind, Function, FunctionSandbox, Outcome, Sandboxed};
use crate::queue::Checkpoint;

/// `kind = "function"`'s own keys: `file`, `settings`, `allow_hosts`, `fetch_hosts`,
/// `memory_limit`, as every function's sandbox has them. The shared `timeout` is the
/// per-call time limit (default 5 s).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct FunctionConfig {
    pub function: FunctionSandbox,
}

impl Kind for FunctionConfig {
    const NAME: &'static str = "function";
    // Sent like an HTTP destination: concurrency, ordering, retry, rate limit apply.
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        self.function
            .validate()
            .map_err(|(key, e)| KeyError::new(key, e))
    }

    fn load_files(&mut self, dir: &Path) -> Result<(), KeyError> {
        self.function
            .load(dir)
            .map_err(|e| KeyError::new("file", e))
    }

    fn batch_shape(&self) -> BatchShape {
        // One message per call unless `batch.max_events` asks for batches (for `onBatch`),
        // no larger than Segment hands `onBatch`.
        BatchShape {
            max_events: MAX_BATCH_EVENTS,
            limited_by: "the most events Segment passes to onBatch",
            ..BatchShape::new(1, 1024 * 1024, 0)
        }
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(FunctionDestination::new(config, self, clock)?))
    }
}

/// Segment's largest `onBatch` batch.
const MAX_BATCH_EVENTS: usize = 400;

pub struct FunctionDestination {
    function: Function,
    /// `settings` as JSON text, the environment's values in.
    settings: String,
    /// Batches go to `onBatch`: the file defines it and `batch.max_events` is above 1.
    on_batch: bool,
    /// The time of a delete message (`erase`).
    clock: Clock,
}

impl FunctionDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &FunctionConfig,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let Sandboxed { function, settings } = own
            .function
            .start(config.http.timeout)
            .map_err(|e| anyhow::anyhow!("destination `{}`: {e}", config.name))?;
        let batches = config.batch_limits().max_events > 1;
        let per_type = [
            "track", "identify", "page", "screen", "group", "alias", "delete",
        ]
        .into_iter()
        .filter_map(functions::handler_for)
        .any(|handler| function.has(handler));
        if function.has("onBatch") && !batches && !per_type {
            // Every message would be skipped: surely not what the file was written for.
            anyhow::bail!(
                "destination `{}`: `{}` defines only onBatch, which is called when \
                 batch.max_events is above 1 (Segment's default is 20)",
                config.name,
                own.function.file
            );
        }
        Ok(FunctionDestination {
            on_batch: batches && function.has("onBatch"),
            function,
            settings,
            clock,
        })
    }
}

/// The message's handler name, if its type has one.
pub fn handler_of(message: &[u8]) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<Cow<'a, str>>,
    }
    let typed: Typed<'_> = serde_json::from_slice(message).ok()?;
    functions::handler_for(&typed.kind?)
}

impl Destination for FunctionDestination {
    fn check(&self, message: &[u8]) -> Check {
        if self.on_batch {
            return Check::Send(None);
        }
        match handler_of(message) {
            Some(handler) if self.function.has(handler) => Check::Send(None),
            _ => Check::Skip("event_not_supported"),
        }
    }

    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move {
            let refused = if self.on_batch {
                self.call_on_batch(batch).await
            } else {
                self.call_each(batch).await
            };
            if refused.is_empty() {
                Ok(0)
            } else {
                Err(SendError::PartlyRejected { refused })
            }
        })
    }

    /// Calls `onDelete(event, settings)` with a Segment delete message; a file without
    /// it, or whose `onDelete` throws `EventNotSupported`, cannot delete.
    fn erase<'a>(&'a self, subject: &'a Subject) -> Erasing<'a> {
        Box::pin(async move {
            if !self.function.has("onDelete") {
                return Ok(Erasure::NotSupported);
            }
            let message = delete_message(subject, self.clock.now())?;
            let event = String::from_utf8_lossy(&message).into_owned();
            let outcome = self
                .function
                .call("onDelete", vec![event, self.settings.clone()])
                .await;
            let Outcome::Failed(failure) = outcome else {
                return Ok(Erasure::Done {
                    detail: "onDelete returned".into(),
                });
            };
            let message = format!("function onDelete: {}", failure.message);
            match failure.kind {
                FailureKind::NotSupported => Ok(Erasure::NotSupported),
                FailureKind::Retry | FailureKind::Timeout => Err(EraseError::retry(message)),
                FailureKind::Invalid | FailureKind::Error => Err(EraseError::failed(message)),
            }
        })
    }
}

impl FunctionDestination {
    /// Each message to its handler, in order; what was not delivered.
    async fn call_each(&self, batch: &[Outgoing<'_>]) -> Vec<Refusal> {
        let mut refused = Vec::new();
        for (index, message) in batch.iter().enumerate() {
            let Some(handler) = handler_of(message.json) else {
                // `check` skips these before any batch; kept so `send` never guesses.
                refused.push(Refusal {
                    index,
                    kind: RefusalKind::Skipped {
                        reason: "event_not_supported",
                    },
                    status: None,
                    detail: "no handler for the message's type".into(),
                    answer: None,
                });
                continue;
            };
            let event = String::from_utf8_lossy(message.json).into_owned();
            let outcome = self
                .function
                .call(handler, vec![event, self.settings.clone()])
                .await;
            let Outcome::Failed(failure) = outcome else {
                continue;
            };
            let refusal = failed(index, handler, &failure);
            let retry = matches!(refusal.kind, RefusalKind::Retry { .. });
            refused.push(refusal);
            if retry {
                // The rest wait for it, uncalled: a user's later message must not go
                // first, and what was delivered is not sent again.
                refused.extend((index + 1..batch.len()).map(|later| Refusal {
                    index: later,
                    kind: RefusalKind::Retry { retry_after: None },
                    status: None,
                    detail: format!("not called yet: message {index} of the batch is retried"),
                    answer: None,
                }));
                break;
            }
        }
        refused
    }

    /// The whole batch to `onBatch(events, settings)`; what was not delivered.
    async fn call_on_batch(&self, batch: &[Outgoing<'_>]) -> Vec<Refusal> {
        let mut events = Vec::with_capacity(batch.iter().map(|m| m.json.len() + 1).sum());
        super::json_array(batch, &mut events);
        let events = String::from_utf8_lossy(&events).into_owned();
        let outcome = self
            .function
            .call("onBatch", vec![events, self.settings.clone()])
            .await;
        match outcome {
            Outcome::Returned(value) => batch_statuses(&value, batch.len()),
            Outcome::Failed(failure) => (0..batch.len())
                .map(|index| failed(index, "onBatch", &failure))
                .collect(),
        }
    }
}

/// What a call that threw makes of a message it was given.
fn failed(index: usize, handler: &str, failure: &functions::Failure) -> Refusal {
    let detail = format!("function {handler}: {}", failure.message);
    let answer = Some(match &failure.stack {
        Some(stack) => format!("{}\n{stack}", failure.message),
        None => failure.message.clone(),
    });
    let (kind, status) = match failure.kind {
        FailureKind::Retry | FailureKind::Timeout => {
            (RefusalKind::Retry { retry_after: None }, None)
        }
        // Thrown by a handler that exists: Segment discards the event, not as an error.
        FailureKind::NotSupported => (
            RefusalKind::Skipped {
                reason: "event_not_supported",
            },
            None,
        ),
        FailureKind::Invalid => (RefusalKind::Refused, Some(400)),
        FailureKind::Error => (RefusalKind::Refused, Some(500)),
    };
    Refusal {
        index,
        kind,
        status,
        detail,
        answer,
    }
}

/// Settles a batch by what `onBatch` returned. An array is one `{status, errormessage}`
/// per event, in order: 2xx delivered, 429 and 5xx retried, other 4xx dead-lettered with
/// `errormessage`. Anything else returned (`undefined` included) delivers them all, as
/// a returning handler does. An array of the wrong length or with an entry that is not
/// such an object dead-letters the whole batch: which event it meant cannot be known, and
/// a retry would only repeat the function's mistake.
fn batch_statuses(returned: &serde_json::Value, count: usize) -> Vec<Refusal> {
    let Some(entries) = returned.as_array() else {
        return Vec::new();
    };
    let all_refused = |detail: String| {
        (0..count)
            .map(|index| Refusal {
                index,
                kind: RefusalKind::Refused,
                status: None,
                detail: detail.clone(),
                answer: None,
            })
            .collect()
    };
    if entries.len() != count {
        return all_refused(format!(
            "onBatch returned {} results for {count} events; it must return one \
             {{status, errormessage}} per event, in order, or nothing",
            entries.len()
        ));
    }
    let mut refused = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let status = entry
            .get("status")
            .and_then(serde_json::Value::as_f64)
            .filter(|s| {
                s.fract() == 0.0 && ((200.0..300.0).contains(s) || (400.0..600.0).contains(s))
            })
            .map(|s| s as u16);
        let Some(status) = status else {
            let shown: String = entry.to_string().chars().take(200).collect();
            return all_refused(format!(
                "onBatch result {index} is not {{status, errormessage}} with a 2xx, 4xx or \
                 5xx status: {shown}"
            ));
        };
        let kind = match status {
            200..=299 => continue,
            429 | 500..=599 => RefusalKind::Retry { retry_after: None },
            _ => RefusalKind::Refused,
        };
        let answer = entry
            .get("errormessage")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        refused.push(Refusal {
            index,
            kind,
            status: Some(status),
            detail: format!("onBatch: status {status}"),
            answer,
        });
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds(refused: &[Refusal]) -> Vec<(usize, RefusalKind, Option<u16>)> {
        refused
            .iter()
            .map(|r| (r.index, r.kind, r.status))
            .collect()
    }

    #[test]
    fn on_batch_statuses_settle_each_event_in_order() {
        let returned = json!([
            {"status": 200},
            {"status": 500, "errormessage": "upstream down"},
            {"status": 429},
            {"status": 400, "errormessage": "bad email"},
            {"status": 201.0}
        ]);
        let refused = batch_statuses(&returned, 5);
        let retry = RefusalKind::Retry { retry_after: None };
        assert_eq!(
            kinds(&refused),
            [
                (1, retry, Some(500)),
                (2, retry, Some(429)),
                (3, RefusalKind::Refused, Some(400))
            ]
        );
        assert_eq!(refused[2].answer.as_deref(), Some("bad email"));
    }

    #[test]
    fn a_file_with_only_on_batch_does_not_start_without_batches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.js"), "function onBatch(events) {}").unwrap();
        let build = |extra: &str| {
            let mut config: DestinationConfig = toml::from_str(&format!(
                "name = \"fn\"\nkind = \"function\"\nfile = \"f.js\"\n{extra}"
            ))
            .unwrap();
            config.load_files(dir.path()).unwrap();
            config.try_build()
        };
        let error = build("").unwrap_err().to_string();
        assert!(
            error.contains("defines only onBatch") && error.contains("batch.max_events"),
            "{error}"
        );
        build("batch = { max_events = 20 }").unwrap();
    }

    #[test]
    fn on_batch_returning_no_array_delivers_all() {
        for returned in [json!(null), json!({"ok": true}), json!(3)] {
            assert!(batch_statuses(&returned, 2).is_empty(), "{returned}");
        }
    }

    #[test]
    fn a_wrong_length_or_a_malformed_entry_refuses_the_whole_batch() {
        for (returned, says) in [
            (
                json!([{"status": 200}]),
                "onBatch returned 1 results for 2 events",
            ),
            (
                json!([{"status": 200}, {"code": 200}]),
                "onBatch result 1 is not",
            ),
            (
                json!([{"status": 302}, {"status": 200}]),
                "onBatch result 0 is not",
            ),
            (
                json!([{"status": "200"}, {"status": 200}]),
                "onBatch result 0 is not",
            ),
            (json!([null, {"status": 200}]), "onBatch result 0 is not"),
        ] {
            let refused = batch_statuses(&returned, 2);
            assert_eq!(
                kinds(&refused),
                [
                    (0, RefusalKind::Refused, None),
                    (1, RefusalKind::Refused, None)
                ],
                "{returned}"
            );
            assert!(refused[0].detail.starts_with(says), "{}", refused[0].detail);
        }
    }
}
