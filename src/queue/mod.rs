//! Stage 5: the durability point, one seam with two backends. Ingest appends a request's
//! messages and answers only once they are stored; each destination reads from its own
//! position, settles what it delivered, and checkpoints. `local` is a segment log in
//! `server.data_dir` (one machine); `nats` is a JetStream stream shared by every instance
//! pointed at it (`[queue] backend = "nats"`). Both store the same framed records
//! (`record.rs`).

mod config;
pub mod dead_letters;
mod failing;
mod feed;
pub mod local;
pub mod nats;
pub mod record;
mod tokens;

use std::io;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use config::{QueueBackend, QueueConfig};
pub use dead_letters::DeadLetters;
pub use feed::{Feed, Place, Subscription};
pub use local::{saved_checkpoint, Checkpoint, LocalQueue, QueueWriter};
pub use nats::{NatsQueue, ReplayError};
pub use record::RecordBatch;

use crate::clock::Clock;
use crate::message::Tag;
use feed::Attached;

/// Why an append was not stored.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue write failed: {0}")]
    Io(String),
    #[error("queue is shut down")]
    Closed,
    #[error("the queue is full ({0})")]
    Full(String),
    #[error("the shared log is unavailable: {0}")]
    Unavailable(String),
    /// Sent, but not acknowledged: the messages may have been stored or not.
    #[error("the shared log did not confirm storing them: {0}")]
    Uncertain(String),
}

/// The queue ingest appends to and destinations read from. Cheap to clone. Which
/// backend it is stays inside this module.
#[derive(Clone)]
pub struct Queue(Backend);

#[derive(Clone)]
enum Backend {
    Local(LocalQueue),
    Nats(NatsQueue),
}

impl From<LocalQueue> for Queue {
    fn from(log: LocalQueue) -> Queue {
        Queue(Backend::Local(log))
    }
}

/// One message read back from the queue; `R` is how it is settled (a `Place` once the
/// feed has entered it).
#[derive(Debug)]
pub struct Record<R = Place> {
    pub source: String,
    pub tag: Tag,
    pub json: Vec<u8>,
    /// What settles it once it is delivered.
    pub receipt: R,
    /// When it is a dead letter sent again through the shared log: its earlier attempts.
    pub earlier: Option<Earlier>,
    /// Delivered already (a bounded replay passes over it): settled without sending.
    pub passed: bool,
}

impl<R> Record<R> {
    fn with_receipt<T>(self, receipt: T) -> Record<T> {
        Record {
            source: self.source,
            tag: self.tag,
            json: self.json,
            receipt,
            earlier: self.earlier,
            passed: self.passed,
        }
    }
}

/// A replayed dead letter's history, carried with it so that failing again adds up.
#[derive(Debug, Clone, Copy)]
pub struct Earlier {
    pub attempts: u32,
    pub first_attempt_at: chrono::DateTime<chrono::Utc>,
}

impl Queue {
    /// Opens the backend `config` names: the local log in `data_dir` (with its writer
    /// thread, to be joined at the end), or the shared log on NATS. `max_bytes` is the
    /// queue's budget; `retention` how long delivered messages are kept for replays.
    pub async fn open(
        config: &QueueConfig,
        data_dir: &Path,
        segment_bytes: u64,
        max_bytes: u64,
        retention: Duration,
        clock: Clock,
    ) -> anyhow::Result<(Queue, Option<QueueWriter>)> {
        match config.backend {
            QueueBackend::Local => {
                let (log, writer) = LocalQueue::open(data_dir, segment_bytes, max_bytes, clock)?;
                log.set_retention(retention);
                Ok((Queue(Backend::Local(log)), Some(writer)))
            }
            QueueBackend::Nats => {
                let shared = NatsQueue::connect(config, max_bytes).await?;
                shared.keep_retained(retention).await?;
                shared.keep_record(data_dir).await;
                Ok((Queue(Backend::Nats(shared)), None))
            }
        }
    }

