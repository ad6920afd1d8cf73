//! Dead letters: messages a destination refused, or that ran out of retries, kept with
//! why, so an operator can look at them and send them again (`fanout dead-letters`, the
//! admin endpoints).
//!
//! Two stores, one per queue backend: SQLite in the data dir beside the local log
//! (`sqlite.rs`), and a JetStream stream beside the shared log (`shared.rs`), which every
//! instance sees and replays from.

mod shared;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub use sqlite::FILE_NAME;

use crate::config::{Config, QueueBackend};
use crate::queue::{NatsQueue, Queue};
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

/// The dead-letter store of the configured queue backend.
pub enum DeadLetters {
    Local(Arc<SqliteStore>),
    Shared(Box<SharedStore>),
}

impl DeadLetters {
    /// The store that goes with `queue`: SQLite in `data_dir` for the local log, a
    /// stream beside the shared log.
    pub async fn open(queue: &Queue, data_dir: &Path) -> anyhow::Result<DeadLetters> {
        match queue {
            Queue::Local(_) => DeadLetters::open_local(data_dir),
            Queue::Nats(shared) => DeadLetters::open_shared(shared).await,
        }
    }

    /// The store `config` names, for the command line: the local one in
    /// `server.data_dir`, or the shared one (connecting to NATS).
    pub async fn for_config(config: &Config) -> anyhow::Result<DeadLetters> {
        match config.queue.backend {
            QueueBackend::Local => DeadLetters::open_local(&config.server.data_dir),
            QueueBackend::Nats => {
                let queue =
                    NatsQueue::connect(&config.queue, config.server.max_queue_bytes).await?;
                DeadLetters::open_shared(&queue).await
            }
        }
    }

    pub fn open_local(data_dir: &Path) -> anyhow::Result<DeadLetters> {
        let store = SqliteStore::open(data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the dead-letter store in {}: {e}",
                data_dir.display()
            )
        })?;
        Ok(DeadLetters::Local(Arc::new(store)))
    }

    pub async fn open_shared(queue: &NatsQueue) -> anyhow::Result<DeadLetters> {
        Ok(DeadLetters::Shared(Box::new(
            SharedStore::open(queue.clone()).await?,
        )))
    }

    /// Stores one batch's failures at once: `new` dead letters, and replayed local rows
    /// that failed `again` (the shared store has none: its replays come back through the
    /// queue as new messages).
    pub async fn record(
        &self,
        destination: &str,
        new: &[NewLetter],
        again: &[(i64, Arc<Failure>)],
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        match self {
            DeadLetters::Local(store) => {
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
                .await
            }
            DeadLetters::Shared(store) => store.record(destination, new, at).await,
        }
    }

    /// Dead letters of `destination` (all destinations when `None`), oldest first.
    pub async fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        match self {
            DeadLetters::Local(store) => {
                let (store, destination) = (store.clone(), destination.map(str::to_string));
                blocking(move || store.list(destination.as_deref(), limit)).await
            }
            DeadLetters::Shared(store) => store.list(destination, limit).await,
        }
    }

    pub async fn count(&self, destination: &str) -> anyhow::Result<u64> {
        match self {
            DeadLetters::Local(store) => {
                let (store, destination) = (store.clone(), destination.to_string());
                blocking(move || store.count(&destination)).await
            }
            DeadLetters::Shared(store) => store.count(destination).await,
        }
    }

    /// Sends every dead letter of `destination` again; returns how many. The local store
    /// marks them for its running engine; the shared store puts them back on the stream,
    /// for whichever instance delivers that destination.
    pub async fn request_replay(&self, destination: &str) -> anyhow::Result<usize> {
        match self {
            DeadLetters::Local(store) => {
                let (store, destination) = (store.clone(), destination.to_string());
                blocking(move || store.request_replay(&destination)).await
            }
            DeadLetters::Shared(store) => store.request_replay(destination).await,
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
        match self {
            DeadLetters::Local(store) => {
                let (store, destination) = (store.clone(), destination.to_string());
                blocking(move || store.marked(&destination, after, limit)).await
            }
            DeadLetters::Shared(_) => Ok(Vec::new()),
        }
    }

    /// Whether replays arrive by `marked` (else they come through the queue).
    pub fn polled(&self) -> bool {
        matches!(self, DeadLetters::Local(_))
    }

    /// Removes letters: replayed rows that were delivered, blocked messages taken in again.
    pub async fn remove(&self, ids: Vec<i64>) -> anyhow::Result<()> {
        match self {
            DeadLetters::Local(store) => {
                let store = store.clone();
                blocking(move || store.remove(&ids)).await
            }
            DeadLetters::Shared(store) => store.remove(&ids).await,
        }
    }

    /// The dead letter with this id, if any.
    pub async fn get(&self, id: i64) -> anyhow::Result<Option<DeadLetter>> {
        match self {
            DeadLetters::Local(store) => {
                let store = store.clone();
                blocking(move || store.get(id)).await
            }
            DeadLetters::Shared(store) => store.get(id).await,
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
