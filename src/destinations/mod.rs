//! Stage 8: destination kinds, one file each, behind one trait. The delivery engine
//! decides what to send and when; a destination only knows how to send one batch.
//!
//! A kind is its file (`<kind>.rs`: the strict struct of its own config keys, which
//! implements `Kind`, and the destination itself) plus one line in `kinds!` below.

mod config;
mod erase;
mod file;
mod function;
mod http;
pub mod klaviyo;
mod mapped;
pub mod postgres;
mod s3;
mod segment;
mod stdout;
mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use crate::key_error::KeyError;
pub use crate::routing::{FilterConfig, IntegrationsPolicy, PropertyCondition, RouteConfig};
pub use config::{
    deserialize_table, does_not_apply, field_names, BatchConfig, BatchLimits, BatchShape,
    DestinationConfig, HttpConfig, RateLimitConfig, RatePer, RetryConfig,
};
pub use erase::{delete_message, EraseError, Erasing, Erasure, Subject};
pub use file::{FileConfig, FileDestination};
pub use function::{handler_of, FunctionConfig, FunctionDestination};
pub use http::{classify, parse_retry_after};
pub use klaviyo::{KlaviyoBodies, KlaviyoConfig, KlaviyoDestination, KlaviyoRequest};
pub use mapped::{presets, MappedConfig, MappedDestination};
pub use postgres::{PostgresConfig, PostgresDestination};
pub use s3::{S3Config, S3Destination};
pub use segment::{batch_body as segment_batch_body, SegmentConfig, SegmentDestination};
pub use stdout::{StdoutConfig, StdoutDestination};
pub use webhook::{
    signature as hmac_sha256_signature, WebhookConfig, WebhookDestination, WebhookPayload,
};

use crate::clock::Clock;
use crate::queue::Checkpoint;

/// Why a batch was not delivered.
///
/// `detail` is fanout's own account (a status, an error code, a transport error without
/// the URL) and is safe to log; `answer` is the receiver's answer body, which can echo
/// message values or credentials, so it is kept only with the dead letter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later: transport failures, timeouts, 408/429/5xx, local I/O.
    #[error("{detail}")]
    Retryable {
        status: Option<u16>,
        /// What the destination asked for in `Retry-After`.
        retry_after: Option<Duration>,
        detail: String,
        answer: Option<String>,
    },
    /// The destination refused this content; sending it again cannot succeed.
    #[error("rejected with {status}: {detail}")]
    Rejected {
        status: u16,
        detail: String,
        answer: Option<String>,
    },
    /// The batch went, except these messages, which the destination settled on their own
    /// (refused rows of an asynchronous import job, a function's per-event statuses);
    /// the rest are delivered.
    #[error("{} messages of the batch not delivered", refused.len())]
    PartlyRejected { refused: Vec<Refusal> },
}

/// One message of a batch that was not simply delivered: its index in the batch `send`
/// got, and what is to become of it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub index: usize,
    pub kind: RefusalKind,
    /// The status given for this message, if any (a thrown `RetryError` has none).
    pub status: Option<u16>,
    pub detail: String,
    pub answer: Option<String>,
}

/// What the engine does with one message of a `PartlyRejected` batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Cannot succeed: dead-lettered.
    Refused,
    /// Worth another try: sent again after the backoff (or `retry_after`, if asked), with
    /// the batch's other retried messages and without the ones delivered.
    Retry { retry_after: Option<Duration> },
    /// Not for this destination after all: settled, counted skipped for `reason`.
    Skipped { reason: &'static str },
}

impl SendError {
    pub fn io(e: std::io::Error) -> SendError {
        SendError::Retryable {
            status: None,
            retry_after: None,
            detail: format!("I/O error: {e}"),
            answer: None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SendError::Retryable { status, .. } => *status,
            SendError::Rejected { status, .. } => Some(*status),
            SendError::PartlyRejected { refused } => refused.first().and_then(|r| r.status),
        }
    }
}

