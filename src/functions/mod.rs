//! Segment Functions: teams' JavaScript handlers (`onTrack(event, settings)`, …) run in an
//! embedded QuickJS engine (`rquickjs`), never a Node process.
//!
//! Each loaded function owns one dedicated OS thread holding its QuickJS runtime; calls
//! reach it over a channel and answer on a oneshot. A QuickJS runtime is single-threaded
//! and the handlers share module-level state (token caches), so one thread per function
//! is the natural unit, and it keeps JavaScript off the tokio workers. `fetch` is async to
//! the script but blocks that thread on a small current-thread tokio runtime while the
//! request runs: the thread has nothing else to do meanwhile, and this needs neither
//! rquickjs's async runtime nor a second event loop to integrate. Calls to one function
//! are therefore serialised; destinations that want more run more batches, not more JS.
//!
//! Limits per call, enforced by the engine: a time limit (an interrupt handler checks a
//! deadline; `fetch` gets only the time left) and a memory limit for the runtime. Hitting
//! either fails that call with `Failure::Timeout` / an out-of-memory error; the thread and
//! the server go on.
//!
//! Scripts are classic scripts in sloppy mode (real functions assign to undeclared
//! variables). `check_syntax` parses one without running it, so that a syntax error is a
//! config error with its line.

mod engine;
mod fetch;
mod globals;
mod hosts;
mod resolver;
mod sandbox;
mod source;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::metrics::FunctionMetrics;

pub use hosts::HostPolicy;
pub use sandbox::{file_or_table, FunctionSandbox, Sandboxed};
pub use source::{Emitted, RawRequest, SourceFunction};

/// The per-call time limit when the config names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest function file read.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// The runtime's memory limit when the config names none.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 * 1024 * 1024;

/// What a loaded function needs besides its source.
#[derive(Debug, Clone)]
pub struct Options {
    /// Shown in errors, stack traces and logs (the file as configured).
    pub name: String,
    pub timeout: Duration,
    pub memory_limit: u64,
    /// Which hosts `fetch` may reach, and where some of them really go.
    pub hosts: HostPolicy,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler returned (or its promise resolved) this value, as JSON (`null` for
    /// `undefined`).
    Returned(serde_json::Value),
    Failed(Failure),
}

impl Outcome {
    /// The `outcome` label of `fanout_function_calls_total` (one of `metrics::functions::CALL_OUTCOMES`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Returned(_) => "returned",
            Outcome::Failed(failure) => match failure.kind {
                FailureKind::Retry => "retry",
                FailureKind::Timeout => "timeout",
                FailureKind::NotSupported => "not_supported",
                FailureKind::Invalid => "invalid",
                FailureKind::Error => "error",
            },
        }
    }
}

/// A call that did not return.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    /// `Name: message`.
    pub message: String,
    pub stack: Option<String>,
}

/// Why a call failed, as Segment's runtime tells its outcomes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// `RetryError`, or `fetch` could not reach the host: worth another try.
    Retry,
    /// Over the per-call time limit.
    Timeout,
    /// `EventNotSupported`, or no handler of that name.
    NotSupported,
    /// `ValidationError` or `InvalidEventPayload`.
    Invalid,
    /// Any other error (out of memory included).
    Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

struct Call {
    handler: &'static str,
    /// Each argument as JSON text.
    args: Vec<String>,
    reply: tokio::sync::oneshot::Sender<Outcome>,
}

/// A loaded function: its thread, reached through a channel. Dropping it ends the thread
/// once the call in progress (if any) is over.
pub struct Function {
    calls: mpsc::Sender<Call>,
    handlers: Vec<&'static str>,
}

impl Function {
    /// Starts the function's thread and runs the script's top level there (within the
    /// limits). The error names the file and line of a syntax error or of what threw.
    pub fn load(source: &str, options: Options) -> anyhow::Result<Function> {
        let (calls, receiver) = mpsc::channel::<Call>();
        let (ready, started) = mpsc::channel();
        let name = options.name.clone();
        std::thread::Builder::new()
            .name(format!("fn {}", short_name(&name)))
            .spawn({
                let source = source.to_string();
                let name = name.clone();
                move || match engine::Engine::new(&source, options) {
                    Ok(engine) => {
                        let _ = ready.send(Ok(engine.handlers()));
                        let metrics = FunctionMetrics::new(&name);
                        for call in receiver {
                            let started = Instant::now();
                            let outcome = engine.call(call.handler, call.args);
                            metrics.record(outcome.label(), started.elapsed());
                            let _ = call.reply.send(outcome);
                        }
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })?;
        let handlers = started
            .recv()
            .map_err(|_| anyhow::anyhow!("{name}: the function's thread ended"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Function { calls, handlers })
    }

    /// Whether the script defines a top-level function named `handler`.
    pub fn has(&self, handler: &str) -> bool {
        self.handlers.contains(&handler)
    }

    /// Calls `handler(args…)`, each argument given as JSON text, and waits (without
    /// blocking the caller's thread) for it.
    pub async fn call(&self, handler: &'static str, args: Vec<String>) -> Outcome {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.calls.send(Call {
            handler,
            args,
            reply,
        });
        match sent {
            Ok(()) => answer.await.unwrap_or_else(|_| gone()),
            Err(_) => gone(),
        }
    }

    /// What `fetch` did since the last ask, oldest first (the prelude keeps the last 50):
    /// `{method, url, sent_to?, status | error | refused}` each, for `fanout fn test` to
    /// print. Empty if the function cannot answer.
    pub async fn fetched(&self) -> Vec<serde_json::Value> {
        match self.call("__fetched", Vec::new()).await {
            Outcome::Returned(serde_json::Value::Array(fetched)) => fetched,
            _ => Vec::new(),
        }
    }
}

fn gone() -> Outcome {
    Outcome::Failed(Failure {
        kind: FailureKind::Error,
        message: "the function's thread ended".into(),
        stack: None,
    })
}

/// The handler names a destination function may define, by message type.
pub fn handler_for(message_type: &str) -> Option<&'static str> {
    Some(match message_type {
        "track" => "onTrack",
        "identify" => "onIdentify",
        "page" => "onPage",
        "screen" => "onScreen",
        "group" => "onGroup",
        "alias" => "onAlias",
        "delete" => "onDelete",
        _ => return None,
    })
}

/// Parses `source` as a classic sloppy-mode script without running it; the error is
/// `name:line: SyntaxError: …`.
pub fn check_syntax(source: &str, name: &str) -> Result<(), String> {
    engine::check_syntax(source, name)
}

/// Settings as the handler sees them: a key ending in `_env` names an environment
/// variable, passed under the key without the suffix. `lookup` reads a variable; the
/// error names the key and the variable, never a value.
pub fn settings_from(
    table: &BTreeMap<String, serde_json::Value>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    for (key, value) in table {
        match (key.strip_suffix("_env"), value) {
            (Some(bare), serde_json::Value::String(var)) => match lookup(var) {
                Some(found) => {
                    out.insert(bare.to_string(), serde_json::Value::String(found));
                }
                None => {
                    return Err(format!(
                        "settings.{key} names the environment variable `{var}`, which is not set"
                    ))
                }
            },
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// Reads a function file (bounded in size) and checks its syntax; `name` is how errors
/// call it.
pub fn read_script(path: &Path, name: &str) -> Result<String, String> {
    let read = std::fs::File::open(path).and_then(|file| {
        use std::io::Read;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
        Ok(text)
    });
    let text = read.map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err("is over 4 MiB".into());
    }
    check_syntax(&text, name)?;
    Ok(text)
}

fn short_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}
