//! `[[destinations]]`: one flat table per destination. `kind` picks the implementation;
//! keys that do not apply to the kind are refused by name, so a misplaced key is an
//! error rather than a silently ignored setting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::message::MessageType;

/// One destination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: DestinationKind,
    /// file: the output file, one JSON object per line.
    pub path: Option<PathBuf>,
    /// webhook: the URL posted to; segment: the base URL (`/v1/batch` is appended).
    pub url: Option<String>,
    /// webhook: headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// webhook: environment variable with the HMAC-SHA256 signing secret.
    pub signing_secret_env: Option<String>,
    /// webhook: a JSON array of messages per request, or one message per request.
    pub payload: Option<WebhookPayload>,
    /// segment: environment variable with the write key sent as Basic auth.
    pub write_key_env: Option<String>,
    /// webhook, segment: gzip the request body.
    pub gzip: Option<bool>,
    /// klaviyo: environment variable with the private API key.
    pub api_key_env: Option<String>,
    /// klaviyo: API base URL (default `https://a.klaviyo.com`).
    pub base_url: Option<String>,
    /// klaviyo: the `revision` header; `2023-01-24` sends seed 002's flat bodies.
    pub revision: Option<String>,
    /// klaviyo: events through bulk jobs (up to 1 000 per request); default true.
    pub bulk: Option<bool>,
    /// klaviyo: how Segment messages become events and profiles (`translate::Mapping`).
    pub mapping: Option<crate::translate::Mapping>,
    /// Batches sent at once (HTTP kinds).
    pub concurrency: Option<usize>,
    /// Keep each user's messages in the order accepted (HTTP kinds; default true).
    pub ordering: Option<bool>,
    /// Time allowed for one request (HTTP kinds).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    pub batch: Option<BatchConfig>,
    pub retry: Option<RetryConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    /// Names of the `[[sources]]` whose messages this destination gets; default all.
    pub sources: Option<Vec<String>>,
    /// Which messages this destination gets (all conditions must hold); default all.
    pub filter: Option<FilterConfig>,
    /// Dotted paths removed from each message before it is sent, e.g. `context.ip`.
    #[serde(default)]
    pub drop_fields: Vec<String>,
    /// Dotted path → dotted path, e.g. `"properties.revenue" = "properties.amount"`; applied
    /// after `drop_fields`. Missing parents of the new path are created; a message without
    /// the old path is left as it is.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

/// `filter = { types, events, properties }`: a message goes only if every condition given
/// holds (on the message as stored, before `drop_fields` / `rename`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Message types, e.g. `["track", "identify"]`.
    pub types: Option<Vec<MessageType>>,
    /// Event names of track messages, exact or globs: `*` any run of characters, `?` one
    /// character, e.g. `"Order *"`. Messages of other types are not constrained by it.
    pub events: Option<Vec<String>>,
    /// Dotted path under the message's `properties` (`traits` for identify and group) →
    /// condition, e.g. `"plan.tier" = { equals = "pro" }`.
    pub properties: Option<BTreeMap<String, PropertyCondition>>,
}

/// One property condition: exactly one of `equals` and `exists`. A JSON `null` counts as absent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyCondition {
    /// The value, as JSON: numbers compare by value (TOML `3` equals JSON `3.0`), anything
    /// else exactly; a TOML date-time is compared as its text.
    #[serde(default, deserialize_with = "toml_to_json")]
    pub equals: Option<serde_json::Value>,
    /// `true`: the path holds a value; `false`: it does not.
    pub exists: Option<bool>,
}

