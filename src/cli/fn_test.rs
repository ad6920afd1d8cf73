//! `fanout fn test`: runs one function file on a message or a webhook request from the
//! command line, with the runtime's default limits, and prints what it did as JSON lines:
//! each `fetch`, then what it returned, emitted or threw.
//! No config and no server: a team checks a function before it goes in the config.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{json, Value};

use super::output::line;
use crate::functions::{
    self, Failure, Function, HostPolicy, Options, Outcome, RawRequest, SourceFunction,
};

/// What to run the function on.
pub enum Input {
    /// A message; its `type` picks the handler.
    Event(PathBuf),
    /// `{"method","url","headers":{},"body":…}` for `onRequest`.
    Request(PathBuf),
}

/// How a run ended (a bad argument is an `Err`).
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Returned,
    /// The function threw, or could not be loaded; what it threw was printed.
    Threw,
}

/// Runs `file` on `input` with `settings` (`KEY=VALUE`; a key ending in `_env` reads the
/// environment as the config does), `fetch` limited by `hosts`. `Err` is a bad argument:
/// exit 2.
pub async fn run(
    file: &Path,
    input: &Input,
    settings: &[String],
    hosts: HostPolicy,
) -> anyhow::Result<Ended> {
    let settings = parse_settings(settings)?;
    if !file.is_file() {
        anyhow::bail!("{}: no such file", file.display());
    }
    match input {
        Input::Event(path) => event(file, &read_json(path)?, &settings, hosts).await,
        Input::Request(path) => request(file, &read_json(path)?, settings, hosts).await,
    }
}

/// `--allow-host HOST` and `--fetch-host HOST=URL`, checked as a destination's
/// `allow_hosts` and `fetch_hosts` are.
pub fn host_policy(allow: &[String], remaps: &[String]) -> anyhow::Result<HostPolicy> {
    let mut remap = std::collections::BTreeMap::new();
    for pair in remaps {
        let (host, base) = pair
            .split_once('=')
            .with_context(|| format!("--fetch-host {pair}: expected HOST=URL"))?;
        match url::Url::parse(base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => anyhow::bail!("--fetch-host {host}: `{base}` is not an http(s) URL"),
        }
        remap.insert(host.to_ascii_lowercase(), base.to_string());
    }
    Ok(HostPolicy {
        allow: allow.to_vec(),
        remap,
    })
}

fn parse_settings(pairs: &[String]) -> anyhow::Result<Value> {
    let mut table = std::collections::BTreeMap::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--settings {pair}: expected KEY=VALUE"))?;
        table.insert(key.to_string(), Value::String(value.to_string()));
    }
    functions::settings_from(&table, |var| std::env::var(var).ok())
        .map_err(|e| anyhow::anyhow!("--{e}"))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

async fn event(
    file: &Path,
    message: &Value,
    settings: &Value,
    hosts: HostPolicy,
) -> anyhow::Result<Ended> {
    let message_type = message.get("type").and_then(Value::as_str).unwrap_or("");
    let handler = functions::handler_for(message_type).with_context(|| {
        format!("--event: `type` must be one of track, identify, page, screen, group, alias, delete (got {message_type:?})")
    })?;
    let name = file.display().to_string();
    let source = functions::read_script(file, &name).map_err(|e| anyhow::anyhow!("{name}: {e}"));
    let function = source.and_then(|source| {
        Function::load(
            &source,
            Options {
                name: name.clone(),
                timeout: functions::DEFAULT_TIMEOUT,
                memory_limit: functions::DEFAULT_MEMORY_LIMIT,
                hosts,
            },
        )
    });
    let function = match function {
        Ok(function) => function,
        Err(e) => return not_loaded(&e.to_string()),
    };
    let outcome = function
        .call(handler, vec![message.to_string(), settings.to_string()])
        .await;
    print_fetched(function.fetched().await)?;
    match outcome {
        Outcome::Returned(value) => {
            line(json!({ "returned": value }))?;
            Ok(Ended::Returned)
        }
        Outcome::Failed(failure) => threw(&failure),
    }
}

async fn request(
    file: &Path,
    raw: &Value,
    settings: Value,
    hosts: HostPolicy,
) -> anyhow::Result<Ended> {
    let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_string);
    let headers = match raw.get("headers") {
        None | Some(Value::Null) => Default::default(),
        Some(headers) => serde_json::from_value(headers.clone())
            .context("--request: `headers` must be an object of strings")?,
    };
    // A body given as JSON is sent as its text, as a webhook would.
    let body = match raw.get("body") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(body) => body.to_string(),
    };
    let method = text("method").unwrap_or_else(|| "POST".into());
    let request = RawRequest {
        method: &method,
        url: text("url").unwrap_or_else(|| "http://localhost/".into()),
        headers,
        body,
    };
    let dir = file.parent().unwrap_or(Path::new(""));
    let name = file.file_name().map(|n| n.to_string_lossy().to_string());
    let sandbox = functions::FunctionSandbox {
        allow_hosts: hosts.allow,
        fetch_hosts: hosts.remap,
        ..functions::FunctionSandbox::file(name.unwrap_or_default())
    };
    let function = SourceFunction::load(dir, &sandbox, settings);
    let function = match function {
        Ok(function) => function,
        Err(e) => return not_loaded(&e),
    };
    let outcome = function.run(&request).await;
    print_fetched(function.fetched().await)?;
    match outcome {
        Ok(emitted) => {
            for message in emitted.messages {
                line(json!({ "emitted": message }))?;
            }
            if emitted.sets > 0 {
                line(json!({ "sets": emitted.sets }))?;
            }
            Ok(Ended::Returned)
        }
        Err(failure) => threw(&failure),
    }
}

/// `{"fetched": {"method","url","sent_to"?,"status"|"error"|"refused"}}` per request.
fn print_fetched(fetched: Vec<Value>) -> anyhow::Result<()> {
    for fetch in fetched {
        line(json!({ "fetched": fetch }))?;
    }
    Ok(())
}

fn not_loaded(error: &str) -> anyhow::Result<Ended> {
    eprintln!("fanout: {error}");
    Ok(Ended::Threw)
}

/// `{"threw": {"name","message","stack"}}`; the failure's text is `Name: message`.
fn threw(failure: &Failure) -> anyhow::Result<Ended> {
    let (name, message) = failure
        .message
        .split_once(": ")
        .unwrap_or(("Error", &failure.message));
    line(json!({ "threw": { "name": name, "message": message, "stack": failure.stack } }))?;
    Ok(Ended::Threw)
}
