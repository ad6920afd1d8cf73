//! `[identity]`: what is remembered of each anonymousId, for how long, and where.

use serde::Deserialize;

/// Identity stitching: identify and alias teach anonymousId → userId, email, phone;
/// destinations with `enrich_identity` get anonymous-only messages filled from it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `memory` (this process, kept in `<data_dir>/identity/`) or `redis` (shared by
    /// several instances).
    #[serde(default)]
    pub backend: IdentityBackend,
    /// How long an anonymousId is remembered after it was last taught, e.g. "90d".
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: std::time::Duration,
    /// Most anonymousIds held by the memory backend (about 560 bytes each, measured);
    /// past it the least recently used are dropped. Redis bounds its keys by `ttl`.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`. Prefer `redis_url_env` when it
    /// carries a password.
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis URL.
    pub redis_url_env: Option<String>,
    /// Prefix of the Redis keys (one hash per anonymousId).
    #[serde(default = "default_redis_key_prefix")]
    pub redis_key_prefix: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            backend: IdentityBackend::default(),
            ttl: default_ttl(),
            max_entries: default_max_entries(),
            redis_url: None,
            redis_url_env: None,
            redis_key_prefix: default_redis_key_prefix(),
        }
    }
}

impl IdentityConfig {
    /// The Redis URL from `redis_url_env` or `redis_url`.
    pub fn redis_url(&self) -> anyhow::Result<String> {
        if let Some(var) = &self.redis_url_env {
            return std::env::var(var).map_err(|_| {
                anyhow::anyhow!("environment variable {var} (identity.redis_url_env) is not set")
            });
        }
        self.redis_url.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "identity.backend = \"redis\" needs identity.redis_url or redis_url_env"
            )
        })
    }

    /// Checks what serde cannot: (key path, problem).
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.ttl.as_secs() == 0 {
            return Err(("identity.ttl", "must be at least one second"));
        }
        if self.max_entries == 0 {
            return Err(("identity.max_entries", "must be at least 1"));
        }
        if self.backend == IdentityBackend::Redis
            && self.redis_url.is_none()
            && self.redis_url_env.is_none()
        {
            return Err((
                "identity.backend",
                "redis needs identity.redis_url or identity.redis_url_env",
            ));
        }
        Ok(())
    }
}

/// Where the identities live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityBackend {
    #[default]
    Memory,
    Redis,
}

const fn default_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(90 * 24 * 3600)
}
const fn default_max_entries() -> u64 {
    500_000
}
fn default_redis_key_prefix() -> String {
    "fanout:identity:".to_string()
}