/// Reads any TOML value as JSON; date-times (which JSON lacks) become their text.
fn toml_to_json<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    fn unwrap_datetimes(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                // How the toml crate hands a date-time to a deserializer that is not its own.
                if let (1, Some(Value::String(text))) =
                    (map.len(), map.get("$__toml_private_datetime"))
                {
                    return Value::String(text.clone());
                }
                Value::Object(
                    map.into_iter()
                        .map(|(k, v)| (k, unwrap_datetimes(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.into_iter().map(unwrap_datetimes).collect()),
            other => other,
        }
    }
    serde_json::Value::deserialize(deserializer).map(|v| Some(unwrap_datetimes(v)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    File,
    Stdout,
    Webhook,
    Segment,
    Klaviyo,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::File => "file",
            DestinationKind::Stdout => "stdout",
            DestinationKind::Webhook => "webhook",
            DestinationKind::Segment => "segment",
            DestinationKind::Klaviyo => "klaviyo",
        }
    }

    /// Sends over HTTP (and so has retries, rate limits, concurrency).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            DestinationKind::Webhook | DestinationKind::Segment | DestinationKind::Klaviyo
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookPayload {
    /// `[message, …]`, one request per batch.
    #[default]
    Array,
    /// `message`, one request per message.
    Message,
}

/// When a batch is sent: whichever of the three is reached first.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_events: Option<usize>,
    pub max_bytes: Option<usize>,
    /// How long a partial batch waits for more messages.
    #[serde(default, with = "humantime_serde::option")]
    pub linger: Option<Duration>,
}

/// Retries of a failing batch: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts before a batch is dead-lettered; 0 means no limit (only `max_age`).
    #[serde(default)]
    pub max_attempts: u32,
    /// Time since a batch's first attempt after which it is dead-lettered.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Longest `Retry-After` honoured; longer answers are clamped to it.
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_attempts: 0,
            max_age: default_max_age(),
            max_retry_after: default_max_retry_after(),
        }
    }
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_max_age() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_max_retry_after() -> Duration {
    Duration::from_secs(300)
}

/// Outbound token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub rate: f64,
    /// Default: one second's worth (`rate`, at least 1).
    pub burst: Option<u32>,
    /// What a token pays for.
    #[serde(default)]
    pub per: RatePer,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatePer {
    #[default]
    Event,
    Request,
}

impl RateLimitConfig {
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.rate.ceil().max(1.0) as u32)
    }
}

/// The batch shape a destination is given, after defaults and the kind's own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

/// Segment's `/v1/batch` limits (and those of any fanout downstream).
pub const SEGMENT_MAX_EVENTS: usize = 2500;
/// 500 KB, less room for `{"batch":[` … `]}`.
pub const SEGMENT_MAX_BYTES: usize = 500 * 1024 - 64;

