//! `[[destinations]]`: one TOML table per destination. The keys every kind shares (name,
//! kind, routing rules, batch shape, and for HTTP kinds the delivery knobs) are read
//! here; the rest of the table goes, strictly, to the kind's own struct (in its file,
//! `destinations/<kind>.rs`). A key no struct takes is refused by name: "does not apply
//! to kind …" when another kind has it, serde's "unknown field" otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::KindSettings;
use crate::key_error::KeyError;
use crate::routing::RouteConfig;

/// One destination.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationConfig {
    pub name: String,
    /// The kind and its own keys.
    pub settings: KindSettings,
    /// Which messages it gets and in what shape (the routing stage).
    pub route: RouteConfig,
    pub batch: Option<BatchConfig>,
    /// A Segment insert function run on each message before this destination.
    pub insert_function: Option<crate::functions::FunctionSandbox>,
    /// HTTP kinds only: concurrency, ordering, timeout, retry, rate limit.
    pub http: HttpConfig,
    /// Fill anonymous-only messages from the identity store (`crate::identity`).
    pub enrich_identity: bool,
}

/// The delivery knobs of HTTP kinds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HttpConfig {
    /// Batches sent at once (default 1; Klaviyo 4).
    pub concurrency: Option<usize>,
    /// Keep each user's messages in the order accepted (default true).
    pub ordering: Option<bool>,
    /// Time allowed for one request (default 30 s).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    pub retry: Option<RetryConfig>,
    pub rate_limit: Option<RateLimitConfig>,
}

/// The keys every kind's table may hold, as written (flat) in TOML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedKeys {
    name: String,
    kind: String,
    /// Names of the `[[sources]]` whose messages this destination gets; default all.
    sources: Option<Vec<String>>,
    /// Which messages this destination gets (all conditions must hold); default all.
    filter: Option<crate::routing::FilterConfig>,
    /// Dotted paths removed from each message before it is sent, e.g. `context.ip`.
    #[serde(default)]
    drop_fields: Vec<String>,
    /// Dotted path → dotted path, e.g. `"properties.revenue" = "properties.amount"`;
    /// applied after `drop_fields`. Missing parents of the new path are created; a
    /// message without the old path is left as it is.
    #[serde(default)]
    rename: BTreeMap<String, String>,
    /// `"honour"` (default) or `"ignore"` the message's `integrations` object.
    #[serde(default)]
    integrations: crate::routing::IntegrationsPolicy,
    /// Categories a message's consent must not deny, e.g. `["Advertising"]`.
    #[serde(default)]
    consent_categories: Vec<String>,
    /// Dotted paths whose strings are sent as SHA-256 hex, e.g. `traits.email`.
    #[serde(default)]
    hash_fields: Vec<String>,
    /// Fill anonymous-only messages with the userId, email and phone an identify taught
    /// (`[identity]`); default true for Klaviyo, false for the others.
    enrich_identity: Option<bool>,
    /// A Segment insert function (its `onTrack`, … return the message to send, or null
    /// to skip it): a file name, or a table with the file and its sandbox keys.
    #[serde(default, deserialize_with = "crate::functions::file_or_table")]
    insert_function: Option<crate::functions::FunctionSandbox>,
    batch: Option<BatchConfig>,
    concurrency: Option<usize>,
    ordering: Option<bool>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
    retry: Option<RetryConfig>,
    rate_limit: Option<RateLimitConfig>,
}

