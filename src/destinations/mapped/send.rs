//! The running `kind = "http"` destination: a message's requests are rendered once, in
//! `check` (and kept for retries); `send` groups a batch's requests that go to the same
//! action, method, URL and headers into one request when `batch.body` is set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value as Json};

use super::context::{Names, Scope};
use super::template::Mapping;
use super::{Action, Compiled, MappedConfig};
use crate::clock::Clock;
use crate::destinations::webhook::{signature, SIGNATURE_HEADER};
use crate::destinations::{
    http, secret_from_env, Check, Destination, DestinationConfig, Outgoing, Prepared, Preview,
    Refusal, RefusalKind, SendError, Sending,
};
use crate::json::doc::Doc;
use crate::routing::MessageFilter;
use crate::throttle::LogThrottle;

use super::MASK;

/// The requests one message becomes, rendered.
pub struct Requests(Vec<Request>);

#[cfg(test)]
impl Requests {
    pub fn body_of_first(&self) -> Option<Json> {
        let body = self.0.first()?.body.as_deref()?;
        Some(serde_json::from_slice(body).expect("bodies are JSON"))
    }
}

struct Request {
    action: usize,
    method: reqwest::Method,
    /// With the query string.
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The JSON text; `None` for GET.
    body: Option<Vec<u8>>,
}

pub struct MappedDestination {
    name: String,
    client: reqwest::Client,
    compiled: Compiled,
    /// `env` and `settings`: the variables the templates name and the secret settings,
    /// read at start.
    names: Arc<Names>,
    /// What they are in the live view: every secret `***`.
    masked_names: Arc<Names>,
    /// From `basic`, `bearer_env`, `api_key`.
    auth: Vec<(HeaderName, HeaderValue)>,
    secret: Option<Vec<u8>>,
    clock: Clock,
}

impl MappedDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &MappedConfig,
        compiled: Compiled,
        clock: Clock,
    ) -> anyhow::Result<MappedDestination> {
        let name = &config.name;
        let mut env = BTreeMap::new();
        for var in &compiled.env_names {
            env.insert(var.clone(), secret_from_env(name, "a template", var)?);
        }
        let mut settings = compiled.settings.clone();
        for (setting, var) in &compiled.secret_settings {
            let key = format!("settings.{setting}_env");
            settings.insert(setting.clone(), secret_from_env(name, &key, var)?.into());
        }
        let mut auth = Vec::new();
        let sensitive = |value: String| -> anyhow::Result<HeaderValue> {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                anyhow::anyhow!("destination `{name}`: a secret is not a valid header value")
            })?;
            value.set_sensitive(true);
            Ok(value)
        };
        if let Some(basic) = &own.basic {
            let password = secret_from_env(name, "basic.password_env", &basic.password_env)?;
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{password}", basic.user));
            auth.push((AUTHORIZATION, sensitive(format!("Basic {token}"))?));
        }
        if let Some(var) = &own.bearer_env {
            let token = secret_from_env(name, "bearer_env", var)?;
            auth.push((AUTHORIZATION, sensitive(format!("Bearer {token}"))?));
        }
        if let Some(key) = &own.api_key {
            let value = secret_from_env(name, "api_key.env", &key.env)?;
            auth.push((
                HeaderName::from_bytes(key.header.as_bytes())?,
                sensitive(value)?,
            ));
        }
        let secret = match &own.signing_secret_env {
            Some(var) => Some(secret_from_env(name, "signing_secret_env", var)?.into_bytes()),
            None => None,
        };
        Ok(MappedDestination {
            name: name.clone(),
            client: http::client(config.timeout())?,
            masked_names: masked(&compiled),
            compiled,
            names: Arc::new(names(env, settings)),
            auth,
            secret,
            clock,
        })
    }
}

/// Every variable the templates name and every secret setting, as `***`.
fn masked(compiled: &Compiled) -> Arc<Names> {
    let env = compiled
        .env_names
        .iter()
        .map(|name| (name.clone(), MASK.into()));
    let mut settings = compiled.settings.clone();
    for name in compiled.secret_settings.keys() {
        settings.insert(name.clone(), MASK.into());
    }
    Arc::new(names(env.collect(), settings))
}