/// What a destination made of a message in `check`, handed back to it in `send` and on
/// every retry, so that the work (a translation, say) is done once. One variant per kind
/// that prepares something; the others send the message as stored.
pub enum Prepared {
    /// Klaviyo: the message's events or profile upsert.
    Klaviyo(klaviyo::translate::Translation),
    /// Postgres: the warehouse rows the message becomes, encoded for COPY.
    Postgres(postgres::encoded::Encoded),
    /// `kind = "http"`: the message's requests, rendered.
    Http(mapped::Requests),
}

/// What a destination makes of one message before any request.
pub enum Check {
    /// Send it, with what was prepared for it, if anything.
    Send(Option<Prepared>),
    /// Not for this destination by design (e.g. alias for Klaviyo): settled, not sent.
    Skip(&'static str),
    /// Cannot be sent as it is: dead-letter it with `code` and `detail`.
    Refuse { code: String, detail: String },
}

/// One message of a batch being sent: as stored, and as `check` prepared it.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    /// The name of the `[[sources]]` it came in through (the archive's folders).
    pub source: &'a str,
    pub json: &'a [u8],
    pub prepared: Option<&'a Prepared>,
}

/// The future `send` returns: boxed, so that destinations of any kind (and fakes in the
/// engine's tests) stand behind one `dyn Destination`. One allocation a batch.
pub type Sending<'a> = Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send + 'a>>;

/// Sends batches of messages (each one JSON object, as stored) in the order given.
pub trait Destination: Send + Sync + 'static {
    /// Looks at one message before it is batched for sending; most destinations send all
    /// and prepare nothing.
    fn check(&self, _message: &[u8]) -> Check {
        Check::Send(None)
    }

    /// Delivers the whole batch or fails as a whole. Returns the mark to save with the
    /// cursor (see `Checkpoint::sink_offset`); 0 when the destination has none.
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a>;

    /// True when batches must go one at a time, in order, each retried until it succeeds
    /// (a local file whose length is saved with the cursor).
    fn sequential(&self) -> bool {
        false
    }

    /// What the live view shows as sent for `message`, when it is not the message itself
    /// (Klaviyo: the translated request bodies).
    fn live_payload(&self, _message: &[u8]) -> Option<serde_json::Value> {
        None
    }

    /// Makes everything sent so far durable; called (blocking) before a cursor that
    /// passes it is saved. Only local sinks have anything to do.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// The mark as things stand now (saved with a new destination's first checkpoint).
    fn mark(&self) -> u64 {
        0
    }

    /// What the mark measures (see `Checkpoint::sink_id`); 0 when there is no mark.
    fn sink_id(&self) -> u64 {
        0
    }

    /// Deletes what this destination holds or sent of `subject` (privacy regulations);
    /// most cannot.
    fn erase<'a>(&'a self, _subject: &'a Subject) -> Erasing<'a> {
        Box::pin(async { Ok(Erasure::NotSupported) })
    }
}

/// A running destination of any kind.
pub type AnyDestination = Box<dyn Destination>;

/// What `fanout route` shows a destination would make of a message routing let through.
pub enum Preview {
    /// The payload it would receive (the message, or the requests it becomes).
    Send(serde_json::Value),
    /// Passed over by the destination's own choice.
    Skip(&'static str),
    /// Refused: it would be dead-lettered with this reason.
    Refuse(String),
}

/// One destination kind: its own config keys (a strict serde struct, in its file) and
/// what the engine and `fanout route` need to know of it.
pub trait Kind: DeserializeOwned + Clone + std::fmt::Debug + PartialEq + Send + Sync {
    /// The value of `kind = "…"`.
    const NAME: &'static str;
    /// Sends over HTTP: takes `concurrency`, `ordering`, `timeout`, `retry`, `rate_limit`.
    const HTTP: bool;
    /// The default of `enrich_identity`.
    const ENRICH_IDENTITY: bool = false;

    /// Checks what serde cannot; the error names the key (within the destination).
    fn validate(&self) -> Result<(), KeyError> {
        Ok(())
    }

