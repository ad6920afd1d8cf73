//! `[dedupe]`: the window of remembered messageIds and where it lives.

use serde::Deserialize;

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

const fn default_dedupe_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}
const fn default_dedupe_max_entries() -> usize {
    10_000_000
}
fn default_redis_key_prefix() -> String {
    "fanout:dedupe:".to_string()
}
