//! A source function: `onRequest(request, settings)` turns a webhook's request into
//! Segment messages (`Segment.track(…)`, …), which the HTTP layer then ingests as one
//! batch of the source.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Failure, FailureKind, Function, FunctionSandbox, Outcome};

/// A source's loaded function and its settings.
pub struct SourceFunction {
    function: Function,
    /// `function_settings` as JSON text, the environment's values in.
    settings: String,
    /// The file as configured, for logs.
    pub file: String,
}

/// What the HTTP layer hands the function of a request.
#[derive(serde::Serialize)]
pub struct RawRequest<'a> {
    pub method: &'a str,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// The body as text (invalid UTF-8 replaced).
    pub body: String,
}

/// What a call emitted.
#[derive(Debug, serde::Deserialize)]
pub struct Emitted {
    /// The messages of `Segment.track(…)` and friends, `type` set.
    pub messages: Vec<serde_json::Value>,
    /// How many `Segment.set(…)` calls (fanout has no object store).
    pub sets: u64,
}

impl SourceFunction {
    /// Reads the sandbox's file (relative to `dir`), starts it within the sandbox's limits
    /// and checks it defines `onRequest`; `settings` are resolved already (`settings_from`).
    pub fn load(
        dir: &Path,
        sandbox: &FunctionSandbox,
        settings: serde_json::Value,
    ) -> Result<SourceFunction, String> {
        let file = sandbox.file.as_str();
        // Syntax and load errors name the file already; the others get it in front.
        let named = |e: String| {
            if e.starts_with(file) {
                e
            } else {
                format!("{file}: {e}")
            }
        };
        let source = super::read_script(&dir.join(file), file).map_err(named)?;
        let function =
            Function::load(&source, sandbox.options(None)).map_err(|e| named(e.to_string()))?;
        if !function.has("onRequest") {
            return Err(format!("{file} defines no function onRequest"));
        }
        Ok(SourceFunction {
            function,
            settings: settings.to_string(),
            file: file.to_string(),
        })
    }

    /// Runs `onRequest` to its end; the messages it emitted, or why it failed.
    pub async fn run(&self, request: &RawRequest<'_>) -> Result<Emitted, Failure> {
        let request = serde_json::to_string(request).expect("requests serialize");
        match self
            .function
            .call("__sourceRequest", vec![request, self.settings.clone()])
            .await
        {
            Outcome::Returned(value) => serde_json::from_value(value).map_err(|e| Failure {
                kind: FailureKind::Error,
                message: format!("Error: what onRequest emitted cannot be read: {e}"),
                stack: None,
            }),
            Outcome::Failed(failure) => Err(failure),
        }
    }

    /// What `fetch` did since the last ask (`Function::fetched`).
    pub async fn fetched(&self) -> Vec<serde_json::Value> {
        self.function.fetched().await
    }
}