    /// Reads and checks the files the kind's keys name, relative to `dir` (the config
    /// file's directory); the error names the key.
    fn load_files(&mut self, _dir: &std::path::Path) -> Result<(), KeyError> {
        Ok(())
    }

    /// Batch defaults and limits.
    fn batch_shape(&self) -> BatchShape;

    /// The running destination, with its secrets read from the environment. `saved` is
    /// its last checkpoint (the file destination cuts its output back to it); `clock`
    /// tells it the time.
    fn build(
        &self,
        config: &DestinationConfig,
        saved: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination>;

    /// What it would receive of `message` at `clock`'s now, for `fanout route`; sends
    /// nothing.
    fn preview(&self, message: &[u8], _: Clock) -> anyhow::Result<Preview> {
        Ok(Preview::Send(serde_json::from_slice(message)?))
    }

    /// `preview` of a message from the source named `source`, for kinds whose output
    /// depends on it (the archive's folders).
    fn preview_from(&self, _source: &str, message: &[u8], clock: Clock) -> anyhow::Result<Preview> {
        self.preview(message, clock)
    }
}

/// Reads a kind's own keys; a key the kind does not take is named, and so is a missing
/// required one.
fn read_kind<K: Kind>(own: toml::Table) -> Result<K, KeyError> {
    deserialize_table::<K>(own).map_err(|mut e| {
        if e.message.starts_with("missing field") {
            e.message = format!("kind `{}` needs `{}`", K::NAME, e.key);
        } else if e.message.starts_with("unknown field") && KindSettings::any_kind_takes(&e.key) {
            e = does_not_apply(&e.key, K::NAME);
        }
        e
    })
}

/// The kinds: each a variant of `KindSettings` holding its config struct. Adding a kind is
/// its file plus one line here.
macro_rules! kinds {
    ($($variant:ident($config:ty)),+ $(,)?) => {
        /// A destination's kind and its own keys.
        #[derive(Debug, Clone, PartialEq)]
        pub enum KindSettings {
            $($variant($config)),+
        }

        impl KindSettings {
            /// Reads the kind named `kind` from the keys that are not shared.
            fn from_table(kind: &str, own: toml::Table) -> Result<KindSettings, KeyError> {
                $(
                    if kind == <$config as Kind>::NAME {
                        return read_kind::<$config>(own).map(KindSettings::$variant);
                    }
                )+
                let known = [$(format!("`{}`", <$config as Kind>::NAME)),+].join(", ");
                Err(KeyError::new(
                    "kind",
                    format!("unknown variant `{kind}`, expected one of {known}"),
                ))
            }

            /// Whether some kind has a key named `key`.
            fn any_kind_takes(key: &str) -> bool {
                false $(|| field_names::<$config>().contains(&key))+
            }

            /// The value of `kind = "…"`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(KindSettings::$variant(_) => <$config as Kind>::NAME),+
                }
            }

            /// The kind's default of `enrich_identity`.
            fn enriches_identity(&self) -> bool {
                match self {
                    $(KindSettings::$variant(_) => <$config as Kind>::ENRICH_IDENTITY),+
                }
            }

            pub fn is_http(&self) -> bool {
                match self {
                    $(KindSettings::$variant(_) => <$config as Kind>::HTTP),+
                }
            }

            fn validate(&self) -> Result<(), KeyError> {
                match self {
                    $(KindSettings::$variant(c) => c.validate()),+
                }
            }

            fn load_files(&mut self, dir: &std::path::Path) -> Result<(), KeyError> {
                match self {
                    $(KindSettings::$variant(c) => c.load_files(dir)),+
                }
            }

            pub fn batch_shape(&self) -> BatchShape {
                match self {
                    $(KindSettings::$variant(c) => c.batch_shape()),+
                }
            }

            fn build(
                &self,
                config: &DestinationConfig,
                saved: Option<Checkpoint>,
                clock: Clock,
            ) -> anyhow::Result<AnyDestination> {
                match self {
                    $(KindSettings::$variant(c) => c.build(config, saved, clock)),+
                }
            }

            /// What it would receive of `message` from the source named `source`.
            pub fn preview(
                &self,
                source: &str,
                message: &[u8],
                clock: Clock,
            ) -> anyhow::Result<Preview> {
                match self {
                    $(KindSettings::$variant(c) => c.preview_from(source, message, clock)),+
                }
            }
        }
    };
}