    /// On the shared log (with `queue.shared_limits`): makes rate limits and source
    /// quotas hold for the whole cluster, through token buckets in a KV bucket beside
    /// the stream. Before any limiter is made. Nothing on the local log.
    pub async fn share_limits(&self, config: &QueueConfig, clock: Clock) -> anyhow::Result<()> {
        let Backend::Nats(shared) = &self.0 else {
            return Ok(());
        };
        if !config.shared_limits {
            return Ok(());
        }
        let buckets = tokens::KvBuckets::open(
            shared.context(),
            &shared.names().stream,
            config.replicas,
            clock,
        )
        .await?;
        crate::pace::share_buckets(std::sync::Arc::new(buckets));
        Ok(())
    }

    /// The dead-letter store that goes with this queue: SQLite in `data_dir` beside the
    /// local log, a stream beside the shared log.
    pub async fn dead_letters(
        &self,
        data_dir: &Path,
        bounds: dead_letters::Bounds,
    ) -> anyhow::Result<DeadLetters> {
        match &self.0 {
            Backend::Local(_) => DeadLetters::open_local(data_dir, bounds),
            Backend::Nats(shared) => DeadLetters::open_shared(shared, bounds).await,
        }
    }

    /// The shared log, when the queue is one (stores beside it open their own streams).
    pub fn shared(&self) -> Option<&NatsQueue> {
        match &self.0 {
            Backend::Local(_) => None,
            Backend::Nats(shared) => Some(shared),
        }
    }

    /// Hands `each` every message the log on this machine holds; `None` when the queue
    /// is shared, and so not all here (instances share their dedupe window otherwise).
    pub fn scan_local(&self, each: impl FnMut(&str, Tag)) -> io::Result<Option<usize>> {
        match &self.0 {
            Backend::Local(log) => log.scan(each).map(Some),
            Backend::Nats(_) => Ok(None),
        }
    }

    /// Has the log on this machine hand `hook` each segment's messages before deleting
    /// the segment (nothing on a shared queue).
    pub fn on_reclaim(&self, hook: local::ReclaimHook) {
        if let Backend::Local(log) = &self.0 {
            log.on_reclaim(hook);
        }
    }

    /// Stores a request's messages: returns once every one of them is durable.
    pub async fn append(&self, batch: RecordBatch) -> Result<(), QueueError> {
        match &self.0 {
            Backend::Local(queue) => queue.append(batch).await,
            Backend::Nats(queue) => queue.append(batch).await,
        }
    }

    /// Whether ingest can store now, and if not, why (for `/ready`).
    pub fn readiness(&self) -> Result<(), String> {
        match &self.0 {
            Backend::Local(queue) => queue.readiness(),
            Backend::Nats(queue) => queue.readiness(),
        }
    }

    /// Attaches the destination `name` at its saved position (a new one starts with
    /// what is accepted from now on).
    pub async fn subscribe(&self, name: &str) -> anyhow::Result<Subscription> {
        let kind = match &self.0 {
            Backend::Local(queue) => {
                let (reader, cursor, saved) = queue.subscribe(name)?;
                Attached::Log {
                    reader: Box::new(reader),
                    cursor,
                    saved,
                    log: queue.clone(),
                }
            }
            Backend::Nats(queue) => {
                let (feed, acks) = queue.subscribe(name).await?;
                Attached::Stream {
                    feed: Box::new(feed),
                    acks: Box::new(acks),
                }
            }
        };
        Ok(Subscription {
            name: name.to_string(),
            kind,
        })
    }

