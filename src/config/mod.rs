//! The TOML configuration: one file, validated as a whole before anything starts.
//!
//! Every struct denies unknown keys, so a typo is an error with its key path and line,
//! not a silently ignored setting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::destinations::DestinationConfig;

/// The whole configuration file. `D` is how a destination is held: its typed config,
/// or, while the file is read, its TOML table (each kind reads its own keys from it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<D = DestinationConfig> {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cors: CorsConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    /// Each source owns write keys; a request's key says which source sent it.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Where accepted messages go; each reads the queue from its own cursor.
    #[serde(default)]
    pub destinations: Vec<D>,
    #[serde(default)]
    pub admin: AdminConfig,
}

/// Operator endpoints (`/admin/...`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the bearer token the admin endpoints require;
    /// without it they answer 404.
    pub token_env: Option<String>,
    /// A separate address for the operator endpoints (`/admin/...`, `/metrics`), e.g.
    /// one not exposed to the internet; without it they share `server.listen`.
    pub listen: Option<SocketAddr>,
}

/// Listening address, storage and request admission.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP server binds to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the durable queue and destination cursors.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Requests processed at once; past this, new requests get 429 + Retry-After
    /// before their body is read, so clients back off instead of timing out.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Sent in `Retry-After` with a 429 or 503, e.g. "1s": whole seconds, 1s to 1h,
    /// since the header carries seconds (read it with [`ServerConfig::retry_after_secs`]).
    #[serde(default = "default_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
    /// Size at which the queue starts a new segment file.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// How long a request body may stall between two chunks before the request is
    /// answered 408, freeing its in-flight slot, e.g. "30s".
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a whole request body may take to arrive, however steadily it trickles,
    /// before the request is answered 408, e.g. "60s".
    #[serde(default = "default_body_deadline", with = "humantime_serde")]
    pub body_deadline: Duration,
    /// Connections open at once. At the cap the longest-idle connections are closed to
    /// make room, and new ones wait in the kernel's backlog. Never more than the process's
    /// open-file limit allows (with room kept for the queue and destinations).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, from its first byte (or
    /// from connecting, for the first request), before the connection is closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request before it is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight requests and deliveries, e.g. "30s".
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Disk budget of the queue: once the data some destination has not consumed
    /// reaches it, ingest answers 503 + Retry-After instead of accepting more.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: u64,
}

/// Request limits; the defaults are Segment's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest single message, in bytes of JSON as received.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest request body, in bytes, checked on the wire and again after gzip decoding.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Most messages in one batch.
    #[serde(default = "default_max_batch_messages")]
    pub max_batch_messages: usize,
    /// Deepest nesting of objects and arrays inside one message; deeper input is
    /// refused so that no downstream parser is handed a stack-exhausting document.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
}

/// Cross-origin access for browser traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins; `["*"]` (the default) allows any, echoing the request's origin.
    #[serde(default = "default_allowed_origins")]
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer, e.g. "24h" (whole seconds:
    /// `Access-Control-Max-Age` carries seconds).
    #[serde(default = "default_cors_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

/// One sending application; its write keys authenticate its requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name used in logs, the queue and routing.
    pub name: String,
    /// Write keys written in the file (fine for development).
    #[serde(default)]
    pub write_keys: Vec<String>,
    /// Environment variable holding more write keys, comma-separated (for production).
    pub write_keys_env: Option<String>,
    /// `dedupe = { enabled = false }` turns messageId dedupe off for this source.
    #[serde(default)]
    pub dedupe: SourceDedupeConfig,
}

/// Per-source dedupe switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDedupeConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for SourceDedupeConfig {
    fn default() -> Self {
        SourceDedupeConfig { enabled: true }
    }
}