impl DestinationConfig {
    /// Reads one `[[destinations]]` table: the shared keys, then the kind's own.
    pub fn from_table(table: toml::Table) -> Result<DestinationConfig, KeyError> {
        let table = super::mapped::presets::expand(table)?;
        let shared_names = field_names::<SharedKeys>();
        let (shared, mut own): (toml::Table, toml::Table) = table
            .into_iter()
            .partition(|(key, _)| shared_names.contains(&key.as_str()));
        let shared: SharedKeys = deserialize_table(super::lift_batch_body(shared, &mut own))?;
        let sample = crate::routing::take_sample(&mut own)?;
        let settings = KindSettings::from_table(&shared.kind, own)?;
        let http = HttpConfig {
            concurrency: shared.concurrency,
            ordering: shared.ordering,
            timeout: shared.timeout,
            retry: shared.retry,
            rate_limit: shared.rate_limit,
        };
        if !settings.is_http() {
            let set = [
                ("concurrency", http.concurrency.is_some()),
                ("ordering", http.ordering.is_some()),
                ("timeout", http.timeout.is_some()),
                ("retry", http.retry.is_some()),
                ("rate_limit", http.rate_limit.is_some()),
            ];
            if let Some((key, _)) = set.into_iter().find(|&(_, is_set)| is_set) {
                return Err(does_not_apply(key, settings.kind()));
            }
        }
        let enrich_identity = shared
            .enrich_identity
            .unwrap_or(settings.enriches_identity());
        Ok(DestinationConfig {
            enrich_identity,
            name: shared.name,
            settings,
            route: RouteConfig {
                sources: shared.sources,
                filter: shared.filter,
                drop_fields: shared.drop_fields,
                rename: shared.rename,
                integrations: shared.integrations,
                consent_categories: shared.consent_categories,
                hash_fields: shared.hash_fields,
                sample,
            },
            batch: shared.batch,
            insert_function: shared.insert_function,
            http,
        })
    }

    /// The kind's name, as in `kind = "…"`.
    pub fn kind(&self) -> &'static str {
        self.settings.kind()
    }

    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), KeyError> {
        if self.http.concurrency.is_some_and(|c| c == 0 || c > 256) {
            return Err(KeyError::new("concurrency", "must be 1 to 256"));
        }
        // Upper bounds keep every deadline and buffer size the engine computes in range.
        let hour = Duration::from_secs(3600);
        let retry = self.http.retry.as_ref();
        let too_long = [
            ("timeout", self.http.timeout, hour),
            (
                "batch.linger",
                self.batch.as_ref().and_then(|b| b.linger),
                hour,
            ),
            ("retry.max_backoff", retry.map(|r| r.max_backoff), 24 * hour),
            (
                "retry.max_retry_after",
                retry.map(|r| r.max_retry_after),
                24 * hour,
            ),
        ];
        for (key, value, limit) in too_long {
            if value.is_some_and(|v| v > limit) {
                return Err(KeyError::new(key, format!("at most {}s", limit.as_secs())));
            }
        }
        if let Some(rate) = &self.http.rate_limit {
            if !(rate.rate.is_finite() && rate.rate >= 0.001) {
                return Err(KeyError::new(
                    "rate_limit.rate",
                    "must be at least 0.001 (per second)",
                ));
            }
            if rate.burst == Some(0) {
                return Err(KeyError::new("rate_limit.burst", "must be at least 1"));
            }
        }
        if let Some(batch) = &self.batch {
            if batch.max_events.is_some_and(|n| n == 0 || n > 100_000) {
                return Err(KeyError::new("batch.max_events", "must be 1 to 100000"));
            }
            if batch
                .max_bytes
                .is_some_and(|n| n == 0 || n > 256 * 1024 * 1024)
            {
                return Err(KeyError::new("batch.max_bytes", "must be 1 to 268435456"));
            }
            let shape = self.settings.batch_shape();
            if batch.max_events.is_some_and(|n| n > shape.max_events) {
                return Err(KeyError::new(
                    "batch.max_events",
                    format!("at most {} ({})", shape.max_events, shape.limited_by),
                ));
            }
            if batch.max_bytes.is_some_and(|n| n > shape.max_bytes) {
                return Err(KeyError::new(
                    "batch.max_bytes",
                    format!("at most {} ({})", shape.max_bytes, shape.limited_by),
                ));
            }
        }
        if let Some(retry) = retry {
            if retry.initial_backoff.is_zero() || retry.initial_backoff > retry.max_backoff {
                return Err(KeyError::new(
                    "retry.initial_backoff",
                    "must be above 0 and at most retry.max_backoff",
                ));
            }
        }
        self.settings.validate()?;
        self.route.validate()
    }

    /// Batch shape: the configured values over the kind's defaults, within its limits.
    pub fn batch_limits(&self) -> BatchLimits {
        let shape = self.settings.batch_shape();
        let batch = self.batch.clone().unwrap_or_default();
        let mut max_events = batch.max_events.unwrap_or(shape.events);
        if shape.one_per_request {
            max_events = 1;
        }
        // A batch must fit in the bucket, or the limiter could never let it through.
        if let Some(rate) = self
            .http
            .rate_limit
            .as_ref()
            .filter(|r| r.per == RatePer::Event)
        {
            max_events = max_events.min(rate.burst() as usize);
        }
        BatchLimits {
            max_events,
            max_bytes: batch.max_bytes.unwrap_or(shape.bytes),
            linger: batch.linger.unwrap_or(shape.linger),
        }
    }

    pub fn retry(&self) -> RetryConfig {
        self.http.retry.clone().unwrap_or_default()
    }

    pub fn concurrency(&self) -> usize {
        self.http
            .concurrency
            .unwrap_or_else(|| self.settings.batch_shape().concurrency)
    }

    pub fn ordering(&self) -> bool {
        self.http
            .ordering
            .unwrap_or_else(|| self.settings.batch_shape().ordering)
    }

    pub fn timeout(&self) -> Duration {
        self.http.timeout.unwrap_or(Duration::from_secs(30))
    }
}