/// The names templates read besides the message's fields.
fn names(env: BTreeMap<String, String>, settings: serde_json::Map<String, Json>) -> Names {
    let env = env.into_iter().map(|(k, v)| (k, Json::String(v))).collect();
    Names::default()
        .with("env", Json::Object(env))
        .with("settings", Json::Object(settings))
}

/// What a message becomes: its requests, skipped (no `when` holds), or refused.
pub(super) fn render(compiled: &Compiled, message: &[u8], names: &Arc<Names>) -> Check {
    // One parse, in place, for the `when`s and the templates.
    let Ok(parsed @ Doc::Object(_)) = Doc::parse(message) else {
        if compiled.when.as_ref().is_some_and(|w| !w.matches(message)) {
            return Check::Skip("when");
        }
        return refuse("not a JSON object".into());
    };
    if compiled
        .when
        .as_ref()
        .is_some_and(|w| !holds(w, &parsed, message))
    {
        return Check::Skip("when");
    }
    let mut requests = Vec::new();
    let scope = Scope::new(parsed, names.clone());
    for (i, action) in compiled.actions.iter().enumerate() {
        if action
            .when
            .as_ref()
            .is_some_and(|w| !holds(w, scope.message(), message))
        {
            continue;
        }
        match request(compiled, i, action, &scope) {
            Ok(Some(request)) => requests.push(request),
            // Its body rendered to nothing: the action is not taken (the next one may be).
            Ok(None) => continue,
            Err(detail) => return refuse(detail),
        }
        if !compiled.all {
            break;
        }
    }
    if requests.is_empty() {
        return Check::Skip("no action");
    }
    Check::Send(Some(Prepared::Http(Requests(requests))))
}

/// Whether a `when` holds for the message (`parsed` from `message`): from its type and
/// event already read where those are all it looks at.
fn holds(when: &MessageFilter, parsed: &Doc, message: &[u8]) -> bool {
    let text = |key| parsed.get(key).and_then(Doc::as_str);
    when.decide(text("type"), text("event"))
        .unwrap_or_else(|| when.matches(message))
}

fn refuse(detail: String) -> Check {
    Check::Refuse {
        code: "mapping".into(),
        detail,
    }
}

/// One action's request for the message; `None` when its body renders to nothing (a
/// single expression, undefined or null), so that a mapping can decline a message.
fn request(
    compiled: &Compiled,
    index: usize,
    action: &Action,
    scope: &Scope,
) -> Result<Option<Request>, String> {
    let env = &compiled.env;
    let rendered = action.url.render_text(env, scope)?.unwrap_or_default();
    let url = match action.url_form.known(rendered) {
        Ok(url) => with_query(url, &action.query, env, scope)?,
        Err(rendered) => {
            let mut url = url::Url::parse(&rendered)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    format!("{}: the URL rendered is not an http(s) URL", action.name)
                })?;
            if !action.query.is_empty() {
                let mut pairs = url.query_pairs_mut();
                for (name, value) in &action.query {
                    if let Some(value) = value.render_text(env, scope)? {
                        pairs.append_pair(name, &value);
                    }
                }
            }
            url.into()
        }
    };
    let mut headers = Vec::with_capacity(action.headers.len());
    for (name, value) in &action.headers {
        if let Some(value) = value.render_text(env, scope)? {
            // The value is not quoted: it can hold a secret.
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("header `{name}` rendered to an invalid value"))?;
            headers.push((name.clone(), value));
        }
    }
    let body = match (&action.method, &action.body) {
        (&reqwest::Method::GET, _) => None,
        (_, Some(body)) => {
            let mut out = Vec::with_capacity(512);
            if !body.write_some(env, scope, action.keep_nulls, &mut out)? {
                return Ok(None);
            }
            Some(out)
        }
        (_, None) => Some(serde_json::to_vec(scope.message()).expect("JSON values serialize")),
    };
    Ok(Some(Request {
        action: index,
        method: action.method.clone(),
        url,
        headers,
        body,
    }))
}

