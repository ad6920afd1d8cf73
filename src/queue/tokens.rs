//! The cluster's token buckets, on the shared log: one key per limit in a KV bucket
//! beside the stream (`<stream>_limits`), each holding a `pace::Bucket`. An instance
//! takes tokens by compare-and-set on the key's revision, so instances never spend the
//! same tokens; it leases a few more than it needs (50 ms worth at most), so a quota
//! checked on every request does not cost a round trip on every request.
//!
//! Measured against splitting the limit by live instances (design notes in
//! `notes/quotas.md`): the shared bucket keeps the whole cluster at the limit however
//! the load falls, where a split leaves an idle instance's share unused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::pace::{Bucket, SharedBuckets, Taking};

/// Tokens leased beyond a take, in seconds of the rate.
const LEASE_SECONDS: f64 = 0.05;
/// A lease unused for this long is given up (its tokens count as spent), so that no
/// instance sits on tokens the others could use.
const LEASE_TTL: Duration = Duration::from_secs(1);
/// Compare-and-set attempts lost to other instances before the take reports a wait.
const ATTEMPTS: usize = 8;
/// A key not written for this long is dropped by the server: a full bucket by then.
const IDLE_KEY: Duration = Duration::from_secs(3600);

/// The KV bucket of limits, and what this instance holds leased of each.
pub struct KvBuckets {
    store: kv::Store,
    clock: Clock,
    /// Per key; the async lock keeps one refill of a key at a time per instance, so
    /// requests arriving meanwhile wait for its lease instead of racing it.
    leases: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Lease>>>>,
}

#[derive(Default)]
struct Lease {
    tokens: f64,
    until: Option<Instant>,
}

impl KvBuckets {
    /// Opens (or creates) the limits bucket of stream `stream`, with `replicas` copies.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        clock: Clock,
    ) -> anyhow::Result<KvBuckets> {
        let bucket = format!("{stream}_limits");
        // Instances started together race to make it: tried again like the stream.
        let store = super::nats::retried_at_start("opening the limits bucket", || async {
            match js.get_key_value(&bucket).await {
                Ok(store) => Ok(store),
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: bucket.clone(),
                        description: "fanout's cluster-wide rate limits and quotas".into(),
                        history: 1,
                        max_age: IDLE_KEY,
                        // Lost tokens are a full bucket: no need to write them to disk.
                        storage: jetstream::stream::StorageType::Memory,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("cannot open the limits bucket `{bucket}`")),
            }
        })
        .await?;
        Ok(KvBuckets {
            store,
            clock,
            leases: Mutex::new(HashMap::new()),
        })
    }

    fn lease(&self, key: &str) -> Arc<tokio::sync::Mutex<Lease>> {
        let mut leases = self.leases.lock().expect("leases poisoned");
        leases.entry(key.to_string()).or_default().clone()
    }

    fn now(&self) -> f64 {
        self.clock.now().timestamp_micros() as f64 / 1e6
    }

    async fn take_shared(
        &self,
        key: &str,
        rate: f64,
        burst: f64,
        n: f64,
    ) -> Result<Option<Duration>, String> {
        let lease = self.lease(key);
        let mut lease = lease.lock().await;
        let fresh = lease.until.is_some_and(|until| Instant::now() < until);
        let have = if fresh { lease.tokens } else { 0.0 };
        if have >= n {
            lease.tokens -= n;
            return Ok(None);
        }
        let subject = kv_key(key);
        for _ in 0..ATTEMPTS {
            let entry = self
                .store
                .entry(&subject)
                .await
                .map_err(|e| e.to_string())?;
            let now = self.now();
            let (mut bucket, revision) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice(&entry.value)
                        .unwrap_or_else(|_| Bucket::full(burst, now)),
                    entry.revision,
                ),
                Some(entry) => (Bucket::full(burst, now), entry.revision),
                None => (Bucket::full(burst, now), 0),
            };
            bucket.refill(now, rate, burst);
            // What must come from the store, and a little more while it is there.
            let wanted = n - have;
            if let Some(wait) = bucket.take(now, rate, burst, wanted) {
                return Ok(Some(wait));
            }
            let extra = (rate * LEASE_SECONDS).min(bucket.tokens).max(0.0);
            bucket.tokens -= extra;
            let value = serde_json::to_vec(&bucket).expect("a bucket serializes");
            match self.store.update(&subject, value.into(), revision).await {
                Ok(_) => {
                    lease.tokens = extra;
                    lease.until = Some(Instant::now() + LEASE_TTL);
                    return Ok(None);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        // Others keep winning the key: it is busy, so tokens are short; ask again soon.
        Ok(Some(Duration::from_millis(fastrand::u64(5..20))))
    }
}

impl SharedBuckets for KvBuckets {
    fn take<'a>(&'a self, key: &'a str, rate: f64, burst: f64, n: f64) -> Taking<'a> {
        Box::pin(self.take_shared(key, rate, burst, n))
    }
}

/// A limit's name as a KV key: letters, digits, `-` and `_` kept, anything else as
/// `=xx` hex (KV keys take few characters), `.` between the parts.
fn kv_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                out.push(char::from(byte))
            }
            other => out.push_str(&format!("={other:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_names_become_valid_keys() {
        assert_eq!(kv_key("d.crm.events"), "d.crm.events");
        assert_eq!(kv_key("s.web app/é"), "s.web=20app=2f=c3=a9");
    }
}