/// A kind's batch defaults and hard limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub events: usize,
    pub bytes: usize,
    pub linger: Duration,
    /// The most `batch.max_events` / `batch.max_bytes` may be set to, and why.
    pub max_events: usize,
    pub max_bytes: usize,
    pub limited_by: &'static str,
    /// One message per request whatever `batch` says (a webhook with `payload = "message"`).
    pub one_per_request: bool,
    /// Batches sending at once unless `concurrency` says otherwise.
    pub concurrency: usize,
    /// Per-user order unless `ordering` says otherwise (see `unordered`).
    pub ordering: bool,
}

impl BatchShape {
    pub const fn new(events: usize, bytes: usize, linger_ms: u64) -> BatchShape {
        BatchShape {
            events,
            bytes,
            linger: Duration::from_millis(linger_ms),
            max_events: 100_000,
            max_bytes: 256 * 1024 * 1024,
            limited_by: "fanout's bound",
            one_per_request: false,
            concurrency: 1,
            ordering: true,
        }
    }

    pub const fn with_concurrency(mut self, concurrency: usize) -> BatchShape {
        self.concurrency = concurrency;
        self
    }

    /// For kinds whose result does not depend on the order messages arrive in (a
    /// warehouse keyed by messageId, upserting by `received_at`): without per-user order
    /// their batches really run `concurrency` at once even when one user sends
    /// everything.
    pub const fn unordered(mut self) -> BatchShape {
        self.ordering = false;
        self
    }
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

const fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
const fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
const fn default_max_age() -> Duration {
    Duration::from_secs(12 * 3600)
}
const fn default_max_retry_after() -> Duration {
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

/// "`key` does not apply to kind `kind`".
pub fn does_not_apply(key: &str, kind: &str) -> KeyError {
    KeyError::new(key, format!("`{key}` does not apply to kind `{kind}`"))
}

/// Deserializes a struct from a table, the error naming the key it is about (relative to
/// the table). A missing key is reported at its own path.
pub fn deserialize_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, KeyError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = e.into_inner().message().to_string();
        match message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            Some(field) => {
                let key = if path.is_empty() {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
                KeyError::new(key, message)
            }
            None => KeyError::new(path, message),
        }
    })
}