/// `url` (a URL as a parser writes it, without query or fragment) with the query
/// parameters, encoded as `url::Url::query_pairs_mut` encodes them.
fn with_query(
    mut url: String,
    query: &[(String, Mapping)],
    env: &minijinja::Environment<'static>,
    scope: &Scope,
) -> Result<String, String> {
    if query.is_empty() {
        return Ok(url);
    }
    let start = url.len() + 1;
    url.push('?');
    let mut pairs = url::form_urlencoded::Serializer::for_suffix(url, start);
    for (name, value) in query {
        if let Some(value) = value.render_text(env, scope)? {
            pairs.append_pair(name, &value);
        }
    }
    Ok(pairs.finish())
}

/// The body of a batch's requests to one place: the `batch.body` envelope around their
/// bodies, or the one body.
fn envelope(compiled: &Compiled, names: &Arc<Names>, bodies: &[&[u8]]) -> Result<Vec<u8>, String> {
    let Some(mapping) = &compiled.batch_body else {
        return Ok(bodies
            .first()
            .map_or(b"null".to_vec(), |body| body.to_vec()));
    };
    // The bodies read in place, as the envelope's message: `{{ batch }}` writes them back
    // without a JSON value per body.
    let batch = bodies
        .iter()
        .map(|body| Doc::parse(body).expect("bodies are JSON"))
        .collect();
    let message = Doc::Object(vec![(Cow::Borrowed("batch"), Doc::Array(batch))]);
    let scope = Scope::new(message, names.clone());
    let mut out = Vec::with_capacity(bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 64);
    mapping.write(&compiled.env, &scope, true, &mut out)?;
    Ok(out)
}

/// The requests as `fanout route` and the live view show them.
fn show(compiled: &Compiled, check: Check, names: &Arc<Names>) -> Preview {
    let requests = match check {
        Check::Send(Some(Prepared::Http(Requests(requests)))) => requests,
        Check::Skip(reason) => return Preview::Skip(reason),
        Check::Refuse { detail, .. } => return Preview::Refuse(detail),
        Check::Send(_) => return Preview::Refuse("nothing rendered".into()),
    };
    let mut shown = Vec::new();
    for request in requests {
        let mut headers = serde_json::Map::new();
        for (name, value) in &request.headers {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            headers.insert(name.to_string(), Json::String(text));
        }
        for (name, value) in &compiled.shown_auth {
            headers.insert(name.clone(), Json::String(value.clone()));
        }
        let body = match &request.body {
            Some(body) => match envelope(compiled, names, &[body]) {
                Ok(body) => serde_json::from_slice(&body).expect("bodies are JSON"),
                Err(detail) => return Preview::Refuse(detail),
            },
            None => Json::Null,
        };
        shown.push(json!({
            "action": compiled.actions[request.action].name,
            "method": request.method.as_str(),
            "url": request.url,
            "headers": headers,
            "body": body,
        }));
    }
    Preview::Send(json!({ "requests": shown }))
}

/// `fanout route`: reads no secret; every one is shown as `***`.
pub fn preview(compiled: &Compiled, message: &[u8]) -> Preview {
    let names = masked(compiled);
    show(compiled, render(compiled, message, &names), &names)
}

/// Requests to one place: the first, the bodies they carry, and their messages' indices
/// in the batch.
type Group<'a> = (&'a Request, Vec<&'a [u8]>, Vec<usize>);

/// What an error answer's body said, if it had one.
fn answer_of(e: &SendError) -> Option<&str> {
    match e {
        SendError::Retryable { answer, .. } | SendError::Rejected { answer, .. } => {
            answer.as_deref()
        }
        SendError::PartlyRejected { .. } => None,
    }
}

/// Spaces out the log lines about answers `drop_on` settled.
static DROPPED: LogThrottle = LogThrottle::new(Duration::from_secs(60));

