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

mod keylog;
mod redis;
mod table;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

pub use table::KeyTable;

use self::redis::{Claim as SharedClaim, RedisStore, SharedError};
use self::table::Claim;
use crate::config::{DedupeBackend, DedupeConfig, SourceConfig};
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
    duplicates: AtomicU64,
    eviction_log: LogThrottle,
    shared: Option<Arc<RedisStore>>,
    /// Refuse requests (503) when Redis cannot be asked, instead of deduping locally.
    fail_closed: bool,
    shared_errors: AtomicU64,
    shared_error_log: LogThrottle,
    /// Keys of reclaimed segments that a full disk kept out of `keys.bin`.
    keys_unsaved: AtomicU64,
    keys_unsaved_log: LogThrottle,
}

fn disabled_sources(sources: &[SourceConfig]) -> HashSet<String> {
    sources
        .iter()
        .filter(|s| !s.dedupe.enabled)
        .map(|s| s.name.clone())
        .collect()
}

/// Requests holding pending keys (their ids are in the table's slots); each one's
/// receiver wakes when that request commits or gives up.
#[derive(Default)]
struct Holders {
    waiting_on: HashMap<u32, watch::Receiver<()>>,
    next: u32,
}

/// Why messages could not be checked for duplicates; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error("dedupe store unavailable: {0}")]
    Unavailable(String),
}

