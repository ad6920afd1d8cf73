//! The `[queue]` section: which backend stores accepted messages, and how to reach it.
//! The queue owns its section; `config` composes it into the file.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where accepted messages are stored until every destination has them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// `local` (a log in `server.data_dir`, one machine) or `nats` (a JetStream stream
    /// shared by every instance pointed at the same servers and stream).
    #[serde(default)]
    pub backend: QueueBackend,
    /// NATS server URLs, e.g. `nats://nats-1:4222`; `tls://` requires TLS.
    #[serde(default)]
    pub servers: Vec<String>,
    /// The stream's name; created if missing, checked if present.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Copies of each message the cluster keeps (1, 3 or 5 in practice).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Subjects the stream spreads messages over by user; each is delivered by one
    /// instance at a time, which keeps a user's messages in order, and the live
    /// instances share them out. Fixed once the stream exists: unset, a new stream gets
    /// 32 and an existing one keeps its count.
    #[serde(default)]
    pub partitions: Option<u16>,
    /// How long a message delivered to an instance may go unacknowledged (the instance
    /// keeps extending it while it works) before another instance gets it, e.g. "30s".
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long the stream remembers a message's dedupe key (`Nats-Msg-Id`), so a
    /// publish retried within it is stored once.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long a publish waits for the stream's acknowledgement before ingest answers
    /// 503.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// How often each instance tells the others it is live (its key in the membership
    /// bucket), e.g. "2s".
    #[serde(default = "default_member_heartbeat", with = "humantime_serde")]
    pub member_heartbeat: Duration,
    /// How long an instance counts as live without a heartbeat: after it, a crashed
    /// instance's partitions go to the others. At least three heartbeats.
    #[serde(default = "default_member_ttl", with = "humantime_serde")]
    pub member_ttl: Duration,
    /// Environment variable holding a token.
    pub token_env: Option<String>,
    /// Environment variables holding a user name and its password.
    pub user_env: Option<String>,
    pub password_env: Option<String>,
    /// Environment variable holding the path of a `.creds` file (JWT and NKey seed).
    pub credentials_env: Option<String>,
    /// On `nats`: destinations' `rate_limit`, the Klaviyo kind's own limits and sources'
    /// `rate_limit` hold for all instances together (token buckets in the KV bucket
    /// `<stream>_limits`, leased in small chunks). `false`: each instance applies each
    /// limit on its own, so N instances allow N times it.
    #[serde(default = "default_shared_limits")]
    pub shared_limits: bool,
    /// PEM file of the certificate authorities to trust for `tls://` servers (the
    /// system's roots otherwise).
    pub tls_ca_file: Option<PathBuf>,
}

/// Where the queue lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    #[default]
    Local,
    Nats,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::default(),
            servers: Vec::new(),
            stream: default_stream(),
            replicas: default_replicas(),
            partitions: None,
            ack_wait: default_ack_wait(),
            duplicate_window: default_duplicate_window(),
            publish_timeout: default_publish_timeout(),
            member_heartbeat: default_member_heartbeat(),
            member_ttl: default_member_ttl(),
            token_env: None,
            user_env: None,
            password_env: None,
            credentials_env: None,
            tls_ca_file: None,
            shared_limits: default_shared_limits(),
        }
    }
}

fn default_stream() -> String {
    "fanout".to_string()
}
const fn default_replicas() -> usize {
    1
}
const fn default_shared_limits() -> bool {
    true
}
/// Partitions of a stream made without `queue.partitions`: enough to spread over a few
/// dozen instances, few enough that each consumer costs little.
pub const DEFAULT_PARTITIONS: u16 = 32;
const fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}
const fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}
const fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}
const fn default_member_heartbeat() -> Duration {
    Duration::from_secs(2)
}
const fn default_member_ttl() -> Duration {
    Duration::from_secs(10)
}

impl QueueConfig {
    /// What serde cannot check: a nats backend needs servers it can parse, and names and
    /// numbers JetStream takes. An error is the key path and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, message: &str| Err((key.to_string(), message.to_string()));
        if self.backend == QueueBackend::Local {
            return Ok(());
        }
        if self.servers.is_empty() {
            return err(
                "queue.servers",
                "backend = \"nats\" needs at least one server, e.g. [\"nats://127.0.0.1:4222\"]",
            );
        }
        for (i, server) in self.servers.iter().enumerate() {
            if let Err(e) = server.parse::<async_nats::ServerAddr>() {
                return Err((
                    format!("queue.servers[{i}]"),
                    format!("`{server}` is not a NATS server URL ({e}), e.g. nats://host:4222"),
                ));
            }
        }
        let stream_name_ok = !self.stream.is_empty()
            && self.stream.len() <= 32
            && self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        if !stream_name_ok {
            return err("queue.stream", "must be 1-32 characters of A-Z a-z 0-9 _ -");
        }
        if !(1..=5).contains(&self.replicas) {
            return err("queue.replicas", "must be from 1 to 5 (JetStream's limit)");
        }
        if self.partitions.is_some_and(|p| !(1..=64).contains(&p)) {
            return err("queue.partitions", "must be from 1 to 64");
        }
        for (key, value, least) in [
            ("queue.ack_wait", self.ack_wait, 1),
            ("queue.duplicate_window", self.duplicate_window, 1),
            ("queue.publish_timeout", self.publish_timeout, 1),
            ("queue.member_heartbeat", self.member_heartbeat, 1),
        ] {
            if value.as_secs() < least {
                return Err((key.into(), format!("must be at least {least}s")));
            }
        }
        if self.member_ttl < 3 * self.member_heartbeat {
            return err(
                "queue.member_ttl",
                "must be at least three times queue.member_heartbeat, so that one late \
                 heartbeat does not drop a live instance",
            );
        }
        if self.user_env.is_some() != self.password_env.is_some() {
            return err("queue.user_env", "user_env and password_env go together");
        }
        Ok(())
    }

    /// Whether `name` can name a destination on this backend; if not, why.
    pub fn check_destination_name(&self, name: &str) -> Result<(), String> {
        if self.backend == QueueBackend::Nats && name.contains('.') {
            return Err(
                "with queue.backend = \"nats\" a destination name cannot contain \
                        `.` (it names JetStream consumers and subjects)"
                    .into(),
            );
        }
        Ok(())
    }
}