impl MappedDestination {
    /// One request carrying `bodies` (in the `batch.body` envelope, if any).
    async fn send_one(&self, request: &Request, bodies: &[&[u8]]) -> Result<(), SendError> {
        let mut builder = self
            .client
            .request(request.method.clone(), &request.url)
            .headers(request.headers.iter().cloned().collect())
            .headers(self.auth.iter().cloned().collect());
        let body = if request.body.is_some() {
            envelope(&self.compiled, &self.names, bodies).map_err(|detail| SendError::Rejected {
                status: 0,
                detail,
                answer: None,
            })?
        } else {
            Vec::new()
        };
        if let Some(secret) = &self.secret {
            builder = builder.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        if request.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        http::send_batch(builder, body, false, self.clock)
            .await
            .map(drop)
            .map_err(|e| self.retried(e))
    }

    /// A 4xx answer a `retry_on` entry matches, made retryable (backoff, no Retry-After).
    fn retried(&self, e: SendError) -> SendError {
        match e {
            SendError::Rejected {
                status,
                detail,
                answer,
            } if self
                .compiled
                .retry_on
                .iter()
                .any(|entry| entry.matches(status, answer.as_deref().unwrap_or(""))) =>
            {
                SendError::Retryable {
                    status: Some(status),
                    retry_after: None,
                    detail,
                    answer,
                }
            }
            e => e,
        }
    }

    /// `Some` when a `drop_on` entry matches the 4xx answer: its messages are settled as
    /// skipped (logged, with the vendor's answer shortened), not dead-lettered.
    fn dropped(&self, e: &SendError) -> Option<()> {
        let status = e.status().filter(|s| (400..=499).contains(s))?;
        let answer = answer_of(e).unwrap_or("");
        self.compiled
            .drop_on
            .iter()
            .find(|entry| entry.matches(status, answer))?;
        if DROPPED.ready() {
            let shown: String = answer.chars().take(300).collect();
            tracing::warn!(
                destination = %self.name,
                status,
                answer = %shown,
                "answer matched `drop_on`: messages skipped, not dead-lettered"
            );
        }
        Some(())
    }
}

impl Destination for MappedDestination {
    fn check(&self, message: &[u8]) -> Check {
        render(&self.compiled, message, &self.names)
    }

    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move {
            // Requests to the same action, method, URL and headers, in first-seen order,
            // with the indices of the messages whose bodies they carry.
            let mut groups: Vec<Group> = Vec::new();
            for (index, message) in batch.iter().enumerate() {
                let Some(Prepared::Http(Requests(requests))) = message.prepared else {
                    continue;
                };
                for request in requests {
                    let body = request.body.as_deref().unwrap_or(b"null");
                    let same = |(r, _, _): &&mut Group| {
                        self.compiled.batch_body.is_some()
                            && r.action == request.action
                            && r.method == request.method
                            && r.url == request.url
                            && r.headers == request.headers
                    };
                    match groups.iter_mut().find(same) {
                        Some((_, bodies, indices)) => {
                            bodies.push(body);
                            indices.push(index);
                        }
                        None => groups.push((request, vec![body], vec![index])),
                    }
                }
            }
            let mut dropped = Vec::new();
            for (request, bodies, indices) in groups {
                match self.send_one(request, &bodies).await {
                    Ok(()) => {}
                    Err(e) => match self.dropped(&e) {
                        Some(()) => dropped.extend(indices.into_iter().map(|index| Refusal {
                            index,
                            kind: RefusalKind::Skipped { reason: "drop_on" },
                            status: e.status(),
                            detail: e.to_string(),
                            answer: answer_of(&e).map(str::to_string),
                        })),
                        None => return Err(e),
                    },
                }
            }
            if dropped.is_empty() {
                Ok(0)
            } else {
                Err(SendError::PartlyRejected { refused: dropped })
            }
        })
    }

    fn live_payload(&self, message: &[u8]) -> Option<Json> {
        match show(
            &self.compiled,
            render(&self.compiled, message, &self.masked_names),
            &self.masked_names,
        ) {
            Preview::Send(requests) => Some(requests),
            _ => None,
        }
    }
}
