//! The sections of the file that the server reads itself (`[server]`, `[admin]`,
//! `[queue]`, `[dead_letters]`): every key with its meaning and default. A stage's own
//! section is the stage's (`[[sources]]` in `crate::auth`, `[dedupe]` in `crate::dedupe`,
//! `[limits]` in `crate::ingest`, `[cors]` and `[browser]` in `crate::http`,
//! `[[destinations]]` in `crate::destinations`); `Config` composes them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Operator endpoints (`/admin/...`, the live view).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the bearer token the admin endpoints require;
    /// without it they answer 404.
    pub token_env: Option<String>,
    /// A separate address for the operator endpoints (`/admin/...`, `/metrics`), e.g.
    /// one not exposed to the internet; without it they share `server.listen`.
    pub listen: Option<SocketAddr>,
    /// Live-view streams open at once (`/debugger`, `fanout tap`); more get 429. Each
    /// reading viewer copies every event onto its socket, on the workers ingest uses.
    #[serde(default = "default_max_viewers")]
    pub max_viewers: usize,
    /// How far, in bytes of events, a live-view viewer may fall behind before it loses
    /// the oldest (and is told how many). One buffer, shared by every viewer.
    #[serde(default = "default_viewer_buffer_bytes")]
    pub viewer_buffer_bytes: usize,
}

fn default_max_viewers() -> usize {
    crate::live::Limits::default().max_viewers
}
fn default_viewer_buffer_bytes() -> usize {
    crate::live::Limits::default().buffer_bytes
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: None,
            listen: None,
            max_viewers: default_max_viewers(),
            viewer_buffer_bytes: default_viewer_buffer_bytes(),
        }
    }
}

impl AdminConfig {
    /// The live view's limits, as `crate::live::configure` takes them.
    pub fn live_limits(&self) -> crate::live::Limits {
        crate::live::Limits {
            max_viewers: self.max_viewers,
            buffer_bytes: self.viewer_buffer_bytes,
        }
    }
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
    /// Disk budget of the queue and the dead letters, whose `dead_letters.max_bytes` is
    /// reserved out of it: once the data some destination has not consumed fills the
    /// rest, ingest answers 503 + Retry-After instead of accepting more.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: u64,
    /// How long segments every destination has passed are kept for replays
    /// (`POST /admin/replay`), within `max_queue_bytes`; "0s": deleted at once.
    #[serde(default, with = "humantime_serde")]
    pub retention: Duration,
    /// Networks of the reverse proxies in front of fanout, e.g. ["10.0.0.0/8"] (CIDRs, or
    /// single addresses): only a peer in one of them is believed about the client's host
    /// and scheme (`X-Forwarded-Host`, `X-Forwarded-Proto`). Empty (the default): those
    /// headers are ignored, and `Host` alone is used.
    #[serde(default, deserialize_with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
}

/// A list of networks, each a CIDR or a single address; a bad one is an error at its
/// index and line (`server.trusted_proxies[1]`).
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    struct Network(IpNet);
    impl<'de> Deserialize<'de> for Network {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
            // Refused inside the visitor, so the error carries this element's line.
            struct Text;
            impl serde::de::Visitor<'_> for Text {
                type Value = Network;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a network such as \"10.0.0.0/8\"")
                }
                fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Network, E> {
                    text.parse::<IpNet>()
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                        .map(|net| Network(net.trunc()))
                        .map_err(|_| {
                            E::custom(format!(
                                "`{text}` is not a network: write a CIDR such as \
                                 \"10.0.0.0/8\" or \"fd00::/8\", or one address"
                            ))
                        })
                }
            }
            d.deserialize_str(Text)
        }
    }
    let networks = Vec::<Network>::deserialize(d)?;
    Ok(networks.into_iter().map(|Network(net)| net).collect())
}

/// `[dead_letters]`: how much of what destinations refused and tracking plans blocked is
/// kept, so that a flood of refused messages cannot fill the disk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// Bytes of dead letters kept (each counted as its message and last answer plus
    /// 128); past it the oldest are dropped. Reserved out of `server.max_queue_bytes`,
    /// the queue getting the rest. Default: a tenth of `server.max_queue_bytes`.
    pub max_bytes: Option<u64>,
    /// How long a dead letter is kept, e.g. "14d"; older ones are dropped.
    #[serde(default = "default_dead_letter_retention", with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        DeadLettersConfig {
            max_bytes: None,
            retention: default_dead_letter_retention(),
        }
    }
}

const fn default_dead_letter_retention() -> Duration {
    Duration::from_secs(14 * 24 * 3600)
}

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
    /// instance at a time, which keeps a user's messages in order. Fixed once the
    /// stream exists.
    #[serde(default = "default_partitions")]
    pub partitions: u16,
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
    /// Environment variable holding a token.
    pub token_env: Option<String>,
    /// Environment variables holding a user name and its password.
    pub user_env: Option<String>,
    pub password_env: Option<String>,
    /// Environment variable holding the path of a `.creds` file (JWT and NKey seed).
    pub credentials_env: Option<String>,
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
            partitions: default_partitions(),
            ack_wait: default_ack_wait(),
            duplicate_window: default_duplicate_window(),
            publish_timeout: default_publish_timeout(),
            token_env: None,
            user_env: None,
            password_env: None,
            credentials_env: None,
            tls_ca_file: None,
        }
    }
}

fn default_stream() -> String {
    "fanout".to_string()
}
const fn default_replicas() -> usize {
    1
}
const fn default_partitions() -> u16 {
    8
}
const fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}
const fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}
const fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
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
            retention: Duration::ZERO,
            trusted_proxies: Vec::new(),
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
