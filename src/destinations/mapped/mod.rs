//! `kind = "http"`: a destination described as data. Its URL, headers, query and body
//! are mappings over the stored message (`template.rs`: Jinja on minijinja, types kept),
//! compiled once when the config is read; `[[destinations.actions]]` pick a request per
//! message by their `when` (routing's filter syntax), and `batch.body` wraps many
//! messages' bodies in one request. Answers go through the shared policy (`http.rs`).
//!
//! Secrets: `env.NAME` in a template, `settings.NAME_env` and the auth helpers' `*_env`
//! keys are read once at start (a missing one stops the start, named); `fanout route` and
//! the live view render every one of them as `***`, so no secret reaches a terminal or
//! the live view.
//!
//! `base_url` + `path` instead of `url` let a preset (`presets.rs`) name paths that a user
//! moves to another host (an EU region, a self-hosted instance) with one key.

mod context;
mod fast;
mod filters;
mod keys;
pub mod presets;
mod reshape;
mod send;
mod template;
#[cfg(test)]
mod tests;
mod url_form;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{
    check_url, AnyDestination, BatchShape, DestinationConfig, FilterConfig, KeyError, Kind, Preview,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;
pub use send::{MappedDestination, Requests};
use template::Mapping;

/// `kind = "http"`'s own keys. A plain serde struct, so that a preset is a table merged
/// under the user's keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappedConfig {
    /// The URL, a template, e.g. `"https://api.example.com/v2/contacts/{{ userId }}"`;
    /// needed unless `path` or every action names one.
    pub url: Option<String>,
    /// Scheme and host (port, path prefix) that `path`, here and in the actions, follows,
    /// e.g. `"https://api.eu.amplitude.com"`; not a template.
    pub base_url: Option<String>,
    /// The URL's path after `base_url`, a template; instead of `url`.
    pub path: Option<String>,
    /// Values templates read as `settings.NAME`; `NAME_env = "VAR"` reads the variable at
    /// start into `settings.NAME`, a secret shown as `***`.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    /// 4xx answers that settle the messages sent as skipped instead of dead letters:
    /// `[{ status = 400, body_contains = "…" }]`, for answers a vendor documents as "this
    /// event will never be taken" that are no error to keep.
    #[serde(default)]
    pub drop_on: Vec<DropOn>,
    /// 4xx answers retried like a 429 instead of dead-lettered, same shape as `drop_on`:
    /// for vendors that answer throttling with a 4xx (Meta's Graph API: 400 with its
    /// error code in the body).
    #[serde(default)]
    pub retry_on: Vec<DropOn>,
    /// `POST` (default), `PUT`, `PATCH`, `DELETE` or `GET` (sent without a body).
    pub method: Option<String>,
    /// Header name → template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Query parameter → template, added to the URL (percent-encoded).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// The JSON body, a mapping (tables, arrays, templates, literals); default: the
    /// message as stored.
    pub body: Option<toml::Value>,
    /// Which messages this destination sends (routing's `filter` syntax); default all.
    pub when: Option<FilterConfig>,
    /// Send keys whose value is null (default: drop them, as undefined ones are).
    #[serde(default)]
    pub keep_nulls: bool,
    /// Requests per kind of message, tried in order: the first whose `when` holds.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// Send every action whose `when` holds, not only the first.
    #[serde(default)]
    pub all: bool,
    /// `batch = { body = … }`: one request for many messages; `{{ batch }}` is the array
    /// of their bodies. Without it, one message per request.
    #[serde(rename = "batch.body")]
    pub batch_body: Option<toml::Value>,
    /// `basic = { user, password_env }`: HTTP Basic authentication.
    pub basic: Option<BasicAuth>,
    /// Environment variable holding a token sent as `Authorization: Bearer <token>`.
    pub bearer_env: Option<String>,
    /// `api_key = { header, env }`: the key from `env` sent in the header `header`.
    pub api_key: Option<ApiKeyAuth>,
    /// Environment variable with the HMAC-SHA256 secret signing each body, as the webhook
    /// kind signs (`X-Fanout-Signature: sha256=<hex>`).
    pub signing_secret_env: Option<String>,
}

/// One `[[destinations.actions]]`: what it does not set it takes from the destination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Shown by `fanout route` and the live view; default `actions[<index>]`.
    pub name: Option<String>,
    /// Which messages take this action; default all.
    pub when: Option<FilterConfig>,
    pub url: Option<String>,
    /// Overrides the destination's `base_url` for this action's `path`.
    pub base_url: Option<String>,
    /// The path after `base_url`, a template; instead of `url`.
    pub path: Option<String>,
    pub method: Option<String>,
    /// Added to (and overriding) the destination's headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Added to (and overriding) the destination's query parameters.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    pub body: Option<toml::Value>,
    pub keep_nulls: Option<bool>,
}