/// The field names serde reads for `T` (a struct without `flatten`), as its derive gives
/// them to `deserialize_struct`: so that which keys a struct takes is written once, on the
/// struct.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Introspect<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Introspect<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageType;

    fn parse(toml_text: &str) -> DestinationConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn parse_err(toml_text: &str) -> KeyError {
        let table: toml::Table = toml::from_str(toml_text).unwrap();
        match DestinationConfig::from_table(table) {
            Ok(d) => d.validate().unwrap_err(),
            Err(e) => e,
        }
    }

    #[test]
    fn keys_of_another_kind_are_refused_by_name() {
        let e = parse_err("name = \"f\"\nkind = \"file\"\npath = \"x\"\nurl = \"http://h\"\n");
        assert_eq!(e.key, "url");
        assert_eq!(e.message, "`url` does not apply to kind `file`");
        let e = parse_err("name = \"f\"\nkind = \"file\"\npath = \"x\"\nretry = {}\n");
        assert_eq!(e.key, "retry");
        let e = parse_err("name = \"w\"\nkind = \"webhook\"\n");
        assert_eq!(e.key, "url");
        assert!(e.message.contains("`webhook` needs `url`"), "{e}");
        let e = parse_err(
            "name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\nurl = \"ftp://x\"\n",
        );
        assert_eq!(e.key, "url");
        let e = parse_err("name = \"s\"\nkind = \"pigeon\"\n");
        assert_eq!(e.key, "kind");
        assert!(e.message.contains("pigeon"), "{e}");
        let e = parse_err("name = \"f\"\nkind = \"file\"\npth = \"x\"\n");
        assert_eq!(e.key, "pth");
    }

    #[test]
    fn the_shared_keys_are_the_structs_fields() {
        let names = field_names::<SharedKeys>();
        assert!(names.contains(&"rate_limit") && names.contains(&"drop_fields"));
        assert!(names.contains(&"consent_categories") && names.contains(&"hash_fields"));
        assert!(names.contains(&"integrations") && names.contains(&"enrich_identity"));
        assert_eq!(names.len(), 17);
    }

    #[test]
    fn routing_keys_parse() {
        let d = parse(
            "name = \"f\"\nkind = \"file\"\npath = \"/tmp/f\"\nsources = [\"ios\"]\n\
             drop_fields = [\"context.ip\"]\n\
             rename = { \"properties.revenue\" = \"properties.amount\" }\n\
             [filter]\ntypes = [\"track\", \"page\"]\nevents = [\"Order *\"]\n\
             [filter.properties]\n\"plan.tier\" = { equals = \"pro\" }\n\
             total = { equals = 3 }\nseen = { equals = 1979-05-27T07:32:00Z }\nemail = { exists = true }\n",
        );
        assert_eq!(d.route.sources.as_deref(), Some(&["ios".to_string()][..]));
        let filter = d.route.filter.as_ref().unwrap();
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
        assert_eq!(d.route.rename["properties.revenue"], "properties.amount");
    }

    #[test]
    fn batch_limits_follow_kind_payload_and_rate() {
        let d = parse("name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\n");
        assert_eq!(d.batch_limits().max_events, 500);
        assert_eq!(
            d.batch_limits().max_bytes,
            super::super::segment::SEGMENT_MAX_BYTES
        );
        let d = parse(
            "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h/x\"\nrate_limit = { rate = 50 }\n",
        );
        assert_eq!(d.batch_limits().max_events, 50);
        let d = parse(
            "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h/x\"\npayload = \"message\"\n",
        );
        assert_eq!(d.batch_limits().max_events, 1);
        let e = parse_err(
            "name = \"s\"\nkind = \"segment\"\nwrite_key_env = \"K\"\nbatch = { max_events = 3000 }\n",
        );
        assert_eq!(e.key, "batch.max_events");
    }
}
