//! Stage 3: drop messages whose (source, messageId) was accepted within the window.
//!
//! Two steps, so that a failed write never blocks a retry and concurrent retries cannot
//! both pass: `reserve` marks a request's new keys as pending (a request meeting a key
//! another request holds waits for that request's outcome), and `Reservation::commit`,
//! called only after the queue's fsync, moves them into the window. Dropping an
//! uncommitted reservation releases its keys.
//!
//! The window survives restarts: every queued record carries its key, so on start the
//! window is rebuilt from the retained log plus `keys.bin`, where the keys of each log
//! segment are saved (and fsynced) before the segment is deleted.
//!
//! With `backend = "redis"`, instances share the window through Redis (`redis.rs`); the
//! local table then serves as a front cache of keys known to be taken.

mod config;
mod keylog;
mod redis;
mod reservation;
mod table;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::redis::SharedConnection;
pub use config::{DedupeBackend, DedupeConfig, RedisFailure};
pub use reservation::Reservation;
pub use table::KeyTable;

use self::redis::RedisStore;
use self::reservation::Holders;
use crate::auth::SourceConfig;
use crate::clock::Clock;
use crate::message::{DedupeKey, Tag};
use crate::throttle::LogThrottle;

/// The dedupe stage.
pub struct Dedupe {
    table: KeyTable,
    /// Keys of requests between reserve and commit; the receiver wakes when its
    /// request commits or gives up.
    holders: Mutex<Holders>,
    /// Sources with `dedupe = { enabled = false }`; replaced on config reload.
    disabled_sources: arc_swap::ArcSwap<HashSet<String>>,
    keylog: keylog::KeyLog,
    eviction_log: LogThrottle,
    shared: Option<Arc<RedisStore>>,
    /// Refuse requests (503) when Redis cannot be asked, instead of deduping locally.
    fail_closed: bool,
    shared_errors: AtomicU64,
    shared_error_log: LogThrottle,
    /// Keys of reclaimed segments that a full disk kept out of `keys.bin`.
    keys_unsaved: AtomicU64,
    keys_unsaved_log: LogThrottle,
    clock: Clock,
}

fn disabled_sources(sources: &[SourceConfig]) -> HashSet<String> {
    sources
        .iter()
        .filter(|s| !s.dedupe.enabled)
        .map(|s| s.name.clone())
        .collect()
}

/// Why messages could not be checked for duplicates; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error("dedupe store unavailable: {0}")]
    Unavailable(String),
}

impl Dedupe {
    /// Opens the window, loading the keys of already-reclaimed log segments. Its time
    /// (what the TTL is measured with) is `clock`'s.
    pub fn open(
        config: &DedupeConfig,
        sources: &[SourceConfig],
        data_dir: &Path,
        clock: Clock,
    ) -> anyhow::Result<Dedupe> {
        let ttl_secs = config.ttl.as_secs().clamp(1, u64::from(u32::MAX / 2)) as u32;
        let table = KeyTable::new(config.max_entries, ttl_secs);
        let now = clock.unix_secs();
        let keylog = keylog::KeyLog::open(&data_dir.join("dedupe"), config.max_entries)?;
        let loaded = keylog.load(|key, expires| {
            table.insert_until(key, expires, now);
        })?;
        tracing::info!(keys = loaded, "dedupe keys of reclaimed segments loaded");
        let shared = match config.backend {
            DedupeBackend::Memory => None,
            DedupeBackend::Redis => Some(Arc::new(RedisStore::new(
                &config.redis_url()?,
                &config.redis_key_prefix,
                config.ttl,
            )?)),
        };
        Ok(Dedupe {
            table,
            holders: Mutex::new(Holders::default()),
            disabled_sources: arc_swap::ArcSwap::from_pointee(disabled_sources(sources)),
            keylog,
            eviction_log: LogThrottle::new(Duration::from_secs(60)),
            shared,
            fail_closed: config.on_redis_error == RedisFailure::FailClosed,
            shared_errors: AtomicU64::new(0),
            shared_error_log: LogThrottle::new(Duration::from_secs(10)),
            keys_unsaved: AtomicU64::new(0),
            keys_unsaved_log: LogThrottle::new(Duration::from_secs(60)),
            clock,
        })
    }

