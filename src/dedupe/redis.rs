//! The shared backend for several fanout instances: one Redis (or Valkey) key per
//! message key, claimed with `SET NX`, pipelined so a request costs one round trip.
//!
//! A key is `p:<instance>` while its request is between reserve and commit (expiring
//! after `PENDING_MS`, so a crashed instance's claims lapse), and `c` for the window once
//! the messages are durable. Another instance meeting a pending key waits for it to be
//! committed or released, as requests do locally.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::RwLock;

use crate::message::DedupeKey;

/// How long a claim may stay pending before Redis drops it.
const PENDING_MS: u64 = 30_000;
/// How long a request waits for another instance's pending claim.
const WAIT_FOR_PENDING: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
const TIMEOUT: Duration = Duration::from_secs(1);

/// Deletes keys still holding this instance's pending mark (not one that expired and
/// was claimed by someone else since).
const RELEASE: &str = r"
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
end
return n";

/// What Redis said about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed by this request.
    Ours,
    /// Already accepted (by any instance): a duplicate.
    Committed,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("another instance is still storing this messageId")]
    StillPending,
}

pub struct RedisStore {
    connection: SharedConnection,
    prefix: String,
    pending_mark: String,
    ttl_ms: u64,
    release: redis::Script,
}

impl RedisStore {
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> anyhow::Result<RedisStore> {
        Ok(RedisStore {
            connection: SharedConnection::new(url, "dedupe.redis_url")?,
            prefix: prefix.to_string(),
            pending_mark: format!("p:{}", uuid::Uuid::new_v4().simple()),
            ttl_ms: ttl.as_millis().max(1) as u64,
            release: redis::Script::new(RELEASE),
        })
    }

    fn name(&self, key: &DedupeKey) -> String {
        format!(
            "{}{:08x}{:08x}{:08x}",
            self.prefix, key.0[0], key.0[1], key.0[2]
        )
    }

    /// Claims every key, waiting (bounded) for keys another instance has pending.
    /// On an error, whatever this request may have claimed is released.
    pub async fn claim(&self, keys: &[DedupeKey]) -> Result<Vec<Claim>, SharedError> {
        let result = self.try_claim(keys).await;
        if let Err(SharedError::Redis(_)) = &result {
            // A timed-out pipeline may still have run. Releasing compares the mark, and
            // this instance claims a key in Redis only while holding it locally, so only
            // this request's claims can be removed.
            self.release(keys).await;
        }
        result
    }

    async fn try_claim(&self, keys: &[DedupeKey]) -> Result<Vec<Claim>, SharedError> {
        let mut claims: Vec<Option<Claim>> = vec![None; keys.len()];
        let deadline = tokio::time::Instant::now() + WAIT_FOR_PENDING;
        loop {
            let open: Vec<usize> = (0..keys.len()).filter(|&i| claims[i].is_none()).collect();
            let mut pipe = redis::pipe();
            for &i in &open {
                pipe.cmd("SET")
                    .arg(self.name(&keys[i]))
                    .arg(&self.pending_mark)
                    .arg("NX")
                    .arg("PX")
                    .arg(PENDING_MS);
            }
            for &i in &open {
                pipe.cmd("GET").arg(self.name(&keys[i]));
            }
            let mut connection = self.connection.get().await?;
            let replies: Vec<Option<String>> = pipe.query_async(&mut connection).await?;
            let (set, get) = replies.split_at(open.len());
            for (n, &i) in open.iter().enumerate() {
                claims[i] = match (&set[n], get[n].as_deref()) {
                    (Some(_), _) => Some(Claim::Ours),
                    (None, Some("c")) => Some(Claim::Committed),
                    // Pending at another instance, or gone between SET and GET: ask again.
                    _ => None,
                };
            }
            if claims.iter().all(Option::is_some) {
                return Ok(claims
                    .into_iter()
                    .map(|c| c.expect("all decided"))
                    .collect());
            }
            if tokio::time::Instant::now() >= deadline {
                let ours: Vec<DedupeKey> = (0..keys.len())
                    .filter(|&i| claims[i] == Some(Claim::Ours))
                    .map(|i| keys[i])
                    .collect();
                self.release(&ours).await;
                return Err(SharedError::StillPending);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Marks claimed keys as accepted for the window.
    pub async fn commit(&self, keys: &[DedupeKey]) -> redis::RedisResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(self.name(key))
                .arg("c")
                .arg("PX")
                .arg(self.ttl_ms)
                .ignore();
        }
        let mut connection = self.connection.get().await?;
        pipe.query_async::<()>(&mut connection).await
    }

    /// Gives claimed keys back (their request failed before its messages were stored).
    pub async fn release(&self, keys: &[DedupeKey]) {
        if keys.is_empty() {
            return;
        }
        let mut invocation = self.release.prepare_invoke();
        for key in keys {
            invocation.key(self.name(key));
        }
        invocation.arg(&self.pending_mark);
        let result = match self.connection.get().await {
            Ok(mut c) => invocation.invoke_async::<i64>(&mut c).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // The pending marks lapse by themselves after PENDING_MS.
            tracing::warn!(error = %e, keys = keys.len(), "could not release dedupe claims in redis");
        }
    }
}

/// One Redis connection for a store, made on first use and again after it could not be
/// made (the manager itself reconnects after a connection breaks). The identity store
/// shares it too.
pub struct SharedConnection {
    client: redis::Client,
    slot: RwLock<Option<ConnectionManager>>,
}

impl SharedConnection {
    /// `key` names the config key the URL came from, for the error.
    pub fn new(url: &str, key: &str) -> anyhow::Result<SharedConnection> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        Ok(SharedConnection {
            client,
            slot: RwLock::new(None),
        })
    }

    pub async fn get(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.slot.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.slot.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}