impl DestinationConfig {
    /// Checks the keys against the kind; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let kind = self.kind;
        let misplaced = |key: &str| {
            Err((
                key.to_string(),
                format!("`{key}` does not apply to kind `{}`", kind.as_str()),
            ))
        };
        let set = [
            ("path", self.path.is_some()),
            ("url", self.url.is_some()),
            ("headers", !self.headers.is_empty()),
            ("signing_secret_env", self.signing_secret_env.is_some()),
            ("payload", self.payload.is_some()),
            ("write_key_env", self.write_key_env.is_some()),
            ("gzip", self.gzip.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("base_url", self.base_url.is_some()),
            ("revision", self.revision.is_some()),
            ("bulk", self.bulk.is_some()),
            ("mapping", self.mapping.is_some()),
            ("concurrency", self.concurrency.is_some()),
            ("ordering", self.ordering.is_some()),
            ("timeout", self.timeout.is_some()),
            ("retry", self.retry.is_some()),
            ("rate_limit", self.rate_limit.is_some()),
        ];
        // What every HTTP kind takes: the engine's knobs.
        const HTTP: [&str; 5] = ["concurrency", "ordering", "timeout", "retry", "rate_limit"];
        let own: &[&str] = match kind {
            DestinationKind::File => &["path"],
            DestinationKind::Stdout => &[],
            DestinationKind::Webhook => {
                &["url", "headers", "signing_secret_env", "payload", "gzip"]
            }
            DestinationKind::Segment => &["url", "write_key_env", "gzip"],
            DestinationKind::Klaviyo => &["api_key_env", "base_url", "revision", "bulk", "mapping"],
        };
        let allowed = |key: &str| own.contains(&key) || (kind.is_http() && HTTP.contains(&key));
        for (key, is_set) in set {
            if is_set && !allowed(key) {
                return misplaced(key);
            }
        }
        let required = match kind {
            DestinationKind::File => Some(("path", self.path.is_some())),
            DestinationKind::Webhook => Some(("url", self.url.is_some())),
            DestinationKind::Segment => Some(("write_key_env", self.write_key_env.is_some())),
            DestinationKind::Klaviyo => Some(("api_key_env", self.api_key_env.is_some())),
            DestinationKind::Stdout => None,
        };
        if let Some((key, false)) = required {
            return Err((
                key.to_string(),
                format!("kind `{}` needs `{key}`", kind.as_str()),
            ));
        }
        for (key, url) in [("url", &self.url), ("base_url", &self.base_url)] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.parse::<http::Uri>().is_err()
                {
                    // Not quoted: a URL may carry a token or a password.
                    return Err((key.into(), "is not an http(s) URL".into()));
                }
            }
        }
        if let Some(revision) = &self.revision {
            crate::translate::Revision::from_header(revision)
                .map_err(|e| ("revision".to_string(), e.to_string()))?;
        }
        for name in self.headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err((format!("headers.{name}"), "not a valid header name".into()));
            }
        }
        if self.concurrency.is_some_and(|c| c == 0 || c > 256) {
            return Err(("concurrency".into(), "must be 1 to 256".into()));
        }
        // Upper bounds keep every deadline and buffer size the engine computes in range.
        let hour = Duration::from_secs(3600);
        let too_long = [
            ("timeout", self.timeout, hour),
            (
                "batch.linger",
                self.batch.as_ref().and_then(|b| b.linger),
                hour,
            ),
            (
                "retry.max_backoff",
                self.retry.as_ref().map(|r| r.max_backoff),
                24 * hour,
            ),
            (
                "retry.max_retry_after",
                self.retry.as_ref().map(|r| r.max_retry_after),
                24 * hour,
            ),
        ];
        for (key, value, limit) in too_long {
            if value.is_some_and(|v| v > limit) {
                return Err((key.into(), format!("at most {}s", limit.as_secs())));
            }
        }
        if let Some(rate) = &self.rate_limit {
            if !(rate.rate.is_finite() && rate.rate >= 0.001) {
                return Err((
                    "rate_limit.rate".into(),
                    "must be at least 0.001 (per second)".into(),
                ));
            }
            if rate.burst == Some(0) {
                return Err(("rate_limit.burst".into(), "must be at least 1".into()));
            }
        }
        if let Some(batch) = &self.batch {
            if batch.max_events.is_some_and(|n| n == 0 || n > 100_000) {
                return Err(("batch.max_events".into(), "must be 1 to 100000".into()));
            }
            if batch
                .max_bytes
                .is_some_and(|n| n == 0 || n > 256 * 1024 * 1024)
            {
                return Err(("batch.max_bytes".into(), "must be 1 to 268435456".into()));
            }
            if kind == DestinationKind::Segment {
                if batch.max_events.is_some_and(|n| n > SEGMENT_MAX_EVENTS) {
                    return Err((
                        "batch.max_events".into(),
                        format!("at most {SEGMENT_MAX_EVENTS} (Segment's batch limit)"),
                    ));
                }
                if batch.max_bytes.is_some_and(|n| n > SEGMENT_MAX_BYTES) {
                    return Err((
                        "batch.max_bytes".into(),
                        format!("at most {SEGMENT_MAX_BYTES} (Segment's 500 KB request limit)"),
                    ));
                }
            }
        }
        if let Some(retry) = &self.retry {
            if retry.initial_backoff.is_zero() || retry.initial_backoff > retry.max_backoff {
                return Err((
                    "retry.initial_backoff".into(),
                    "must be above 0 and at most retry.max_backoff".into(),
                ));
            }
        }
        self.validate_routing()
    }

    /// Checks `sources`, `filter`, `drop_fields` and `rename` on their own (that each
    /// source exists is checked against the whole config, in `Config::validate`).
    fn validate_routing(&self) -> Result<(), (String, String)> {
        let empty = |key: &str| Err((key.to_string(), "must not be empty".to_string()));
        if self.sources.as_ref().is_some_and(Vec::is_empty) {
            return empty("sources");
        }
        if let Some(filter) = &self.filter {
            if filter.types.is_none() && filter.events.is_none() && filter.properties.is_none() {
                return Err((
                    "filter".into(),
                    "give at least one of types, events, properties".into(),
                ));
            }
            if filter.types.as_ref().is_some_and(Vec::is_empty) {
                return empty("filter.types");
            }
            if let Some(events) = &filter.events {
                if events.is_empty() {
                    return empty("filter.events");
                }
                if let Some(j) = events.iter().position(String::is_empty) {
                    return empty(&format!("filter.events[{j}]"));
                }
            }
            if let Some(properties) = &filter.properties {
                if properties.is_empty() {
                    return empty("filter.properties");
                }
                for (path, condition) in properties {
                    let key = format!("filter.properties.{}", toml_key(path));
                    check_path(path).map_err(|m| (key.clone(), m))?;
                    match (&condition.equals, condition.exists) {
                        (None, None) => {
                            return Err((
                                key,
                                "give `equals = <value>` or `exists = true|false`".into(),
                            ))
                        }
                        (Some(_), Some(_)) => {
                            return Err((key, "give only one of `equals` and `exists`".into()))
                        }
                        (Some(serde_json::Value::Null), None) => {
                            return Err((
                                format!("{key}.equals"),
                                "not a value JSON can hold (nan or inf)".into(),
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        for (j, path) in self.drop_fields.iter().enumerate() {
            let key = format!("drop_fields[{j}]");
            check_path(path).map_err(|m| (key.clone(), m))?;
            if is_under(path, "type") {
                return Err((key, "`type` cannot be dropped: routing reads it".into()));
            }
        }
        let renames: Vec<(&String, &String)> = self.rename.iter().collect();
        for (i, &(from, to)) in renames.iter().enumerate() {
            let key = format!("rename.{}", toml_key(from));
            check_path(from).map_err(|m| (key.clone(), m))?;
            check_path(to).map_err(|m| (key.clone(), format!("`{to}`: {m}")))?;
            if from == to {
                return Err((key, "renames a path to itself".into()));
            }
            if is_under(from, "type") || is_under(to, "type") {
                return Err((
                    key,
                    "`type` cannot be renamed or replaced: routing reads it".into(),
                ));
            }
            if let Some(dropped) = self.drop_fields.iter().find(|d| is_under(from, d)) {
                return Err((
                    key,
                    format!("`{from}` is removed by drop_fields `{dropped}` before renames apply"),
                ));
            }
            if let Some(dropped) = self.drop_fields.iter().find(|d| overlap(to, d)) {
                return Err((
                    key,
                    format!("`{to}` is also in drop_fields (`{dropped}`): keep one of the two"),
                ));
            }
            // Renames touching the same paths would depend on the order they run in.
            for &(other_from, other_to) in &renames[i + 1..] {
                if [from, to]
                    .iter()
                    .any(|a| overlap(a, other_from) || overlap(a, other_to))
                {
                    return Err((
                        key,
                        format!("overlaps the rename of `{other_from}`: their order would matter"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Batch shape: the configured values over the kind's defaults, within its limits.
    pub fn batch_limits(&self) -> BatchLimits {
        let (events, bytes, linger) = match self.kind {
            DestinationKind::File | DestinationKind::Stdout => (1000, 1024 * 1024, 0),
            DestinationKind::Webhook => (100, 1024 * 1024, 200),
            DestinationKind::Segment => (500, SEGMENT_MAX_BYTES, 1000),
            // A bulk job takes up to 1 000 events and 5 MB.
            DestinationKind::Klaviyo if self.bulk != Some(false) => (1000, 4 * 1024 * 1024, 1000),
            DestinationKind::Klaviyo => (100, 4 * 1024 * 1024, 200),
        };
        let batch = self.batch.clone().unwrap_or_default();
        let mut max_events = batch.max_events.unwrap_or(events);
        if self.payload == Some(WebhookPayload::Message) {
            max_events = 1;
        }
        // A batch must fit in the bucket, or the limiter could never let it through.
        if let Some(rate) = self.rate_limit.as_ref().filter(|r| r.per == RatePer::Event) {
            max_events = max_events.min(rate.burst() as usize);
        }
        BatchLimits {
            max_events,
            max_bytes: batch.max_bytes.unwrap_or(bytes),
            linger: batch.linger.unwrap_or(Duration::from_millis(linger)),
        }
    }

    pub fn retry(&self) -> RetryConfig {
        self.retry.clone().unwrap_or_default()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(1)
    }

    pub fn ordering(&self) -> bool {
        self.ordering.unwrap_or(true)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(30))
    }
}

/// A dotted path: non-empty segments separated by dots.
fn check_path(path: &str) -> Result<(), String> {
    if path.split('.').any(str::is_empty) {
        return Err(format!(
            "`{path}` is not a dotted path (e.g. `context.ip`): empty segment"
        ));
    }
    Ok(())
}

/// `path` is `prefix` or lies inside it.
fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// One of the two paths is the other or lies inside it.
fn overlap(a: &str, b: &str) -> bool {
    is_under(a, b) || is_under(b, a)
}

/// A map key as TOML writes it in a key path: quoted when it holds a dot.
fn toml_key(key: &str) -> String {
    if key.contains(['.', '"', ' ']) || key.is_empty() {
        format!("{key:?}")
    } else {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> DestinationConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn keys_of_another_kind_are_refused_by_name() {
        let d = parse("name = \"f\"\nkind = \"file\"\npath = \"x\"\nurl = \"http://h\"\n");
        assert_eq!(d.validate().unwrap_err().0, "url");
        let d = parse("name = \"w\"\nkind = \"webhook\"\n");
        assert_eq!(d.validate().unwrap_err().0, "url");
        let d =
            parse("name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\nurl = \"ftp://x\"\n");
        assert_eq!(d.validate().unwrap_err().0, "url");
    }

    /// A config with sources `web` and `ios` and one file destination ending in `rules`
    /// (its first line is line 12).
    fn routed(rules: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(&format!(
            "[[sources]]\nname = \"web\"\nwrite_keys = [\"k1\"]\n\n[[sources]]\nname = \"ios\"\n\n\
             [[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/f\"\n{rules}"
        ))
    }

    #[test]
    fn routing_keys_parse() {
        let c = routed(
            "sources = [\"ios\"]\ndrop_fields = [\"context.ip\"]\n\
             rename = { \"properties.revenue\" = \"properties.amount\" }\n\
             [destinations.filter]\ntypes = [\"track\", \"page\"]\nevents = [\"Order *\"]\n\
             [destinations.filter.properties]\n\"plan.tier\" = { equals = \"pro\" }\n\
             total = { equals = 3 }\nseen = { equals = 1979-05-27T07:32:00Z }\nemail = { exists = true }\n",
        )
        .unwrap();
        let d = &c.destinations[0];
        assert_eq!(d.sources.as_deref(), Some(&["ios".to_string()][..]));
        let filter = d.filter.as_ref().unwrap();
        assert_eq!(
            filter.types.as_deref(),
            Some(&[MessageType::Track, MessageType::Page][..])
        );
        let properties = filter.properties.as_ref().unwrap();
        assert_eq!(
            properties["plan.tier"].equals,
            Some(serde_json::json!("pro"))
        );
        assert_eq!(properties["total"].equals, Some(serde_json::json!(3)));
        assert_eq!(
            properties["seen"].equals,
            Some(serde_json::json!("1979-05-27T07:32:00Z"))
        );
        assert_eq!(properties["email"].exists, Some(true));
        assert_eq!(d.rename["properties.revenue"], "properties.amount");
    }

    #[test]
    fn routing_errors_name_key_and_line() {
        let cases = [
            (
                "sources = [\"web\", \"android\"]\n",
                "destinations[0].sources[1]",
                12,
                "android",
            ),
            ("sources = []\n", "destinations[0].sources", 12, "empty"),
            (
                "filter = { types = [\"track\", \"click\"] }\n",
                "destinations[0].filter.types[1]",
                12,
                "click",
            ),
            (
                "filter = { types = [] }\n",
                "destinations[0].filter.types",
                12,
                "empty",
            ),
            (
                "filter = {}\n",
                "destinations[0].filter",
                12,
                "at least one",
            ),
            (
                "filter = { event = [\"x\"] }\n",
                "destinations[0].filter.event",
                12,
                "event",
            ),
            (
                "filter = { events = [\"a\", \"\"] }\n",
                "destinations[0].filter.events[1]",
                12,
                "empty",
            ),
            (
                "[destinations.filter.properties]\nplan = { equals = 1, exists = true }\n",
                "destinations[0].filter.properties.plan",
                13,
                "only one",
            ),
            (
                "[destinations.filter.properties]\nplan = {}\n",
                "destinations[0].filter.properties.plan",
                13,
                "equals",
            ),
            (
                "[destinations.filter.properties]\nplan = { equal = 1 }\n",
                "destinations[0].filter.properties.plan.equal",
                13,
                "equal",
            ),
            (
                "[destinations.filter.properties]\nplan = { equals = nan }\n",
                "destinations[0].filter.properties.plan.equals",
                13,
                "nan",
            ),
            (
                "[destinations.filter.properties]\n\"a..b\" = { exists = true }\n",
                "destinations[0].filter.properties.\"a..b\"",
                12,
                "empty segment",
            ),
            (
                "drop_fields = [\"context.ip\", \"type\"]\n",
                "destinations[0].drop_fields[1]",
                12,
                "type",
            ),
            (
                "drop_fields = [\"\"]\n",
                "destinations[0].drop_fields[0]",
                12,
                "dotted path",
            ),
            (
                "rename = { type = \"kind\" }\n",
                "destinations[0].rename.type",
                12,
                "type",
            ),
            (
                "rename = { \"properties.a\" = \"context.ip\" }\ndrop_fields = [\"context\"]\n",
                "destinations[0].rename.\"properties.a\"",
                12,
                "drop_fields",
            ),
            (
                "rename = { \"context.ip\" = \"properties.ip\" }\ndrop_fields = [\"context.ip\"]\n",
                "destinations[0].rename.\"context.ip\"",
                12,
                "removed",
            ),
            (
                "rename = { a = \"b\", c = \"b.x\" }\n",
                "destinations[0].rename.a",
                12,
                "overlaps",
            ),
            (
                "rename = { a = \"a\" }\n",
                "destinations[0].rename.a",
                12,
                "itself",
            ),
            (
                "rename = { a = \"b.\" }\n",
                "destinations[0].rename.a",
                12,
                "b.",
            ),
        ];
        for (rules, key, line, says) in cases {
            let e = routed(rules).unwrap_err();
            assert_eq!(e.key, key, "{rules}: {e}");
            assert_eq!(e.line, Some(line), "{rules}: {e}");
            assert!(e.message.contains(says), "{rules}: {e}");
        }
    }

    #[test]
    fn batch_limits_follow_kind_payload_and_rate() {
        let d = parse("name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\n");
        assert_eq!(d.batch_limits().max_events, 500);
        assert_eq!(d.batch_limits().max_bytes, SEGMENT_MAX_BYTES);
        let d = parse(
            "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h/x\"\nrate_limit = { rate = 50 }\n",
        );
        assert_eq!(d.batch_limits().max_events, 50);
        let d = parse(
            "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h/x\"\npayload = \"message\"\n",
        );
        assert_eq!(d.batch_limits().max_events, 1);
        let d = parse(
            "name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\nbatch = { max_events = 3000 }\n",
        );
        assert_eq!(d.validate().unwrap_err().0, "batch.max_events");
    }
}