    pub fn applies_to(&self, source: &str) -> bool {
        !self.disabled_sources.load().contains(source)
    }

    /// Takes the per-source switches of a reloaded config.
    pub fn set_sources(&self, sources: &[SourceConfig]) {
        self.disabled_sources
            .store(Arc::new(disabled_sources(sources)));
    }

    /// Adds a key found in the retained log on start.
    pub fn restore(&self, source: &str, tag: Tag) {
        if tag.has_key() && self.applies_to(source) {
            self.table
                .insert(DedupeKey(tag.key), tag.accepted_at, self.clock.unix_secs());
        }
    }

    /// At start, after the restore: rewrites `keys.bin` with just the live keys if it
    /// has grown past its bound. Work that can wait: a failure (a full disk) is logged
    /// and start-up goes on; it is tried again when the log next grows.
    pub fn compact_if_oversized(&self) {
        let result =
            self.keylog
                .oversized()
                .and_then(|oversized| if oversized { self.compact() } else { Ok(()) });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot compact the dedupe key log now; going on");
        }
    }

    /// Rewrites `keys.bin` with just the live keys.
    fn compact(&self) -> std::io::Result<()> {
        let now = self.clock.unix_secs();
        self.keylog.rewrite(|write| {
            let mut result = Ok(());
            self.table.for_each_live(now, |chunk| {
                if result.is_ok() {
                    result = write(chunk);
                }
            });
            result
        })
    }

    /// Saves the keys of a log segment about to be deleted; it may be deleted only
    /// after this returns Ok.
    pub fn save_reclaimed(&self, records: &[(std::sync::Arc<str>, Tag)]) -> std::io::Result<()> {
        let now = self.clock.unix_secs();
        let entries: Vec<(DedupeKey, u32)> = records
            .iter()
            .filter(|(source, tag)| tag.has_key() && self.applies_to(source))
            .map(|(_, tag)| (DedupeKey(tag.key), self.table.expiry_of(tag.accepted_at)))
            .filter(|&(_, expires)| expires > now)
            .collect();
        match self.keylog.append(&entries) {
            Ok(true) => self.compact(),
            Ok(false) => Ok(()),
            // Keeping the segment would keep the disk full: ingest could never recover
            // by itself. The window in memory still holds these keys; only a restart
            // within their window forgets them.
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                self.keys_unsaved
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                if self.keys_unsaved_log.ready() {
                    tracing::warn!(
                        error = %e,
                        keys = self.keys_unsaved.load(Ordering::Relaxed),
                        "disk full: the dedupe keys of a reclaimed queue segment were not \
                         saved; after a restart their messageIds may be accepted again"
                    );
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Keys in the window.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Keys dropped before their window ended because `max_entries` was reached.
    pub fn evicted(&self) -> u64 {
        self.table.evicted()
    }

    fn report_evictions(&self) {
        let evicted = self.table.evicted();
        if evicted == 0 {
            return;
        }
        if self.eviction_log.ready() {
            tracing::warn!(
                evicted,
                "dedupe window is full (dedupe.max_entries): the oldest keys were dropped early"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sources as `[[sources]]` tables write them.
    fn sources(tables: &[&str]) -> Vec<SourceConfig> {
        tables.iter().map(|t| toml::from_str(t).unwrap()).collect()
    }

    fn dedupe(dir: &Path) -> Arc<Dedupe> {
        let sources = sources(&[
            "name = \"web\"",
            "name = \"raw\"\ndedupe = { enabled = false }",
        ]);
        Arc::new(Dedupe::open(&DedupeConfig::default(), &sources, dir, Clock::system()).unwrap())
    }

    fn tag(source: &str, id: &str) -> Tag {
        Tag {
            key: DedupeKey::of(source, id).0,
            accepted_at: Clock::system().unix_secs(),
        }
    }

    #[tokio::test]
    async fn commit_makes_later_requests_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedupe(dir.path());
        let r = d
            .reserve(
                "web",
                [tag("web", "a"), tag("web", "b"), tag("web", "a")].into_iter(),
            )
            .await
            .unwrap();
        assert_eq!(
            (0..3).map(|i| r.is_duplicate(i)).collect::<Vec<_>>(),
            [false, false, true]
        );
        r.commit().await;
        let r = d
            .reserve("web", [tag("web", "b"), tag("web", "c")].into_iter())
            .await
            .unwrap();
        assert_eq!((r.is_duplicate(0), r.is_duplicate(1)), (true, false));
        // Another source's same messageId is a different key.
        let r = d
            .reserve("app", [tag("app", "a")].into_iter())
            .await
            .unwrap();
        assert!(!r.is_duplicate(0));
    }

    #[tokio::test]
    async fn released_keys_can_be_retried() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedupe(dir.path());
        drop(
            d.reserve("web", [tag("web", "a")].into_iter())
                .await
                .unwrap(),
        );
        let r = d
            .reserve("web", [tag("web", "a")].into_iter())
            .await
            .unwrap();
        assert!(
            !r.is_duplicate(0),
            "a request that failed before commit is not a duplicate"
        );
    }

    #[tokio::test]
    async fn concurrent_request_waits_for_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedupe(dir.path());
        let first = d
            .reserve("web", [tag("web", "x")].into_iter())
            .await
            .unwrap();
        let d2 = d.clone();
        let second = tokio::spawn(async move {
            d2.reserve("web", [tag("web", "x")].into_iter())
                .await
                .unwrap()
                .is_duplicate(0)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "waits while the first is undecided");
        first.commit().await;
        assert!(second.await.unwrap(), "then sees the committed key");
    }

    #[tokio::test]
    async fn disabled_source_and_keyless_messages_pass() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedupe(dir.path());
        d.reserve("raw", [tag("raw", "a")].into_iter())
            .await
            .unwrap()
            .commit()
            .await;
        assert!(!d
            .reserve("raw", [tag("raw", "a")].into_iter())
            .await
            .unwrap()
            .is_duplicate(0));
        let none = Tag {
            key: [0; 3],
            accepted_at: 1,
        };
        d.reserve("web", [none].into_iter())
            .await
            .unwrap()
            .commit()
            .await;
        assert!(!d
            .reserve("web", [none].into_iter())
            .await
            .unwrap()
            .is_duplicate(0));
    }

    #[tokio::test]
    async fn reclaimed_keys_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedupe(dir.path());
        d.save_reclaimed(&[
            ("web".into(), tag("web", "kept")),
            ("raw".into(), tag("raw", "skipped")),
        ])
        .unwrap();
        drop(d);
        let d = dedupe(dir.path());
        assert_eq!(d.len(), 1);
        assert!(d
            .reserve("web", [tag("web", "kept")].into_iter())
            .await
            .unwrap()
            .is_duplicate(0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_lasts_its_ttl_on_paused_time() {
        let dir = tempfile::tempdir().unwrap();
        let config = DedupeConfig {
            ttl: Duration::from_secs(60),
            ..DedupeConfig::default()
        };
        let sources = sources(&["name = \"web\""]);
        let start = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let clock = Clock::following_tokio(start);
        let d = Arc::new(Dedupe::open(&config, &sources, dir.path(), clock).unwrap());
        let tag = |id: &str| Tag {
            key: DedupeKey::of("web", id).0,
            accepted_at: clock.unix_secs(),
        };
        d.reserve("web", [tag("a")].into_iter())
            .await
            .unwrap()
            .commit()
            .await;
        let duplicate = || async {
            d.reserve("web", [tag("a")].into_iter())
                .await
                .unwrap()
                .is_duplicate(0)
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(duplicate().await, "still within the 60 s window");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!duplicate().await, "61 s later the window is over");
    }
}
