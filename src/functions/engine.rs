//! One function's QuickJS runtime, living on its own thread: the globals, the limits,
//! and a call from handler name to `Outcome`.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rquickjs::context::EvalOptions;
use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Exception, Function, Runtime, Value};

use super::fetch;
use super::hosts::HostPolicy;
use super::{Failure, FailureKind, Options, Outcome, DEFAULT_MEMORY_LIMIT};
use crate::throttle::LogThrottle;

const PRELUDE: &str = include_str!("prelude.js");

/// The handler names looked up after the script's top level ran.
const HANDLERS: [&str; 9] = [
    "onRequest",
    "onTrack",
    "onIdentify",
    "onPage",
    "onScreen",
    "onGroup",
    "onAlias",
    "onDelete",
    "onBatch",
];

/// How long code may run during a syntax check (none should: see `check_syntax`).
const SYNTAX_CHECK_LIMIT: Duration = Duration::from_secs(1);

/// Console lines are spaced out: a handler logging per event must not flood the logs.
const CONSOLE_INTERVAL: Duration = Duration::from_millis(200);

pub struct Engine {
    runtime: Runtime,
    context: Context,
    clock: Arc<Deadline>,
    handlers: Vec<&'static str>,
    timeout: Duration,
}

/// The current call's deadline, read by the interrupt handler and by `fetch`.
struct Deadline {
    start: Instant,
    /// Nanoseconds after `start`; 0 when no call is running.
    at: AtomicU64,
    /// Set when the interrupt handler stopped the script.
    hit: AtomicBool,
}

impl Deadline {
    fn left(&self) -> Duration {
        let at = Duration::from_nanos(self.at.load(Ordering::Relaxed));
        at.saturating_sub(self.start.elapsed())
    }

    fn passed(&self) -> bool {
        let at = self.at.load(Ordering::Relaxed);
        at != 0 && self.start.elapsed() >= Duration::from_nanos(at)
    }