impl Dedupe {
    /// Opens the window, loading the keys of already-reclaimed log segments.
    pub fn open(
        config: &DedupeConfig,
        sources: &[SourceConfig],
        data_dir: &Path,
    ) -> anyhow::Result<Dedupe> {
        let ttl_secs = config.ttl.as_secs().clamp(1, u64::from(u32::MAX / 2)) as u32;
        let table = KeyTable::new(config.max_entries, ttl_secs);
        let now = now_secs();
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
            duplicates: AtomicU64::new(0),
            eviction_log: LogThrottle::new(Duration::from_secs(60)),
            shared,
            fail_closed: config.on_redis_error == crate::config::RedisFailure::FailClosed,
            shared_errors: AtomicU64::new(0),
            shared_error_log: LogThrottle::new(Duration::from_secs(10)),
            keys_unsaved: AtomicU64::new(0),
            keys_unsaved_log: LogThrottle::new(Duration::from_secs(60)),
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
                .insert(DedupeKey(tag.key), tag.accepted_at, now_secs());
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
        let now = now_secs();
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
    pub fn save_reclaimed(&self, records: &[(String, Tag)]) -> std::io::Result<()> {
        let now = now_secs();
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

    /// Marks the new keys of one request as pending and says which messages are
    /// duplicates: of an accepted message, or of an earlier message in the same request.
    /// `source` is the request's source; messages without a key are never duplicates.
    pub async fn reserve(
        self: &Arc<Self>,
        source: &str,
        tags: impl Iterator<Item = Tag>,
    ) -> Result<Reservation, DedupeError> {
        let keys: Vec<Option<DedupeKey>> = if self.applies_to(source) {
            tags.map(|t| t.has_key().then_some(DedupeKey(t.key)))
                .collect()
        } else {
            tags.map(|_| None).collect()
        };
        let mut reservation = self.reserve_locally(&keys).await;
        if let Some(shared) = &self.shared {
            self.reserve_shared(shared, &mut reservation).await?;
        }
        let count = reservation.duplicates() as u64;
        self.duplicates.fetch_add(count, Ordering::Relaxed);
        Ok(reservation)
    }

    async fn reserve_locally(self: &Arc<Self>, keys: &[Option<DedupeKey>]) -> Reservation {
        let (signal, waiter) = watch::channel(());
        let mut reservation = Reservation {
            dedupe: self.clone(),
            duplicate: vec![false; keys.len()],
            ours: Vec::new(),
            holder: None,
            shared_claimed: false,
            _signal: signal,
            committed: false,
        };
        if keys.iter().all(Option::is_none) {
            return reservation;
        }
        // Registered before claiming, so a request meeting our claims can wait on us.
        let holder = {
            let mut holders = self.holders.lock().expect("holders poisoned");
            let id = holders.next;
            holders.next = (holders.next + 1) % table::MAX_HOLDER;
            holders.waiting_on.insert(id, waiter);
            id
        };
        reservation.holder = Some(holder);
        loop {
            let now = now_secs();
            let mut busy = None;
            for (index, key) in keys.iter().enumerate() {
                let Some(key) = key else { continue };
                match self.table.claim(*key, holder, now) {
                    Claim::Marked => reservation.ours.push((index, *key)),
                    Claim::Accepted => reservation.duplicate[index] = true,
                    // Our own claim: repeated within this request.
                    Claim::HeldBy(h) if h == holder => reservation.duplicate[index] = true,
                    Claim::HeldBy(other) => {
                        busy = Some(other);
                        break;
                    }
                }
            }
            let Some(other) = busy else {
                return reservation;
            };
            // Another request holds one of our keys: give ours back (so two requests
            // can never wait on each other) and wait for its outcome.
            for (_, key) in reservation.ours.drain(..) {
                self.table.unclaim(&key, holder);
            }
            reservation.duplicate.iter_mut().for_each(|d| *d = false);
            let other = self
                .holders
                .lock()
                .expect("holders poisoned")
                .waiting_on
                .get(&other)
                .cloned();
            match other {
                // Returns once that request's Reservation is dropped.
                Some(mut other) => {
                    let _ = other.changed().await;
                }
                // It finished between our claim and this lookup.
                None => tokio::task::yield_now().await,
            }
        }
    }

    /// Claims the locally new keys in Redis; keys another instance accepted become
    /// duplicates. On Redis errors: local-only dedupe (fail_open) or a 503 (fail_closed).
    async fn reserve_shared(
        &self,
        shared: &RedisStore,
        reservation: &mut Reservation,
    ) -> Result<(), DedupeError> {
        if reservation.ours.is_empty() {
            return Ok(());
        }
        let keys: Vec<DedupeKey> = reservation.ours.iter().map(|&(_, k)| k).collect();
        match shared.claim(&keys).await {
            Ok(claims) => {
                let now = now_secs();
                let mut kept = Vec::with_capacity(claims.len());
                for (&(index, key), claim) in reservation.ours.iter().zip(claims) {
                    match claim {
                        SharedClaim::Ours => kept.push((index, key)),
                        SharedClaim::Committed => {
                            // Remember it locally (replacing our claim), so the next
                            // retry needs no round trip.
                            self.table.insert(key, now, now);
                            reservation.duplicate[index] = true;
                        }
                    }
                }
                reservation.ours = kept;
                reservation.shared_claimed = true;
                Ok(())
            }
            Err(SharedError::StillPending) => Err(DedupeError::Unavailable(
                "another instance is still storing some of these messageIds".into(),
            )),
            Err(SharedError::Redis(e)) => {
                self.shared_errors.fetch_add(1, Ordering::Relaxed);
                if self.fail_closed {
                    return Err(DedupeError::Unavailable(format!("redis: {e}")));
                }
                self.log_shared_error(&e);
                Ok(())
            }
        }
    }

    fn log_shared_error(&self, e: &dyn std::fmt::Display) {
        if self.shared_error_log.ready() {
            tracing::warn!(
                error = %e,
                errors = self.shared_errors.load(Ordering::Relaxed),
                "redis unreachable: deduping locally only (dedupe.on_redis_error = fail_open)"
            );
        }
    }

    /// Requests whose Redis check failed so far.
    pub fn shared_errors(&self) -> u64 {
        self.shared_errors.load(Ordering::Relaxed)
    }

    /// Messages dropped as duplicates so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
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

/// One request's claim on its keys, from `reserve` to `commit` (or drop).
pub struct Reservation {
    dedupe: Arc<Dedupe>,
    duplicate: Vec<bool>,
    /// (message index, key) of the keys this request claimed.
    ours: Vec<(usize, DedupeKey)>,
    /// This request's id in the table's pending slots, when it has keys.
    holder: Option<u32>,
    /// The keys are claimed in Redis too.
    shared_claimed: bool,
    /// Dropped with the reservation: wakes requests waiting on our keys.
    _signal: watch::Sender<()>,
    committed: bool,
}

impl Reservation {
    pub fn is_duplicate(&self, index: usize) -> bool {
        self.duplicate[index]
    }

    pub fn duplicates(&self) -> usize {
        self.duplicate.iter().filter(|&&d| d).count()
    }

    /// The request's messages are durable: their keys enter the window.
    pub async fn commit(mut self) {
        let now = now_secs();
        for &(_, key) in &self.ours {
            self.dedupe.table.insert(key, now, now);
        }
        if let (true, Some(shared)) = (self.shared_claimed, &self.dedupe.shared) {
            let keys: Vec<DedupeKey> = self.ours.iter().map(|&(_, k)| k).collect();
            if let Err(e) = shared.commit(&keys).await {
                // The messages are stored; their pending marks lapse, so a retry reaching
                // another instance after that may be accepted again.
                self.dedupe.shared_errors.fetch_add(1, Ordering::Relaxed);
                self.dedupe.log_shared_error(&e);
            }
        }
        self.committed = true;
        self.release_locally();
        self.dedupe.report_evictions();
    }

    /// Gives back uncommitted claims and stops being waited on.
    fn release_locally(&mut self) {
        let Some(holder) = self.holder else { return };
        if !self.committed {
            for (_, key) in &self.ours {
                self.dedupe.table.unclaim(key, holder);
            }
        }
        self.dedupe
            .holders
            .lock()
            .expect("holders poisoned")
            .waiting_on
            .remove(&holder);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.release_locally();
        if let (true, Some(shared)) = (self.shared_claimed, self.dedupe.shared.clone()) {
            let keys: Vec<DedupeKey> = self.ours.iter().map(|&(_, k)| k).collect();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { shared.release(&keys).await });
            }
        }
    }
}

fn now_secs() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    secs.min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn dedupe(dir: &Path) -> Arc<Dedupe> {
        let config = Config::parse("[[sources]]\nname = \"web\"\n\n[[sources]]\nname = \"raw\"\ndedupe = { enabled = false }\n").unwrap();
        Arc::new(Dedupe::open(&config.dedupe, &config.sources, dir).unwrap())
    }

    fn tag(source: &str, id: &str) -> Tag {
        Tag {
            key: DedupeKey::of(source, id).0,
            accepted_at: now_secs(),
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
}
