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
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    AnyDestination, BatchShape, Check, Destination, DestinationConfig, KeyError, Kind, Outgoing,
    Refusal, RefusalKind, SendError, Sending,
};
use crate::clock::Clock;
use crate::functions::{self, FailureKind, Function, HostPolicy, Outcome};
use crate::queue::Checkpoint;

/// `kind = "function"`'s own keys. The shared `timeout` is the per-call time limit
/// (default 5 s).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The function's JavaScript file, relative to the config file's directory.
    pub file: String,
    /// Handed to each handler as `settings`; a key ending in `_env` names an environment
    /// variable, passed under the key without the suffix.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Hosts `fetch` may reach; default any public host (never loopback or private
    /// addresses unless listed here).
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Host → base URL its `fetch` requests go to instead; the code sees its own URL.
    #[serde(default)]
    pub fetch_hosts: BTreeMap<String, String>,
    /// Bytes the function's JavaScript heap may use (default 64 MiB).
    pub memory_limit: Option<u64>,
    /// The file's path and text, read when the config is loaded: a reload that finds the
    /// file changed rebuilds the destination.
    #[serde(skip)]
    pub loaded: Option<(PathBuf, String)>,
}

impl Kind for FunctionConfig {
    const NAME: &'static str = "function";
    // Sent like an HTTP destination: concurrency, ordering, retry, rate limit apply.
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        if self.memory_limit.is_some_and(|m| m < 1024 * 1024) {
            return Err(KeyError::new(
                "memory_limit",
                "must be at least 1 MiB (1048576)",
            ));
        }
        for (host, base) in &self.fetch_hosts {
            super::check_url(&format!("fetch_hosts.{host}"), base)?;
        }
        Ok(())
    }

    fn load_files(&mut self, dir: &Path) -> Result<(), KeyError> {
        let path = dir.join(&self.file);
        let text =
            functions::read_script(&path, &self.file).map_err(|e| KeyError::new("file", e))?;
        self.loaded = Some((path, text));
        Ok(())
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
        _: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(FunctionDestination::new(config, self)?))
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
}

impl FunctionDestination {
    pub fn new(config: &DestinationConfig, own: &FunctionConfig) -> anyhow::Result<Self> {
        let Some((_, source)) = &own.loaded else {
            anyhow::bail!(
                "destination `{}`: `{}` was not loaded",
                config.name,
                own.file
            );
        };
        let settings = functions::settings_from(&own.settings, |var| {
            std::env::var(var).ok().filter(|v| !v.is_empty())
        })
        .map_err(|e| anyhow::anyhow!("destination `{}`: {e}", config.name))?;
        let options = functions::Options {
            name: own.file.clone(),
            timeout: config.http.timeout.unwrap_or(functions::DEFAULT_TIMEOUT),
            memory_limit: own.memory_limit.unwrap_or(functions::DEFAULT_MEMORY_LIMIT),
            hosts: HostPolicy {
                allow: own.allow_hosts.clone(),
                remap: own
                    .fetch_hosts
                    .iter()
                    .map(|(h, base)| (h.to_ascii_lowercase(), base.clone()))
                    .collect(),
            },
        };
        let function = Function::load(source, options)
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
                own.file
            );
        }
        Ok(FunctionDestination {
            on_batch: batches && function.has("onBatch"),
            function,
            settings: settings.to_string(),
        })
    }
}

/// A function file named by a key other than a function destination's `file` (an
/// insert function), read and syntax-checked when the config is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    /// As configured: relative to the config file's directory.
    pub file: String,
    /// The text, once loaded (`DestinationConfig::load_files`).
    pub source: Option<String>,
}

impl Script {
    pub fn load(&mut self, dir: &Path) -> Result<(), String> {
        self.source = Some(functions::read_script(&dir.join(&self.file), &self.file)?);
        Ok(())
    }

    /// Starts it with the default limits and no `fetch` beyond public hosts.
    pub fn start(&self) -> anyhow::Result<Function> {
        let source = self.source.as_deref().unwrap_or_default();
        Function::load(
            source,
            functions::Options {
                name: self.file.clone(),
                timeout: functions::DEFAULT_TIMEOUT,
                memory_limit: functions::DEFAULT_MEMORY_LIMIT,
                hosts: HostPolicy::default(),
            },
        )
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