    fn arm(&self, timeout: Duration) {
        self.hit.store(false, Ordering::Relaxed);
        let at = self.start.elapsed() + timeout;
        self.at.store(at.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Engine {
    /// A runtime with the limits and globals, the script's top level run in it.
    pub fn new(source: &str, options: Options) -> Result<Engine, String> {
        let runtime = Runtime::new().map_err(|e| e.to_string())?;
        runtime.set_memory_limit(usize::try_from(options.memory_limit).unwrap_or(usize::MAX));
        let clock = Arc::new(Deadline {
            start: Instant::now(),
            at: AtomicU64::new(0),
            hit: AtomicBool::new(false),
        });
        runtime.set_interrupt_handler(Some(Box::new({
            let clock = clock.clone();
            move || {
                let stop = clock.passed();
                if stop {
                    clock.hit.store(true, Ordering::Relaxed);
                }
                stop
            }
        })));
        let context = Context::full(&runtime).map_err(|e| e.to_string())?;
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = super::resolver::client(&options.hosts).map_err(|e| e.to_string())?;
        let name = options.name.clone();
        let engine = Engine {
            runtime,
            context,
            clock,
            handlers: Vec::new(),
            timeout: options.timeout,
        };
        let hooks = Hooks {
            io: Rc::new(io),
            client,
            hosts: Rc::new(options.hosts),
            name: Rc::from(name.as_str()),
            clock: engine.clock.clone(),
        };
        engine.clock.arm(options.timeout);
        let handlers = engine.context.with(|ctx| {
            hooks.install(&ctx).map_err(|e| e.to_string())?;
            super::globals::install(&ctx).map_err(|e| e.to_string())?;
            ctx.eval::<(), _>(PRELUDE)
                .catch(&ctx)
                .map_err(|e| format!("prelude: {e}"))?;
            ctx.eval_with_options::<(), _>(source, script_options(&name))
                .catch(&ctx)
                .map_err(|e| describe(&name, e))?;
            let globals = ctx.globals();
            Ok::<_, String>(
                HANDLERS
                    .into_iter()
                    .filter(|h| globals.get::<_, Function>(*h).is_ok())
                    .collect(),
            )
        });
        let timed_out = engine.clock.hit.load(Ordering::Relaxed);
        engine.clock.at.store(0, Ordering::Relaxed);
        let handlers = handlers.map_err(|e| {
            if timed_out {
                format!("{name}: the top level ran over the time limit")
            } else {
                e
            }
        })?;
        Ok(Engine { handlers, ..engine })
    }

    pub fn handlers(&self) -> Vec<&'static str> {
        self.handlers.clone()
    }

    /// Runs `handler(args…)` to the end: its promise settled, within the time limit.
    pub fn call(&self, handler: &str, args: Vec<String>) -> Outcome {
        self.clock.arm(self.timeout);
        let outcome = self.context.with(|ctx| self.run(&ctx, handler, args));
        let timed_out = self.clock.hit.load(Ordering::Relaxed);
        self.clock.at.store(0, Ordering::Relaxed);
        // What an interrupted or failed call left behind (cycles) goes now, not at the
        // next call's allocation.
        if matches!(outcome, Outcome::Failed(_)) {
            self.runtime.run_gc();
        }
        match outcome {
            Outcome::Failed(failure) if timed_out => Outcome::Failed(Failure {
                kind: FailureKind::Timeout,
                message: format!("{handler} ran over the time limit of {:?}", self.timeout),
                stack: failure.stack,
            }),
            outcome => outcome,
        }
    }

    fn run(&self, ctx: &Ctx<'_>, handler: &str, args: Vec<String>) -> Outcome {
        let function: Function = match ctx.globals().get(handler) {
            Ok(f) => f,
            Err(_) => {
                return Outcome::Failed(Failure {
                    kind: FailureKind::NotSupported,
                    message: format!("EventNotSupported: {handler} is not defined"),
                    stack: None,
                })
            }
        };
        let mut values = Vec::with_capacity(args.len());
        for arg in args {
            match ctx.json_parse(arg).catch(ctx) {
                Ok(v) => values.push(v),
                Err(e) => return failed(e),
            }
        }
        let mut call_args = rquickjs::function::Args::new(ctx.clone(), values.len());
        for value in values {
            if let Err(e) = call_args.push_arg(value) {
                return failed(CaughtError::Error(e));
            }
        }
        let returned: Value = match function.call_arg(call_args).catch(ctx) {
            Ok(v) => v,
            Err(e) => return failed(e),
        };
        let settled = super::globals::settle(
            ctx,
            returned,
            || self.clock.left(),
            || self.clock.hit.store(true, Ordering::Relaxed),
        );
        match settled {
            Ok(value) => Outcome::Returned(to_json(ctx, value)),
            Err(CaughtError::Error(rquickjs::Error::WouldBlock)) => Outcome::Failed(Failure {
                kind: FailureKind::Error,
                message: format!("{handler} returned a promise that never settled"),
                stack: None,
            }),
            Err(e) => failed(e),
        }
    }
}

/// The native hooks the prelude wraps into `console`, `fetch`, `atob` and `btoa`.
struct Hooks {
    io: Rc<tokio::runtime::Runtime>,
    client: reqwest::Client,
    hosts: Rc<HostPolicy>,
    name: Rc<str>,
    clock: Arc<Deadline>,
}

impl Hooks {
    fn install(self, ctx: &Ctx<'_>) -> rquickjs::Result<()> {
        let globals = ctx.globals();
        let throttle = Rc::new((LogThrottle::new(CONSOLE_INTERVAL), Cell::new(0u64)));
        let name = self.name.clone();
        globals.set(
            "__log",
            Function::new(ctx.clone(), move |level: String, text: String| {
                let (throttle, dropped) = &*throttle;
                if !throttle.ready() {
                    dropped.set(dropped.get() + 1);
                    return;
                }
                let skipped = dropped.replace(0);
                match level.as_str() {
                    "error" => tracing::error!(function = &*name, skipped, "{text}"),
                    "warn" => tracing::warn!(function = &*name, skipped, "{text}"),
                    "debug" => tracing::debug!(function = &*name, skipped, "{text}"),
                    _ => tracing::info!(function = &*name, skipped, "{text}"),
                }
            })?,
        )?;
        globals.set(
            "__btoa",
            Function::new(ctx.clone(), |ctx: Ctx<'_>, text: String| {
                let bytes: Option<Vec<u8>> = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).ok())
                    .collect();
                match bytes {
                    Some(bytes) => Ok(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    None => Err(Exception::throw_message(
                        &ctx,
                        "btoa: the string has characters outside Latin-1",
                    )),
                }
            })?,
        )?;
        globals.set(
            "__atob",
            Function::new(ctx.clone(), |ctx: Ctx<'_>, text: String| {
                let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
                match engine.decode(compact.trim_end_matches('=')) {
                    Ok(bytes) => Ok(bytes.into_iter().map(char::from).collect::<String>()),
                    Err(_) => Err(Exception::throw_message(&ctx, "atob: not base64")),
                }
            })?,
        )?;
        let Hooks {
            io,
            client,
            hosts,
            clock,
            ..
        } = self;
        globals.set(
            "__fetch",
            Function::new(
                ctx.clone(),
                move |url: String, method: String, headers: String, body: Option<String>| {
                    let request = fetch::Request {
                        url,
                        method,
                        headers: serde_json::from_str(&headers).unwrap_or_default(),
                        body,
                    };
                    let left = clock.left();
                    io.block_on(fetch::run(&client, &hosts, request, left))
                        .to_string()
                },
            )?,
        )?;
        Ok(())
    }
}