    /// Delivers to `name` again what the retained log holds from the first message
    /// accepted at or after `since` (to `until`, when given). The shared log puts the
    /// messages on the destination's replay subject itself; the local log checks the
    /// range and leaves moving the destination's cursor back to the caller, who stops
    /// its engine first (`Replay::Rewind`).
    pub async fn replay(
        &self,
        name: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Replay, ReplayError> {
        match &self.0 {
            Backend::Nats(shared) => shared.replay(name, since, until).await.map(Replay::Sent),
            Backend::Local(log) => {
                let seconds = |t: DateTime<Utc>| t.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
                let rewind = Rewind {
                    log: log.clone(),
                    name: name.to_string(),
                    since: seconds(since),
                    until: until.map(seconds),
                };
                // Checked first, so a refused replay does not stop anything.
                rewind.range().await?;
                Ok(Replay::Rewind(rewind))
            }
        }
    }

    /// Every destination the queue keeps messages for, configured or not: a removed
    /// one keeps its part until it is purged.
    pub async fn held_for(&self) -> anyhow::Result<Vec<String>> {
        match &self.0 {
            Backend::Local(queue) => Ok(queue.cursor_names()),
            Backend::Nats(queue) => queue.destinations().await,
        }
    }

    /// Forgets a destination that no longer runs, and frees what only it was holding.
    pub async fn purge(&self, name: &str) -> anyhow::Result<()> {
        match &self.0 {
            Backend::Local(queue) => {
                let queue = queue.clone();
                let name = name.to_string();
                tokio::task::spawn_blocking(move || queue.purge(&name)).await??;
                Ok(())
            }
            Backend::Nats(queue) => queue.purge(name).await,
        }
    }

    /// Bytes of the local log behind a destination's cursor (on the shared log, its
    /// consumers' gauges say what is pending).
    pub fn lag_bytes(&self, name: &str) -> Option<u64> {
        match &self.0 {
            Backend::Local(queue) => queue.lag_bytes(name),
            Backend::Nats(_) => None,
        }
    }

    /// For `/metrics`: bytes held, and each destination's lag.
    pub fn state(&self) -> (u64, Vec<(String, u64)>) {
        match &self.0 {
            Backend::Local(queue) => {
                let lags = queue
                    .cursor_names()
                    .into_iter()
                    .filter_map(|name| queue.lag_bytes(&name).map(|lag| (name, lag)))
                    .collect();
                (queue.held_bytes(), lags)
            }
            Backend::Nats(queue) => (queue.held_bytes(), Vec::new()),
        }
    }
}

/// How a replay goes on.
pub enum Replay {
    /// The queue sent the messages again itself: how many.
    Sent(u64),
    /// The destination's cursor must move back, with its engine stopped.
    Rewind(Rewind),
}

/// A replay on the local log, its range checked: `apply` moves the destination's cursor
/// back, and its next subscription passes over what was accepted after `until`.
pub struct Rewind {
    log: LocalQueue,
    name: String,
    since: u32,
    until: Option<u32>,
}

impl Rewind {
    async fn range(&self) -> Result<local::ReplayRange, ReplayError> {
        let (log, name, since, until) =
            (self.log.clone(), self.name.clone(), self.since, self.until);
        blocking(move || log.replay_range(&name, since, until))
            .await?
            .map_err(|e| {
                ReplayError::NotRetained(
                    e.oldest
                        .and_then(|t| DateTime::from_timestamp(i64::from(t), 0)),
                )
            })
    }

    /// Moves the cursor back (from where the stopped engine saved it); returns how many
    /// messages go again.
    pub async fn apply(self) -> Result<u64, ReplayError> {
        let range = self.range().await?;
        if range.start < range.stop_at {
            let (log, name) = (self.log.clone(), self.name.clone());
            blocking(move || log.rewind(&name, range.start)).await?;
        }
        if let Some(until) = self.until {
            self.log.set_window(&self.name, (until, range.stop_at));
        }
        Ok(range.messages)
    }
}

/// Runs blocking queue I/O off the runtime.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ReplayError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| ReplayError::Failed(anyhow::anyhow!("replay task failed: {e}")))?
        .map_err(|e| ReplayError::Failed(anyhow::anyhow!("reading the queue: {e}")))
}