kinds! {
    File(file::FileConfig),
    Stdout(stdout::StdoutConfig),
    Webhook(webhook::WebhookConfig),
    Segment(segment::SegmentConfig),
    Klaviyo(klaviyo::KlaviyoConfig),
    Function(function::FunctionConfig),
    S3(s3::S3Config),
    Postgres(postgres::PostgresConfig),
    Http(mapped::MappedConfig),
}

impl DestinationConfig {
    /// Reads and checks the files its keys name, relative to `dir` (the config file's
    /// directory); the error names the key.
    pub fn load_files(&mut self, dir: &std::path::Path) -> Result<(), KeyError> {
        if let Some(sandbox) = &mut self.insert_function {
            sandbox
                .validate()
                .map_err(|(key, e)| KeyError::new(format!("insert_function.{key}"), e))?;
            sandbox
                .load(dir)
                .map_err(|e| KeyError::new("insert_function", e))?;
        }
        self.settings.load_files(dir)
    }

    /// Builds the destination, reading its secrets from the environment. `saved` is its
    /// last checkpoint; `clock` tells it the time.
    pub fn build(&self, saved: Option<Checkpoint>, clock: Clock) -> anyhow::Result<AnyDestination> {
        self.settings.build(self, saved, clock)
    }

    /// Builds it and lets it go: whether it can start (secrets set, output openable).
    /// It never sends, so never reads the time: any clock will do.
    pub fn try_build(&self) -> anyhow::Result<()> {
        if let Some(sandbox) = &self.insert_function {
            sandbox.start(None).map_err(|e| {
                anyhow::anyhow!("destination `{}`: insert_function: {e}", self.name)
            })?;
        }
        self.build(None, Clock::system()).map(drop)
    }
}

/// Tests and tools read a destination from a TOML table on its own.
impl<'de> serde::Deserialize<'de> for DestinationConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = <toml::Table as serde::Deserialize>::deserialize(deserializer)?;
        DestinationConfig::from_table(table).map_err(serde::de::Error::custom)
    }
}

/// Moves `batch.body` (the http kind's envelope) from the shared `batch` table to the
/// kind's own keys, so that kinds without it refuse it by name.
fn lift_batch_body(mut shared: toml::Table, own: &mut toml::Table) -> toml::Table {
    let batch = shared.get_mut("batch").and_then(toml::Value::as_table_mut);
    if let Some(body) = batch.and_then(|batch| batch.remove("body")) {
        own.insert("batch.body".into(), body);
    }
    shared
}

/// Reads a secret named by a `*_env` key; the error names the variable, never the value.
fn secret_from_env(destination: &str, key: &str, var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => anyhow::bail!(
            "destination `{destination}`: {key} names the environment variable `{var}`, \
             which is not set"
        ),
    }
}

/// Checks a URL key: http(s) and well formed. The value is not quoted: a URL may carry
/// a token or a password.
fn check_url(key: &str, url: &str) -> Result<(), KeyError> {
    if (url.starts_with("http://") || url.starts_with("https://"))
        && url.parse::<::http::Uri>().is_ok()
    {
        Ok(())
    } else {
        Err(KeyError::new(key, "is not an http(s) URL"))
    }
}

/// One JSON line per message, as written by file-like destinations.
fn json_lines(batch: &[Outgoing<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|m| m.json.len() + 1).sum());
    for message in batch {
        out.extend_from_slice(message.json);
        out.push(b'\n');
    }
    out
}

/// `[m1,m2,…]` from messages that are each one JSON value.
fn json_array(batch: &[Outgoing<'_>], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, message) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(message.json);
    }
    out.push(b']');
}