fn script_options(name: &str) -> EvalOptions {
    let mut options = EvalOptions::default();
    options.global = true;
    options.strict = false;
    options.filename = Some(name.to_string());
    options
}

/// Parses `source` without running it: wrapped in a block that never runs, on the same
/// first line, so that lines keep their numbers.
pub fn check_syntax(source: &str, name: &str) -> Result<(), String> {
    let runtime = Runtime::new().map_err(|e| e.to_string())?;
    // A file that closes the block early would run at load: bounded (the interrupt
    // handler is only asked while code runs, never while parsing).
    runtime.set_memory_limit(DEFAULT_MEMORY_LIMIT as usize);
    let start = Instant::now();
    runtime.set_interrupt_handler(Some(Box::new(move || start.elapsed() > SYNTAX_CHECK_LIMIT)));
    let context = Context::full(&runtime).map_err(|e| e.to_string())?;
    context.with(|ctx| {
        let wrapped = format!("if (false) {{ {source}\n}}");
        ctx.eval_with_options::<(), _>(wrapped, script_options(name))
            .catch(&ctx)
            .map_err(|e| describe(name, e))
    })
}

/// `file:line: Name: message` for an error thrown while loading.
fn describe(name: &str, error: CaughtError<'_>) -> String {
    let failure = match failed(error) {
        Outcome::Failed(f) => f,
        Outcome::Returned(_) => unreachable!("failed() always fails"),
    };
    let line = failure
        .stack
        .as_deref()
        .and_then(|stack| line_in(stack, name))
        .map(|line| format!(":{line}"))
        .unwrap_or_default();
    format!("{name}{line}: {}", failure.message)
}

/// The line of the first frame in `name` of a QuickJS stack (`at … (name:line:col)`).
fn line_in(stack: &str, name: &str) -> Option<u32> {
    let at = stack.find(&format!("{name}:"))? + name.len() + 1;
    let digits: String = stack[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A caught error as a `Failure`, classed by the thrown error's `name`.
fn failed(error: CaughtError<'_>) -> Outcome {
    let (name, message, stack) = match &error {
        CaughtError::Exception(e) => (
            e.as_object()
                .get::<_, String>("name")
                .unwrap_or_else(|_| "Error".into()),
            e.message().unwrap_or_default(),
            e.stack().filter(|s| !s.is_empty()),
        ),
        CaughtError::Value(v) => {
            let text = v
                .as_string()
                .and_then(|s| s.to_string().ok())
                .unwrap_or_else(|| format!("{:?}", v.type_of()));
            ("Error".to_string(), text, None)
        }
        CaughtError::Error(rquickjs::Error::Allocation) => {
            ("InternalError".into(), "out of memory".into(), None)
        }
        CaughtError::Error(e) => ("Error".to_string(), e.to_string(), None),
    };
    let kind = match name.as_str() {
        "RetryError" | "FetchError" => FailureKind::Retry,
        "EventNotSupported" => FailureKind::NotSupported,
        "ValidationError" | "InvalidEventPayload" => FailureKind::Invalid,
        _ => FailureKind::Error,
    };
    Outcome::Failed(Failure {
        kind,
        message: format!("{name}: {message}"),
        stack,
    })
}

/// The JSON of what a handler returned; `undefined` and what JSON cannot hold are `null`.
fn to_json<'js>(ctx: &Ctx<'js>, value: Value<'js>) -> serde_json::Value {
    ctx.json_stringify(value)
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}