/// Dropping repeated messageIds (client retries) within a window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// How long an accepted messageId is remembered, e.g. "24h".
    #[serde(default = "default_dedupe_ttl", with = "humantime_serde")]
    pub ttl: std::time::Duration,
    /// Most keys held (about 28 bytes each in memory); past it the oldest are dropped
    /// early, which is logged and counted.
    #[serde(default = "default_dedupe_max_entries")]
    pub max_entries: usize,
    /// `memory` (this process only) or `redis` (shared by several instances).
    #[serde(default)]
    pub backend: DedupeBackend,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`. Prefer `redis_url_env` when it
    /// carries a password.
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis URL.
    pub redis_url_env: Option<String>,
    /// Prefix of the Redis keys fanout writes.
    #[serde(default = "default_redis_key_prefix")]
    pub redis_key_prefix: String,
    /// When Redis cannot be reached: `fail_open` (accept, dedupe locally, log and
    /// count) or `fail_closed` (503 + Retry-After). Losing dedupe beats losing data.
    #[serde(default)]
    pub on_redis_error: RedisFailure,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            ttl: default_dedupe_ttl(),
            max_entries: default_dedupe_max_entries(),
            backend: DedupeBackend::default(),
            redis_url: None,
            redis_url_env: None,
            redis_key_prefix: default_redis_key_prefix(),
            on_redis_error: RedisFailure::default(),
        }
    }
}

impl DedupeConfig {
    /// The Redis URL from `redis_url_env` or `redis_url`.
    pub fn redis_url(&self) -> anyhow::Result<String> {
        if let Some(var) = &self.redis_url_env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!("environment variable {var} (dedupe.redis_url_env) is not set")
            });
        }
        self.redis_url.clone().ok_or_else(|| {
            anyhow::anyhow!("dedupe.backend = \"redis\" needs dedupe.redis_url or redis_url_env")
        })
    }
}

/// Where the dedupe window lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeBackend {
    #[default]
    Memory,
    Redis,
}

/// What to do when the shared dedupe store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    #[default]
    FailOpen,
    FailClosed,
}

const fn default_true() -> bool {
    true
}
const fn default_dedupe_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}
const fn default_dedupe_max_entries() -> usize {
    10_000_000
}
fn default_redis_key_prefix() -> String {
    "fanout:dedupe:".to_string()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8088))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
const fn default_max_in_flight() -> usize {
    1024
}
const fn default_retry_after() -> Duration {
    Duration::from_secs(1)
}
const fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_body_deadline() -> Duration {
    Duration::from_secs(60)
}
const fn default_max_connections() -> usize {
    10_000
}
const fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
const fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
const fn default_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
const fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
const fn default_max_queue_bytes() -> u64 {
    10 * 1024 * 1024 * 1024
}
const fn default_max_message_bytes() -> usize {
    32 * 1024
}
const fn default_max_request_bytes() -> usize {
    500 * 1024
}
const fn default_max_batch_messages() -> usize {
    2500
}
const fn default_max_json_depth() -> usize {
    64
}
fn default_allowed_origins() -> Vec<String> {
    vec!["*".to_string()]
}
const fn default_cors_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: default_data_dir(),
            max_in_flight: default_max_in_flight(),
            retry_after: default_retry_after(),
            body_timeout: default_body_timeout(),
            body_deadline: default_body_deadline(),
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            segment_bytes: default_segment_bytes(),
            shutdown_grace: default_shutdown_grace(),
            max_queue_bytes: default_max_queue_bytes(),
        }
    }
}

impl ServerConfig {
    /// `retry_after` in seconds, as the `Retry-After` header carries it (validated to be
    /// whole seconds from 1 to 3600).
    pub fn retry_after_secs(&self) -> u32 {
        u32::try_from(self.retry_after.as_secs()).unwrap_or(u32::MAX)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: default_max_message_bytes(),
            max_request_bytes: default_max_request_bytes(),
            max_batch_messages: default_max_batch_messages(),
            max_json_depth: default_max_json_depth(),
        }
    }
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: default_allowed_origins(),
            max_age: default_cors_max_age(),
        }
    }
}

/// A configuration problem, located by key path and (where known) line.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", origin.as_deref().map(|o| format!("{o}: ")).unwrap_or_default(), location(.key, .line))]
pub struct ConfigError {
    /// The file, when the config came from one.
    pub origin: Option<String>,
    /// Dotted key path, e.g. `destinations[0].path`.
    pub key: String,
    /// 1-based line of the key in the file.
    pub line: Option<usize>,
    pub message: String,
}

fn location(key: &str, line: &Option<usize>) -> String {
    match (key.is_empty(), line) {
        (true, Some(l)) => format!("line {l}"),
        (true, None) => "config".to_string(),
        (false, Some(l)) => format!("`{key}` (line {l})"),
        (false, None) => format!("`{key}`"),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: Some(path.display().to_string()),
            key: String::new(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.origin = Some(path.display().to_string());
            e
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let doc = DeTable::parse(text).map_err(|e| ConfigError {
            origin: None,
            key: String::new(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().to_string(),
        })?;
        let lines = LineIndex {
            text,
            doc: doc.clone(),
        };
        let raw: Config<toml::Table> =
            serde_path_to_error::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." { String::new() } else { key };
                let inner = e.into_inner();
                let line = inner
                    .span()
                    .map(|s| line_of(text, s.start))
                    .or_else(|| lines.line(&key));
                let message = renamed_key(&key, &lines)
                    .unwrap_or_else(|| with_duration_hint(inner.message()));
                let message = hide_secret(&key, message);
                ConfigError {
                    origin: None,
                    key,
                    line,
                    message,
                }
            })?;
        let config = raw.read_destinations(&lines)?;
        config.validate(&lines)?;
        Ok(config)
    }
}

impl Config<toml::Table> {
    /// Reads each destination's table as its kind's config, locating errors in the file.
    fn read_destinations(self, lines: &LineIndex<'_>) -> Result<Config, ConfigError> {
        let mut destinations = Vec::with_capacity(self.destinations.len());
        for (i, table) in self.destinations.into_iter().enumerate() {
            let destination = DestinationConfig::from_table(table)
                .map_err(|e| lines.error(&format!("destinations[{i}]"), e))?;
            destinations.push(destination);
        }
        Ok(Config {
            server: self.server,
            limits: self.limits,
            cors: self.cors,
            dedupe: self.dedupe,
            sources: self.sources,
            destinations,
            admin: self.admin,
        })
    }
}

impl Config {
    /// Checks what serde cannot: uniqueness, non-empty keys, safe names.
    fn validate(&self, lines: &LineIndex<'_>) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError {
            origin: None,
            line: lines.line(&key),
            key,
            message,
        };
        let retry_after = self.server.retry_after;
        if retry_after.subsec_nanos() != 0 || !(1..=3600).contains(&retry_after.as_secs()) {
            return Err(err(
                "server.retry_after".into(),
                "must be whole seconds from 1s to 1h (it is sent as `Retry-After: <seconds>`)"
                    .into(),
            ));
        }
        for (key, value) in [
            ("server.body_timeout", self.server.body_timeout),
            ("server.body_deadline", self.server.body_deadline),
            ("server.header_timeout", self.server.header_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
        ] {
            if value.is_zero() {
                return Err(err(key.into(), "must be more than 0, e.g. \"30s\"".into()));
            }
        }
        if self.cors.max_age.subsec_nanos() != 0 {
            return Err(err(
                "cors.max_age".into(),
                "must be whole seconds (it is sent as `Access-Control-Max-Age: <seconds>`)".into(),
            ));
        }
        if self.dedupe.ttl.as_secs() == 0 {
            return Err(err(
                "dedupe.ttl".into(),
                "must be at least one second".into(),
            ));
        }
        if self.dedupe.backend == DedupeBackend::Redis
            && self.dedupe.redis_url.is_none()
            && self.dedupe.redis_url_env.is_none()
        {
            return Err(err(
                "dedupe.backend".into(),
                "redis needs dedupe.redis_url or dedupe.redis_url_env".into(),
            ));
        }
        if self.dedupe.max_entries == 0 {
            return Err(err(
                "dedupe.max_entries".into(),
                "must be at least 1".into(),
            ));
        }
        if self.server.max_queue_bytes < 2 * self.server.segment_bytes {
            return Err(err(
                "server.max_queue_bytes".into(),
                "must be at least twice server.segment_bytes (the newest segment is always kept)"
                    .into(),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(err(
                "server.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.server.max_in_flight == 0 {
            return Err(err(
                "server.max_in_flight".into(),
                "must be at least 1".into(),
            ));
        }
        if self.limits.max_message_bytes > self.limits.max_request_bytes {
            return Err(err(
                "limits.max_message_bytes".into(),
                "must not exceed limits.max_request_bytes".into(),
            ));
        }
        if self.admin.listen == Some(self.server.listen) {
            return Err(err(
                "admin.listen".into(),
                "must differ from server.listen (leave it out to share that address)".into(),
            ));
        }
        // An empty file (or one cut before its sources) would answer 401 to every client,
        // and Segment's libraries drop events on a 401.
        if self.sources.is_empty() {
            return Err(err(
                "sources".into(),
                "no [[sources]]: at least one source with write keys is needed, or every \
                 request is refused (401)"
                    .into(),
            ));
        }
        let mut source_names = HashSet::new();
        let mut keys = HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if !is_safe_name(&source.name) {
                return Err(err(format!("sources[{i}].name"), NAME_RULE.into()));
            }
            if !source_names.insert(source.name.as_str()) {
                return Err(err(
                    format!("sources[{i}].name"),
                    format!("source `{}` is defined twice", source.name),
                ));
            }
            for (k, key) in source.write_keys.iter().enumerate() {
                if key.is_empty() {
                    return Err(err(
                        format!("sources[{i}].write_keys[{k}]"),
                        "write key is empty".into(),
                    ));
                }
                if !keys.insert(key.as_str()) {
                    return Err(err(
                        format!("sources[{i}].write_keys[{k}]"),
                        "write key is used by more than one source".into(),
                    ));
                }
            }
        }
        let mut dest_names = HashSet::new();
        for (i, dest) in self.destinations.iter().enumerate() {
            if !is_safe_name(&dest.name) {
                return Err(err(format!("destinations[{i}].name"), NAME_RULE.into()));
            }
            if !dest_names.insert(dest.name.as_str()) {
                return Err(err(
                    format!("destinations[{i}].name"),
                    format!("destination `{}` is defined twice", dest.name.as_str()),
                ));
            }
            if let Err(e) = dest.validate() {
                return Err(lines.error(&format!("destinations[{i}]"), e));
            }
            for (j, name) in dest.route.sources.iter().flatten().enumerate() {
                if !source_names.contains(name.as_str()) {
                    return Err(err(
                        format!("destinations[{i}].sources[{j}]"),
                        format!("no source named `{name}` in [[sources]]"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Keys renamed before 1.0: old key path, new key, its example value. Using an old key
/// is an error that says what to write instead, rather than a bare "unknown field".
const RENAMED: &[(&str, &str, &str)] = &[
    ("server.retry_after_secs", "retry_after", "1s"),
    ("server.body_timeout_secs", "body_timeout", "30s"),
    ("server.shutdown_grace_secs", "shutdown_grace", "30s"),
    ("cors.max_age_secs", "max_age", "24h"),
];

/// The message for a renamed key at `key`; the suggestion carries the old value when it
/// was a number of seconds.
fn renamed_key(key: &str, lines: &LineIndex<'_>) -> Option<String> {
    let &(old, new, example) = RENAMED.iter().find(|(old, _, _)| *old == key)?;
    let value = lines
        .integer(old)
        .map_or_else(|| example.to_string(), humane_secs);
    Some(format!("`{old}` was renamed: use `{new} = \"{value}\"`"))
}

