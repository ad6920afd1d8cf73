//! `kind = "function"`: a Segment destination function (`onTrack(event, settings)`, …)
//! run in fanout's JavaScript runtime (`crate::functions`). One message per call, so
//! that a retry never sends a message the function already took. A handler that returns
//! delivers the message; `RetryError`, a `fetch` network error or the time limit retry it
//! with the destination's backoff; a handler the file lacks skips it
//! (`event_not_supported`); `ValidationError`, `InvalidEventPayload` or any other error
//! dead-letters it with the error's message and stack.

use std::borrow::Cow;
use std::path::Path;

use serde::Deserialize;

use super::{
    AnyDestination, BatchShape, Check, Destination, DestinationConfig, KeyError, Kind, Outgoing,
    Refusal, SendError, Sending,
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
        BatchShape {
            one_per_request: true,
            ..BatchShape::new(1, 1024 * 1024, 0)
        }
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        _: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(FunctionDestination::new(config, self)?))
    }
}

pub struct FunctionDestination {
    function: Function,
    /// `settings` as JSON text, the environment's values in.
    settings: String,
}

impl FunctionDestination {
    pub fn new(config: &DestinationConfig, own: &FunctionConfig) -> anyhow::Result<Self> {
        let Sandboxed { function, settings } = own
            .function
            .start(config.http.timeout)
            .map_err(|e| anyhow::anyhow!("destination `{}`: {e}", config.name))?;
        Ok(FunctionDestination { function, settings })
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
        match handler_of(message) {
            Some(handler) if self.function.has(handler) => Check::Send(None),
            _ => Check::Skip("event_not_supported"),
        }
    }

    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move {
            let mut refused = Vec::new();
            for (index, message) in batch.iter().enumerate() {
                let Some(handler) = handler_of(message.json) else {
                    continue;
                };
                let event = String::from_utf8_lossy(message.json).into_owned();
                let outcome = self
                    .function
                    .call(handler, vec![event, self.settings.clone()])
                    .await;
                let failure = match outcome {
                    Outcome::Returned(_) => continue,
                    Outcome::Failed(failure) => failure,
                };
                let answer = Some(match &failure.stack {
                    Some(stack) => format!("{}\n{stack}", failure.message),
                    None => failure.message.clone(),
                });
                match failure.kind {
                    // Thrown by a handler that exists: settled, not an error (Segment
                    // discards it uncounted).
                    FailureKind::NotSupported => continue,
                    FailureKind::Retry | FailureKind::Timeout => {
                        return Err(SendError::Retryable {
                            status: None,
                            retry_after: None,
                            detail: format!("function {handler}: {}", failure.message),
                            answer,
                        })
                    }
                    FailureKind::Invalid | FailureKind::Error => {
                        let status = if failure.kind == FailureKind::Invalid {
                            400
                        } else {
                            500
                        };
                        refused.push(Refusal {
                            index,
                            status,
                            detail: format!("function {handler}: {}", failure.message),
                            answer,
                        });
                    }
                }
            }
            match refused.len() {
                0 => Ok(0),
                1 if batch.len() == 1 => {
                    let r = refused.remove(0);
                    Err(SendError::Rejected {
                        status: r.status,
                        detail: r.detail,
                        answer: r.answer,
                    })
                }
                _ => Err(SendError::PartlyRejected { refused }),
            }
        })
    }
}
