//! Identity stitching: identify and alias teach anonymousId → {userId, email, phone};
//! destinations with `enrich_identity` get messages that carry only an anonymousId filled
//! with what is known (`userId`, `context.traits.email`, `context.traits.phone`) before
//! they check or translate them, so that later anonymous events (analytics-next puts no
//! traits on track calls) reach the profile the user identified as.
//!
//! Learned at ingest, before the messages are stored: whatever is stored after an
//! identify is read by the destinations after it was learned, so an identify followed by
//! tracks teaches in order, at whatever pace each destination reads. Filled at delivery,
//! so that a message delivered (or replayed) later gets what was learned since.
//!
//! `backend = "memory"`: a bounded LRU (`max_entries`) kept across restarts by a journal
//! beside the dedupe keys (`<data_dir>/identity/identities.jsonl`). `backend = "redis"`:
//! shared by every instance. A store that cannot be reached is logged; the messages are
//! stored and sent anyway, unfilled: losing a stitch beats losing or holding data.

mod config;
mod journal;
mod memory;
mod message;
mod redis;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use config::{IdentityBackend, IdentityConfig};
pub use message::{anonymous_only, enrich, lesson, Fill, Known, Lesson};

use crate::clock::Clock;
use crate::message::MessageType;
use crate::throttle::LogThrottle;
use memory::MemoryStore;
use redis::RedisIdentities;

enum Store {
    Memory(MemoryStore),
    Redis(RedisIdentities),
}

/// The identity store.
pub struct Identity {
    store: Store,
    /// Times the store could not be written or read, for the log line.
    errors: AtomicU64,
    error_log: LogThrottle,
}

impl Identity {
    /// Opens the store; the memory backend loads its journal from `data_dir/identity`.
    pub fn open(
        config: &IdentityConfig,
        data_dir: &Path,
        clock: Clock,
    ) -> anyhow::Result<Identity> {
        let store = match config.backend {
            IdentityBackend::Memory => {
                let dir = data_dir.join("identity");
                let store = MemoryStore::open(&dir, config.max_entries, config.ttl, clock)?;
                tracing::info!(identities = store.len(), "identities loaded");
                Store::Memory(store)
            }
            IdentityBackend::Redis => Store::Redis(RedisIdentities::new(
                &config.redis_url()?,
                &config.redis_key_prefix,
                config.ttl,
            )?),
        };
        Ok(Identity {
            store,
            errors: AtomicU64::new(0),
            error_log: LogThrottle::new(Duration::from_secs(10)),
        })
    }

    /// Learns from the identify and alias calls among `messages` (type, JSON as stored).
    pub async fn learn<'m>(&self, messages: impl Iterator<Item = (MessageType, &'m [u8])>) {
        let lessons: Vec<Lesson> = messages
            .filter(|(kind, _)| matches!(kind, MessageType::Identify | MessageType::Alias))
            .filter_map(|(kind, json)| lesson(kind, json))
            .collect();
        if lessons.is_empty() {
            return;
        }
        let result = match &self.store {
            Store::Memory(store) => store.learn(lessons).map_err(|e| e.to_string()),
            Store::Redis(store) => store.learn(&lessons).await.map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            self.failed("cannot save what identify/alias taught", &e);
        }
    }

    /// What is known of each of `anonymous_ids`, in order.
    pub async fn lookup(&self, anonymous_ids: &[&str]) -> Vec<Option<Known>> {
        match &self.store {
            Store::Memory(store) => anonymous_ids.iter().map(|id| store.lookup(id)).collect(),
            Store::Redis(store) => match store.lookup(anonymous_ids).await {
                Ok(known) => known,
                Err(e) => {
                    self.failed(
                        "cannot read identities; sending messages unfilled",
                        &e.to_string(),
                    );
                    vec![None; anonymous_ids.len()]
                }
            },
        }
    }

    /// What is known of the user an identify named `user_id` (its email and phone), for
    /// a privacy deletion. Only the memory backend can tell: Redis keys identities by
    /// anonymousId alone, and a scan of them all is not worth one deletion.
    pub async fn known_user(&self, user_id: &str) -> Option<Known> {
        match &self.store {
            Store::Memory(store) => store.known_user(user_id),
            Store::Redis(_) => None,
        }
    }

    /// Fills each anonymous-only message of `messages` with what is known of its
    /// anonymousId, as far as `fill` allows. One lookup for the whole batch.
    pub async fn enrich_all(&self, messages: &mut [&mut Vec<u8>], fill: Fill) {
        let anonymous: Vec<Option<String>> =
            messages.iter().map(|json| anonymous_only(json)).collect();
        let mut distinct: Vec<&str> = anonymous.iter().flatten().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.is_empty() {
            return;
        }
        let found = self.lookup(&distinct).await;
        let known: HashMap<&str, Known> = distinct
            .iter()
            .zip(found)
            .filter_map(|(id, known)| Some((*id, known?)))
            .collect();
        for (json, id) in messages.iter_mut().zip(&anonymous) {
            let Some(known) = id.as_deref().and_then(|id| known.get(id)) else {
                continue;
            };
            if let Some(filled) = enrich(json, known, fill) {
                **json = filled;
            }
        }
    }

    fn failed(&self, what: &str, error: &str) {
        let errors = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if self.error_log.ready() {
            tracing::warn!(error, errors, "identity store: {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_identify_fills_the_later_anonymous_tracks_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let identity =
            Identity::open(&IdentityConfig::default(), dir.path(), Clock::system()).unwrap();
        let identify = br#"{"type":"identify","anonymousId":"a1","userId":"u1","traits":{"email":"x@example.com"}}"#;
        identity
            .learn([(MessageType::Identify, &identify[..])].into_iter())
            .await;
        let mut track = br#"{"type":"track","event":"E","anonymousId":"a1"}"#.to_vec();
        let mut other = br#"{"type":"track","event":"E","anonymousId":"a2"}"#.to_vec();
        identity
            .enrich_all(&mut [&mut track, &mut other], Fill::ALL)
            .await;
        assert_eq!(
            std::str::from_utf8(&track).unwrap(),
            r#"{"type":"track","event":"E","anonymousId":"a1","userId":"u1","context":{"traits":{"email":"x@example.com"}}}"#
        );
        assert_eq!(other, br#"{"type":"track","event":"E","anonymousId":"a2"}"#);
    }
}