/// Seconds as the shortest humantime unit that is exact: 86400 → "24h", 90 → "90s".
fn humane_secs(secs: u64) -> String {
    match secs {
        0 => "0s".to_string(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// humantime-serde refuses a bare number with "invalid type: integer `30`, expected a
/// duration"; say what a duration looks like.
fn with_duration_hint(message: &str) -> String {
    if message.ends_with("expected a duration") {
        format!("{message} with a unit, as a string such as \"30s\", \"1m\" or \"24h\"")
    } else {
        message.to_string()
    }
}

/// Keys whose values may be secrets (write keys, a Redis URL with its password, webhook
/// headers such as `Authorization`): an error about them does not quote the value, since
/// errors go to the terminal and to the log (a refused reload).
const SECRET_KEYS: &[&str] = &["write_keys", "redis_url", "headers"];

/// serde quotes a refused string as `string "…"`; under a secret key that part is cut.
fn hide_secret(key: &str, message: String) -> String {
    let secret = key
        .split('.')
        .any(|part| SECRET_KEYS.contains(&part.split('[').next().unwrap_or(part)));
    let Some(start) = message.find("string \"").filter(|_| secret) else {
        return message;
    };
    match message.rfind("\", expected") {
        Some(end) if end > start => format!(
            "{}string (not shown){}",
            &message[..start],
            &message[end + 1..]
        ),
        _ => "this value is refused (not shown: it may be a secret)".to_string(),
    }
}

const NAME_RULE: &str = "names are 1-64 characters of A-Z a-z 0-9 _ - .";

/// Names become file names (cursors) and metric labels, so keep them plain.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of a key path such as `destinations[1].path` in the parsed document.
struct LineIndex<'i> {
    text: &'i str,
    doc: Spanned<DeTable<'i>>,
}

impl LineIndex<'_> {
    /// A destination's `KeyError` (its key relative to `at`) as a located `ConfigError`.
    fn error(&self, at: &str, e: crate::destinations::KeyError) -> ConfigError {
        let key = if e.key.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{}", e.key)
        };
        ConfigError {
            origin: None,
            line: self.line(&key),
            message: hide_secret(&key, e.message),
            key,
        }
    }

    fn line(&self, path: &str) -> Option<usize> {
        let mut span = self.doc.span();
        let mut table = Some(self.doc.get_ref());
        let mut value: Option<&DeValue<'_>> = None;
        for segment in path.split('.').filter(|s| !s.is_empty()) {
            let (name, index) = match segment.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (segment, None),
            };
            let t = match value {
                Some(DeValue::Table(t)) => t,
                Some(_) => return Some(line_of(self.text, span.start)),
                None => table?,
            };
            table = None;
            let Some((key, v)) = t.iter().find(|(k, _)| k.get_ref() == name) else {
                break;
            };
            span = key.span();
            value = Some(v.get_ref());
            if let (Some(i), Some(DeValue::Array(items))) = (index, value) {
                let Some(item) = items.get(i) else {
                    break;
                };
                span = item.span();
                value = Some(item.get_ref());
            }
        }
        Some(line_of(self.text, span.start))
    }

    /// The non-negative integer at a path of plain table keys, e.g. `server.retry_after_secs`.
    fn integer(&self, path: &str) -> Option<u64> {
        let mut table = self.doc.get_ref();
        let mut names = path.split('.').peekable();
        while let Some(name) = names.next() {
            let (_, value) = table.iter().find(|(k, _)| k.get_ref() == name)?;
            match (value.get_ref(), names.peek()) {
                (DeValue::Table(t), Some(_)) => table = t,
                (DeValue::Integer(i), None) => {
                    return u64::from_str_radix(i.as_str(), i.radix()).ok();
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:9000"
data_dir = "/tmp/x"

[[sources]]
name = "web"
write_keys = ["k1"]

[[destinations]]
name = "out"
kind = "file"
path = "/tmp/x/out.jsonl"
"#;

    #[test]
    fn parses_the_documented_keys() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.sources[0].write_keys, vec!["k1"]);
        assert_eq!(c.limits.max_message_bytes, 32 * 1024);
        assert_eq!(c.destinations[0].kind(), "file");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("data_dir", "data_dri");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.message.contains("data_dri"), "{e}");
        assert_eq!(e.key, "server.data_dri");
        assert_eq!(e.line, Some(4), "{e}");
    }

    #[test]
    fn unknown_destination_key_is_located() {
        let text = GOOD.replace("path = ", "pth = ");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.to_string().contains("destinations[0]"), "{e}");
        assert!(e.message.contains("pth"), "{e}");
        assert!(e.line.is_some_and(|l| l >= 10), "{e}");
    }

    #[test]
    fn duplicate_write_key_is_refused_with_line() {
        let text = format!("{GOOD}\n[[sources]]\nname = \"app\"\nwrite_keys = [\"k1\"]\n");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key, "sources[1].write_keys[0]");
        assert_eq!(e.line, Some(17), "{e}");
    }

    #[test]
    fn bad_value_type_names_the_key() {
        let text = GOOD.replace("\"127.0.0.1:9000\"", "9000");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key, "server.listen", "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    fn parse_with(section: &str, lines: &str) -> Result<Config, ConfigError> {
        Config::parse(&GOOD.replacen(
            &format!("[{section}]\n"),
            &format!("[{section}]\n{lines}\n"),
            1,
        ))
    }

    #[test]
    fn durations_have_the_old_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.server.retry_after, Duration::from_secs(1));
        assert_eq!(c.server.retry_after_secs(), 1);
        assert_eq!(c.server.body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.cors.max_age, Duration::from_secs(86_400));
    }

    #[test]
    fn durations_parse_with_units() {
        let c = parse_with(
            "server",
            "retry_after = \"1m\"\nbody_timeout = \"30s\"\nshutdown_grace = \"1m 30s\"",
        )
        .unwrap();
        assert_eq!(c.server.retry_after_secs(), 60);
        assert_eq!(c.server.body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(90));
        let c = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"24h\"\n")).unwrap();
        assert_eq!(c.cors.max_age, Duration::from_secs(86_400));
        let c = parse_with("server", "body_timeout = \"250ms\"").unwrap();
        assert_eq!(c.server.body_timeout, Duration::from_millis(250));
    }

    #[test]
    fn a_bare_integer_duration_is_refused_with_key_and_line() {
        let e = parse_with("server", "body_timeout = 30").unwrap_err();
        assert_eq!(e.key, "server.body_timeout", "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("\"30s\""), "{e}");
        let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = 86400\n")).unwrap_err();
        assert_eq!(e.key, "cors.max_age", "{e}");
        assert_eq!(e.line, Some(16), "{e}");
    }

    #[test]
    fn duration_bounds_are_checked_with_key_and_line() {
        let cases = [
            ("server", "retry_after = \"0s\"", "server.retry_after"),
            ("server", "retry_after = \"1500ms\"", "server.retry_after"),
            ("server", "retry_after = \"2h\"", "server.retry_after"),
            ("server", "body_timeout = \"0s\"", "server.body_timeout"),
            ("server", "shutdown_grace = \"0s\"", "server.shutdown_grace"),
        ];
        for (section, lines, key) in cases {
            let e = parse_with(section, lines).unwrap_err();
            assert_eq!(e.key, key, "{lines}: {e}");
            assert_eq!(e.line, Some(3), "{lines}: {e}");
        }
        let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"1.5s\"\n")).unwrap_err();
        assert_eq!(e.key, "cors.max_age", "{e}");
        assert_eq!(e.line, Some(16), "{e}");
        assert!(Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"0s\"\n")).is_ok());
    }

    #[test]
    fn renamed_keys_say_what_to_write() {
        let e = parse_with("server", "retry_after_secs = 1").unwrap_err();
        assert_eq!(e.key, "server.retry_after_secs");
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(
            e.message,
            "`server.retry_after_secs` was renamed: use `retry_after = \"1s\"`"
        );
        let e = parse_with("server", "shutdown_grace_secs = 90").unwrap_err();
        assert_eq!(
            e.message,
            "`server.shutdown_grace_secs` was renamed: use `shutdown_grace = \"90s\"`"
        );
        let e = parse_with("server", "body_timeout_secs = 120").unwrap_err();
        assert_eq!(
            e.message,
            "`server.body_timeout_secs` was renamed: use `body_timeout = \"2m\"`"
        );
        let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age_secs = 86400\n")).unwrap_err();
        assert_eq!(e.key, "cors.max_age_secs");
        assert_eq!(e.line, Some(16), "{e}");
        assert_eq!(
            e.to_string(),
            "`cors.max_age_secs` (line 16): `cors.max_age_secs` was renamed: use `max_age = \"24h\"`"
        );
        // Not a number: the suggestion falls back to the default.
        let e = parse_with("server", "retry_after_secs = \"x\"").unwrap_err();
        assert!(e.message.ends_with("use `retry_after = \"1s\"`"), "{e}");
    }

    #[test]
    fn errors_do_not_quote_secret_values() {
        let text = GOOD.replace("[\"k1\"]", "\"wk_live_secret\"");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key, "sources[0].write_keys", "{e}");
        assert!(!e.to_string().contains("wk_live_secret"), "{e}");
        assert!(e.message.contains("expected a sequence"), "{e}");
        let text = format!("{GOOD}headers = \"Authorization: Bearer s3cret\"\n");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key, "destinations[0].headers", "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        // Other keys still quote what was refused.
        let e = parse_with("server", "body_timeout = \"soon\"").unwrap_err();
        assert!(e.message.contains("\"soon\""), "{e}");
    }

    #[test]
    fn unsafe_destination_name_is_refused() {
        let text = GOOD.replace("name = \"out\"", "name = \"../etc\"");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key, "destinations[0].name");
    }

    /// A config with sources `web` and `ios` and one file destination ending in `rules`
    /// (its first line is line 12).
    fn routed(rules: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[[sources]]\nname = \"web\"\nwrite_keys = [\"k1\"]\n\n[[sources]]\nname = \"ios\"\n\n\
             [[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/f\"\n{rules}"
        ))
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
}
