//! Dead letters: messages a destination refused, or that ran out of retries, kept with
//! why, so an operator can look at them and send them again (`fanout dead-letters`, the
//! admin endpoints).
//!
//! Two stores, one per queue backend: SQLite in the data dir beside the local log
//! (`sqlite.rs`), and a JetStream stream beside the shared log (`shared.rs`), which every
//! instance sees and replays from.
//!
//! Both are bounded (`[dead_letters]`): past `max_bytes` the oldest letters are dropped
//! as new ones come, and letters older than `retention` are dropped by a task that looks
//! every minute; each drop is counted (`fanout_dead_letters_dropped_total`) and logged.

mod shared;
mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub use sqlite::FILE_NAME;

use super::{NatsQueue, QueueBackend, QueueConfig};
use crate::clock::Clock;
use crate::throttle::LogThrottle;
use shared::SharedStore;
use sqlite::SqliteStore;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The destination answered a final 4xx for this message alone.
    Rejected,
    /// The batch ran out of attempts or time.
    RetriesExhausted,
    /// The destination cannot take this message at all, found before sending (e.g.
    /// `no_profile_identifier`, a Klaviyo limit): the code, the detail is the response.
    Refused(String),
}

impl Reason {
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Rejected => "rejected",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::Refused(code) => code,
        }
    }
}

/// One message's failure, as recorded.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: Reason,
    pub status: Option<u16>,
    /// The last answer's body or the transport error.
    pub response: String,
    pub attempts: u32,
    pub first_attempt_at: DateTime<Utc>,
}

/// A stored dead letter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: i64,
    pub destination: String,
    pub source: String,
    pub reason: String,
    pub status: Option<u16>,
    pub response: String,
    pub attempts: u32,
    pub first_attempt_at: String,
    pub dead_at: String,
    pub replay: bool,
    pub message: Box<serde_json::value::RawValue>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A message that failed, to be stored: its source, its JSON, and why.
pub type NewLetter = (String, Vec<u8>, Arc<Failure>);

/// How many letters of each destination were dropped.
pub type Dropped = BTreeMap<String, u64>;

/// Most letters one listing returns: a page is held in memory whole.
pub const MAX_PAGE: usize = 1000;

/// How much the store keeps: `[dead_letters]`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Past this many bytes of letters the oldest are dropped.
    pub max_bytes: u64,
    /// Letters dead longer than this are dropped.
    pub retention: Duration,
}

/// One page of a listing; `next` is the `after` that gives the next page, if there is one.
#[derive(Debug, Serialize)]
pub struct Page {
    pub dead_letters: Vec<DeadLetter>,
    pub next: Option<i64>,
}

/// How often letters past their retention are looked for (more often when the
/// retention is shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why letters were dropped: the label of `fanout_dead_letters_dropped_total`.
#[derive(Debug, Clone, Copy)]
enum DropReason {
    MaxBytes,
    Retention,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        match self {
            DropReason::MaxBytes => "max_bytes",
            DropReason::Retention => "retention",
        }
    }
}

/// Counts dropped letters, and says so at most every 10 s per reason (a flood of refused
/// messages drops letters at every batch).
fn report(reason: DropReason, dropped: &Dropped) {
    static OVER_CAP: LogThrottle = LogThrottle::new(Duration::from_secs(10));
    static EXPIRED: LogThrottle = LogThrottle::new(Duration::from_secs(10));
    if dropped.is_empty() {
        return;
    }
    for (destination, &letters) in dropped {
        crate::metrics::dead_letters_dropped(destination, reason.as_str(), letters);
    }
    let throttle = match reason {
        DropReason::MaxBytes => &OVER_CAP,
        DropReason::Retention => &EXPIRED,
    };
    if throttle.ready() {
        let letters: u64 = dropped.values().sum();
        match reason {
            DropReason::MaxBytes => tracing::warn!(
                letters,
                destinations = ?dropped.keys().collect::<Vec<_>>(),
                "dropped the oldest dead letters: the store is at dead_letters.max_bytes \
                 (counted in fanout_dead_letters_dropped_total; this line repeats at most \
                 every 10 s)"
            ),
            DropReason::Retention => tracing::info!(
                letters,
                destinations = ?dropped.keys().collect::<Vec<_>>(),
                "dropped dead letters older than dead_letters.retention"
            ),
        }
    }
}

/// The dead-letter store of the configured queue backend.
pub struct DeadLetters(Store);

enum Store {
    Local(Arc<SqliteStore>),
    Shared(Box<SharedStore>),
}

impl DeadLetters {
    /// The store of the queue `config` names, for the command line (the server takes
    /// its store from its queue, `Queue::dead_letters`): the local one in `data_dir`, or
    /// the shared one (connecting to NATS; `queue_bytes` is the stream's budget).
    pub async fn for_config(
        config: &QueueConfig,
        data_dir: &Path,
        queue_bytes: u64,
        bounds: Bounds,
    ) -> anyhow::Result<DeadLetters> {
        match config.backend {
            QueueBackend::Local => DeadLetters::open_local(data_dir, bounds),
            QueueBackend::Nats => {
                let queue = NatsQueue::connect(config, queue_bytes).await?;
                DeadLetters::open_shared(&queue, bounds).await
            }
        }
    }

