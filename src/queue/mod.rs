//! Stage 5: the durability point, one seam with two backends. Ingest appends a request's
//! messages and answers only once they are stored; each destination reads from its own
//! position, settles what it delivered, and checkpoints. `local` is a segment log in
//! `server.data_dir` (one machine); `nats` is a JetStream stream shared by every instance
//! pointed at it (`[queue] backend = "nats"`). Both store the same framed records
//! (`record.rs`).

mod failing;
pub mod local;
pub mod nats;
pub mod record;

use std::io;

pub use local::{saved_checkpoint, Checkpoint, Cursor, LocalQueue, QueueReader, QueueWriter};
pub use nats::{Acks, Delivery, Handback, NatsQueue, StreamFeed};
pub use record::RecordBatch;

use crate::message::Tag;

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

/// The queue ingest appends to and destinations read from. Cheap to clone.
#[derive(Clone)]
pub enum Queue {
    Local(LocalQueue),
    Nats(NatsQueue),
}

/// One message read back from the queue.
#[derive(Debug)]
pub struct Record {
    pub source: String,
    pub tag: Tag,
    pub json: Vec<u8>,
    /// What settles it once it is delivered.
    pub receipt: Receipt,
    /// When it is a dead letter sent again through the shared log: its earlier attempts.
    pub earlier: Option<Earlier>,
    /// Delivered already (a bounded replay passes over it): settled without sending.
    pub passed: bool,
}

/// A replayed dead letter's history, carried with it so that failing again adds up.
#[derive(Debug, Clone, Copy)]
pub struct Earlier {
    pub attempts: u32,
    pub first_attempt_at: chrono::DateTime<chrono::Utc>,
}

/// How a record read is settled: the backend's own handle.
#[derive(Debug)]
pub enum Receipt {
    /// The local log position just past the record: a cursor saved there has consumed it.
    Log { end: u64 },
    /// A delivery from the shared log, acknowledged once settled.
    Stream(Delivery),
}

/// A destination attached to the queue: where it reads, and how it records progress.
pub enum Subscription {
    Log {
        reader: QueueReader,
        cursor: Cursor,
        /// The checkpoint it saved last time, if any.
        saved: Option<Checkpoint>,
    },
    Stream {
        feed: Box<StreamFeed>,
        acks: Box<Acks>,
    },
}

/// Where a destination's engine reads messages from.
pub enum Feed {
    Log(QueueReader),
    Stream(Box<StreamFeed>),
}

impl Feed {
    /// Waits until there is something to read. False when nothing more will come.
    pub async fn wait_for_data(&mut self) -> bool {
        match self {
            Feed::Log(reader) => reader.wait_for_data().await,
            Feed::Stream(feed) => feed.wait_for_data().await,
        }
    }

    /// Whether more is there to read right now.
    pub fn has_more(&self) -> bool {
        match self {
            Feed::Log(reader) => reader.lag() > 0,
            Feed::Stream(feed) => feed.has_more(),
        }
    }

    /// Reads up to `max_records` or about `max_bytes`. Near the end of the log (what was
    /// just written, in the page cache) the log is read in place: a blocking-pool hand-off
    /// costs more than the copy. Further back it is read on a blocking thread, so the
    /// feed is handed over and comes back with what was read.
    pub async fn read(
        self,
        max_records: usize,
        max_bytes: usize,
    ) -> (Feed, io::Result<Vec<Record>>) {
        /// Unread bytes below which the reader is taken to be reading cached data.
        const READ_IN_PLACE: u64 = 4 * 1024 * 1024;
        match self {
            Feed::Log(mut reader) if reader.lag() <= READ_IN_PLACE => {
                let records = reader.read_batch(max_records, max_bytes);
                (Feed::Log(reader), records)
            }
            Feed::Log(mut reader) => {
                let (reader, records) = tokio::task::spawn_blocking(move || {
                    let records = reader.read_batch(max_records, max_bytes);
                    (reader, records)
                })
                .await
                .expect("queue read task panicked");
                (Feed::Log(reader), records)
            }
            Feed::Stream(mut feed) => {
                let records = feed.read(max_records, max_bytes);
                (Feed::Stream(feed), Ok(records))
            }
        }
    }

    /// Stops reading. The messages read and not settled go back to the shared log for
    /// whichever instance delivers next.
    pub async fn close(self, handback: Handback) {
        match self {
            Feed::Log(_) => {}
            Feed::Stream(feed) => feed.close(handback).await,
        }
    }
}

impl Queue {
    /// Stores a request's messages: returns once every one of them is durable.
    pub async fn append(&self, batch: RecordBatch) -> Result<(), QueueError> {
        match self {
            Queue::Local(queue) => queue.append(batch).await,
            Queue::Nats(queue) => queue.append(batch).await,
        }
    }

    /// Whether ingest can store now, and if not, why (for `/ready`).
    pub fn readiness(&self) -> Result<(), String> {
        match self {
            Queue::Local(queue) => queue.readiness(),
            Queue::Nats(queue) => queue.readiness(),
        }
    }

    /// Attaches the destination `name` at its saved position (a new one starts with
    /// what is accepted from now on).
    pub async fn subscribe(&self, name: &str) -> anyhow::Result<Subscription> {
        match self {
            Queue::Local(queue) => {
                let (reader, cursor, saved) = queue.subscribe(name)?;
                Ok(Subscription::Log {
                    reader,
                    cursor,
                    saved,
                })
            }
            Queue::Nats(queue) => {
                let (feed, acks) = queue.subscribe(name).await?;
                Ok(Subscription::Stream {
                    feed: Box::new(feed),
                    acks: Box::new(acks),
                })
            }
        }
    }

    /// Every destination the queue keeps messages for, configured or not: a removed
    /// one keeps its part until it is purged.
    pub async fn held_for(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Queue::Local(queue) => Ok(queue.cursor_names()),
            Queue::Nats(queue) => queue.destinations().await,
        }
    }

    /// Forgets a destination that no longer runs, and frees what only it was holding.
    pub async fn purge(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Queue::Local(queue) => {
                let queue = queue.clone();
                let name = name.to_string();
                tokio::task::spawn_blocking(move || queue.purge(&name)).await??;
                Ok(())
            }
            Queue::Nats(queue) => queue.purge(name).await,
        }
    }

    /// Bytes of the local log behind a destination's cursor (on the shared log, its
    /// consumers' gauges say what is pending).
    pub fn lag_bytes(&self, name: &str) -> Option<u64> {
        match self {
            Queue::Local(queue) => queue.lag_bytes(name),
            Queue::Nats(_) => None,
        }
    }

    /// For `/metrics`: bytes held, and each destination's lag.
    pub fn state(&self) -> (u64, Vec<(String, u64)>) {
        match self {
            Queue::Local(queue) => {
                let lags = queue
                    .cursor_names()
                    .into_iter()
                    .filter_map(|name| queue.lag_bytes(&name).map(|lag| (name, lag)))
                    .collect();
                (queue.held_bytes(), lags)
            }
            Queue::Nats(queue) => (queue.held_bytes(), Vec::new()),
        }
    }
}