/// One `drop_on` or `retry_on` entry: an answer with this status (and, if given, this text
/// in its body).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropOn {
    /// A 4xx status.
    pub status: u16,
    /// Text the answer's body must contain; default any body.
    pub body_contains: Option<String>,
}

impl DropOn {
    /// Whether an answer with `status` and `body` is this entry's.
    pub fn matches(&self, status: u16, body: &str) -> bool {
        self.status == status
            && self
                .body_contains
                .as_ref()
                .is_none_or(|text| body.contains(text.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub user: String,
    /// Environment variable holding the password.
    pub password_env: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    /// The header it goes in, e.g. `X-Api-Key`.
    pub header: String,
    /// Environment variable holding the key.
    pub env: String,
}

/// Requests per message without `batch.body`; with it, what a vendor's batch API takes
/// commonly (100 events, 1 MiB).
const BATCH_SHAPE: BatchShape = BatchShape::new(100, 1024 * 1024, 200);

impl Kind for MappedConfig {
    const NAME: &'static str = "http";
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        if self.basic.is_some() && self.bearer_env.is_some() {
            return Err(KeyError::new(
                "bearer_env",
                "give only one of `basic` and `bearer_env`: both set Authorization",
            ));
        }
        if let Some(key) = &self.api_key {
            check_header_name("api_key.header", &key.header)?;
        }
        self.compile().map(drop)
    }

    fn batch_shape(&self) -> BatchShape {
        BatchShape {
            one_per_request: self.batch_body.is_none(),
            ..BATCH_SHAPE
        }
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        let compiled = self
            .compile()
            .map_err(|e| anyhow::anyhow!("destination `{}`: {e}", config.name))?;
        Ok(Box::new(MappedDestination::new(
            config, self, compiled, clock,
        )?))
    }

    fn preview(&self, message: &[u8], _: Clock) -> anyhow::Result<Preview> {
        let compiled = self.compile().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(send::preview(&compiled, message))
    }
}

/// The templates of one destination, compiled.
pub struct Compiled {
    env: minijinja::Environment<'static>,
    when: Option<crate::routing::MessageFilter>,
    actions: Vec<Action>,
    all: bool,
    batch_body: Option<Mapping>,
    /// The `env.NAME`s the templates read.
    env_names: BTreeSet<String>,
    /// The headers the auth helpers add, as shown: secrets masked.
    shown_auth: Vec<(String, String)>,
    /// `settings` given as values.
    settings: serde_json::Map<String, serde_json::Value>,
    /// `settings.NAME_env`: NAME → the environment variable, read at start.
    secret_settings: BTreeMap<String, String>,
    drop_on: Vec<DropOn>,
    retry_on: Vec<DropOn>,
}

/// How a secret is shown by `fanout route` and the live view.
const MASK: &str = "***";

/// One request a message can become.
struct Action {
    name: String,
    when: Option<crate::routing::MessageFilter>,
    method: reqwest::Method,
    url: Mapping,
    /// Whether a rendered URL must be parsed.
    url_form: url_form::UrlForm,
    headers: Vec<(reqwest::header::HeaderName, Mapping)>,
    query: Vec<(String, Mapping)>,
    /// `None`: the message as stored.
    body: Option<Mapping>,
    keep_nulls: bool,
}

impl MappedConfig {
    /// Compiles every template; the error names the key and the line in its value.
    pub fn compile(&self) -> Result<Compiled, KeyError> {
        let (settings, secret_settings) = keys::settings(&self.settings)?;
        keys::check_drop_on("drop_on", &self.drop_on)?;
        keys::check_drop_on("retry_on", &self.retry_on)?;
        let mut env = template::environment();
        let mut env_names = BTreeSet::new();
        let own = ActionConfig {
            name: None,
            when: None,
            url: None,
            base_url: None,
            path: None,
            method: None,
            headers: BTreeMap::new(),
            query: BTreeMap::new(),
            body: None,
            keep_nulls: None,
        };
        let actions: Vec<(String, &ActionConfig)> = if self.actions.is_empty() {
            vec![(String::new(), &own)]
        } else {
            let names = self.actions.iter().enumerate();
            names.map(|(i, a)| (format!("actions[{i}]."), a)).collect()
        };
        let mut compiled = Vec::with_capacity(actions.len());
        for (prefix, action) in actions {
            let mut compile = |key: String, value: &toml::Value| {
                Mapping::compile(&mut env, &key, value, &mut env_names)
            };
            let (url_key, url) = self.url_of(&prefix, action)?;
            if !template::has_template(&url) {
                check_url(&url_key, &url)?;
            }
            let url_form = url_form::UrlForm::new(&url);
            let url = compile(url_key, &toml::Value::String(url))?;
            let (method_key, method) = match (&action.method, &self.method) {
                (Some(m), _) => (format!("{prefix}method"), m.as_str()),
                (None, Some(m)) => ("method".to_string(), m.as_str()),
                (None, None) => ("method".to_string(), "POST"),
            };
            let method = match method.to_ascii_uppercase().as_str() {
                "POST" => reqwest::Method::POST,
                "PUT" => reqwest::Method::PUT,
                "PATCH" => reqwest::Method::PATCH,
                "DELETE" => reqwest::Method::DELETE,
                "GET" => reqwest::Method::GET,
                _ => {
                    return Err(KeyError::new(
                        method_key,
                        "one of POST, PUT, PATCH, DELETE, GET",
                    ))
                }
            };
            let mut headers = Vec::new();
            for (name, (key, value)) in merged(&self.headers, &action.headers, "headers", &prefix) {
                check_header_name(&key, name)?;
                let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                    .expect("checked above");
                headers.push((name, compile(key, &toml::Value::String(value.clone()))?));
            }
            let mut query = Vec::new();
            for (name, (key, value)) in merged(&self.query, &action.query, "query", &prefix) {
                query.push((
                    name.clone(),
                    compile(key, &toml::Value::String(value.clone()))?,
                ));
            }
            let body = match (&action.body, &self.body) {
                (Some(body), _) => Some(compile(format!("{prefix}body"), body)?),
                (None, Some(body)) => Some(compile("body".to_string(), body)?),
                (None, None) => None,
            };
            let when = match &action.when {
                Some(filter) => Some(when(&format!("{prefix}when"), filter)?),
                None => None,
            };
            compiled.push(Action {
                name: action
                    .name
                    .clone()
                    .unwrap_or_else(|| prefix.strip_suffix('.').unwrap_or("request").to_string()),
                when,
                method,
                url,
                url_form,
                headers,
                query,
                body,
                keep_nulls: action.keep_nulls.unwrap_or(self.keep_nulls),
            });
        }
        let batch_body = match &self.batch_body {
            Some(body) => Some(Mapping::compile(
                &mut env,
                "batch.body",
                body,
                &mut env_names,
            )?),
            None => None,
        };
        let mut shown_auth = Vec::new();
        if self.basic.is_some() {
            shown_auth.push(("authorization".into(), format!("Basic {MASK}")));
        }
        if self.bearer_env.is_some() {
            shown_auth.push(("authorization".into(), format!("Bearer {MASK}")));
        }
        if let Some(key) = &self.api_key {
            shown_auth.push((key.header.to_ascii_lowercase(), MASK.into()));
        }
        if self.signing_secret_env.is_some() {
            let header = super::webhook::SIGNATURE_HEADER;
            shown_auth.push((header.into(), format!("sha256={MASK}")));
        }
        Ok(Compiled {
            settings,
            secret_settings,
            drop_on: self.drop_on.clone(),
            retry_on: self.retry_on.clone(),
            shown_auth,
            env,
            when: self.when.as_ref().map(|f| when("when", f)).transpose()?,
            actions: compiled,
            all: self.all,
            batch_body,
            env_names,
        })
    }
}

/// The destination's entries overridden by the action's, each with its key path.
fn merged<'a>(
    outer: &'a BTreeMap<String, String>,
    inner: &'a BTreeMap<String, String>,
    table: &str,
    prefix: &str,
) -> BTreeMap<&'a String, (String, &'a String)> {
    let mut all: BTreeMap<&String, (String, &String)> = outer
        .iter()
        .map(|(k, v)| (k, (format!("{table}.{k}"), v)))
        .collect();
    for (k, v) in inner {
        all.insert(k, (format!("{prefix}{table}.{k}"), v));
    }
    all
}

/// A `when` table: checked as routing checks `filter` (errors under `key`), then compiled.
fn when(key: &str, filter: &FilterConfig) -> Result<crate::routing::MessageFilter, KeyError> {
    let route = super::RouteConfig {
        filter: Some(filter.clone()),
        ..Default::default()
    };
    route.validate().map_err(|e| {
        let rest = e.key.strip_prefix("filter").unwrap_or(&e.key);
        KeyError::new(format!("{key}{rest}"), e.message)
    })?;
    Ok(crate::routing::MessageFilter::new(filter))
}

fn check_header_name(key: &str, name: &str) -> Result<(), KeyError> {
    reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| KeyError::new(key, "not a valid header name"))
}