    pub fn open_local(data_dir: &Path, bounds: Bounds) -> anyhow::Result<DeadLetters> {
        let store = SqliteStore::open(data_dir, bounds.max_bytes).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the dead-letter store in {}: {e}",
                data_dir.display()
            )
        })?;
        Ok(DeadLetters(Store::Local(Arc::new(store))))
    }

    pub(super) async fn open_shared(
        queue: &NatsQueue,
        bounds: Bounds,
    ) -> anyhow::Result<DeadLetters> {
        Ok(DeadLetters(Store::Shared(Box::new(
            SharedStore::open(queue.clone(), bounds.max_bytes).await?,
        ))))
    }

    /// Drops letters older than `retention` now and then, as `clock` tells the time,
    /// until the store is dropped.
    pub fn keep_pruned(self: &Arc<Self>, retention: Duration, clock: Clock) {
        let store: Weak<DeadLetters> = Arc::downgrade(self);
        let every = PRUNE_EVERY.min(retention);
        let errors = LogThrottle::new(Duration::from_secs(60));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                let cutoff = clock.now()
                    - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
                match store.drop_expired(cutoff).await {
                    Ok(dropped) => report(DropReason::Retention, &dropped),
                    Err(e) if errors.ready() => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot drop expired dead letters; trying again at the next look")
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// Drops the letters dead before `cutoff`; returns how many of each destination's.
    pub async fn drop_expired(&self, cutoff: DateTime<Utc>) -> anyhow::Result<Dropped> {
        match &self.0 {
            Store::Local(store) => {
                let store = store.clone();
                blocking(move || store.drop_expired(cutoff)).await
            }
            Store::Shared(store) => store.drop_expired(cutoff).await,
        }
    }

    /// Stores one batch's failures at once: `new` dead letters, and replayed local rows
    /// that failed `again` (the shared store has none: its replays come back through the
    /// queue as new messages). Past `max_bytes`, the oldest letters make room.
    pub async fn record(
        &self,
        destination: &str,
        new: &[NewLetter],
        again: &[(i64, Arc<Failure>)],
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let dropped = match &self.0 {
            Store::Local(store) => {
                let store = store.clone();
                let (destination, new, again) =
                    (destination.to_string(), new.to_vec(), again.to_vec());
                blocking(move || {
                    let new: Vec<(&str, &[u8], &Failure)> = new
                        .iter()
                        .map(|(s, j, f)| (s.as_str(), j.as_slice(), f.as_ref()))
                        .collect();
                    let again: Vec<(i64, &Failure)> =
                        again.iter().map(|(id, f)| (*id, f.as_ref())).collect();
                    store.record(&destination, &new, &again, at)
                })
                .await?
            }
            Store::Shared(store) => store.record(destination, new, at).await?,
        };
        report(DropReason::MaxBytes, &dropped);
        Ok(())
    }

    /// Up to `limit` (at most `MAX_PAGE`) dead letters of `destination` (all
    /// destinations when `None`) with an id above `after`, oldest first.
    pub async fn list(
        &self,
        destination: Option<&str>,
        after: i64,
        limit: usize,
    ) -> anyhow::Result<Page> {
        let limit = limit.clamp(1, MAX_PAGE);
        // One more than asked says whether there is a next page.
        let mut letters = match &self.0 {
            Store::Local(store) => {
                let (store, destination) = (store.clone(), destination.map(str::to_string));
                blocking(move || store.list(destination.as_deref(), after, limit + 1)).await?
            }
            Store::Shared(store) => store.list(destination, after, limit + 1).await?,
        };
        let next = (letters.len() > limit).then(|| {
            letters.truncate(limit);
            letters[limit - 1].id
        });
        Ok(Page {
            dead_letters: letters,
            next,
        })
    }

    /// Sends every dead letter of `destination` again; returns how many. The local store
    /// marks them for its running engine; the shared store puts them back on the stream,
    /// for whichever instance delivers that destination, as accepted at `now`.
    pub async fn request_replay(
        &self,
        destination: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<usize> {
        match &self.0 {
            Store::Local(store) => {
                let (store, destination) = (store.clone(), destination.to_string());
                blocking(move || store.request_replay(&destination)).await
            }
            Store::Shared(store) => store.request_replay(destination, now).await,
        }
    }

    /// Up to `limit` rows marked for replay with an id above `after`, oldest first: what
    /// the engine polls for on the local log (the shared log delivers replays itself).
    pub async fn marked(
        &self,
        destination: &str,
        after: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<(i64, String, Vec<u8>)>> {
        match &self.0 {
            Store::Local(store) => {
                let (store, destination) = (store.clone(), destination.to_string());
                blocking(move || store.marked(&destination, after, limit)).await
            }
            Store::Shared(_) => Ok(Vec::new()),
        }
    }

    /// Whether replays arrive by `marked` (else they come through the queue).
    pub fn polled(&self) -> bool {
        matches!(self.0, Store::Local(_))
    }

    /// Removes every letter whose message `matches` (a privacy suppression's subject),
    /// of every destination; returns how many went.
    pub async fn purge(&self, matches: impl Fn(&[u8]) -> bool) -> anyhow::Result<usize> {
        let (mut after, mut purged) = (0, 0);
        loop {
            let page = self.list(None, after, MAX_PAGE).await?;
            let ids: Vec<i64> = page
                .dead_letters
                .iter()
                .filter(|letter| matches(letter.message.get().as_bytes()))
                .map(|letter| letter.id)
                .collect();
            purged += ids.len();
            if !ids.is_empty() {
                self.remove(ids).await?;
            }
            match page.next {
                Some(next) => after = next,
                None => return Ok(purged),
            }
        }
    }

    /// Removes letters: replayed rows that were delivered, blocked messages taken in again.
    pub async fn remove(&self, ids: Vec<i64>) -> anyhow::Result<()> {
        match &self.0 {
            Store::Local(store) => {
                let store = store.clone();
                blocking(move || store.remove(&ids)).await
            }
            Store::Shared(store) => store.remove(&ids).await,
        }
    }
}

/// Runs a SQLite call on a blocking thread.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| anyhow::anyhow!("dead-letter task failed: {e}"))??)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the system clock freely
mod tests {
    use super::*;

    fn letter(id: &str, at: DateTime<Utc>) -> NewLetter {
        let failure = Failure {
            reason: Reason::Rejected,
            status: Some(400),
            response: "no".into(),
            attempts: 1,
            first_attempt_at: at,
        };
        let json = format!(r#"{{"messageId":"{id}"}}"#).into_bytes();
        ("web".into(), json, Arc::new(failure))
    }

    async fn ids(store: &DeadLetters) -> Vec<String> {
        let page = store.list(None, 0, 100).await.unwrap();
        page.dead_letters
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l.message.get()).unwrap())
            .map(|m| m["messageId"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn letters_past_their_retention_are_dropped_as_the_clock_moves() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let bounds = Bounds {
            max_bytes: 1 << 30,
            retention: hour,
        };
        let store = Arc::new(DeadLetters::open_local(dir.path(), bounds).unwrap());
        let clock = Clock::following_tokio(DateTime::from_timestamp(1_900_000_000, 0).unwrap());
        store
            .record("hook", &[letter("old", clock.now())], &[], clock.now())
            .await
            .unwrap();
        tokio::time::sleep(hour / 2).await;
        store
            .record("hook", &[letter("young", clock.now())], &[], clock.now())
            .await
            .unwrap();
        store.keep_pruned(bounds.retention, clock);
        tokio::time::sleep(hour / 4).await;
        assert_eq!(
            ids(&store).await,
            ["old", "young"],
            "neither is an hour old yet"
        );
        // Paused time moves to the next timer whenever the runtime waits (the prune's
        // SQLite call included), so look a second at a time.
        for _ in 0..3600 {
            let left = ids(&store).await;
            if left == ["young"] {
                return;
            }
            assert_eq!(left, ["old", "young"]);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("the old letter is still there: {:?}", ids(&store).await);
    }

    #[tokio::test]
    async fn a_listing_is_paged_and_its_cursor_walks_every_letter_once() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = Bounds {
            max_bytes: 1 << 30,
            retention: Duration::from_secs(3600),
        };
        let store = DeadLetters::open_local(dir.path(), bounds).unwrap();
        let now = Utc::now();
        let letters: Vec<NewLetter> = (0..25).map(|i| letter(&format!("m{i:02}"), now)).collect();
        store.record("hook", &letters, &[], now).await.unwrap();
        store
            .record("other", &[letter("x", now)], &[], now)
            .await
            .unwrap();
        let (mut seen, mut after, mut pages) = (Vec::new(), 0, 0);
        loop {
            let page = store.list(Some("hook"), after, 10).await.unwrap();
            assert!(page.dead_letters.len() <= 10);
            pages += 1;
            seen.extend(
                page.dead_letters
                    .iter()
                    .map(|l| l.message.get().to_string()),
            );
            match page.next {
                Some(next) => after = next,
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let expected: Vec<String> = (0..25)
            .map(|i| format!(r#"{{"messageId":"m{i:02}"}}"#))
            .collect();
        assert_eq!(seen, expected);
        let whole = store.list(None, 0, 100_000).await.unwrap();
        assert_eq!(
            whole.dead_letters.len(),
            26,
            "a larger limit is cut to MAX_PAGE"
        );
        assert_eq!(whole.next, None);
    }
}
