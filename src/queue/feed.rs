//! One destination's reading of the queue, whichever the backend: where it reads, and how
//! it records what it settled. The two are made together and kept in one value, and each
//! record is entered in its backend's ledger as it is read, so a record's place always
//! belongs to the ledger that gave it.
//!
//! On the local log, the cursor may move to the start of the oldest message not yet
//! settled, or past everything read when none is left. On the shared log, each settled
//! message is acknowledged (`nats::Acks`); the feed keeps held ones alive by itself.

use std::io;

use super::local::{Checkpoint, Cursor, LocalQueue, QueueReader};
use super::nats::{Acks, DeliveryKey, StreamFeed};
use super::Record;

/// Where a message read is, to settle it by: its start in the local log, or its delivery
/// from the shared log.
#[derive(Debug, Clone, Copy)]
pub struct Place(At);

#[derive(Debug, Clone, Copy)]
enum At {
    Log(u64),
    Stream(DeliveryKey),
}

/// A destination attached to the queue, before it starts reading: on the local log, with
/// the checkpoint it saved last time.
pub struct Subscription {
    pub(super) name: String,
    pub(super) kind: Attached,
}

pub(super) enum Attached {
    Log {
        reader: Box<QueueReader>,
        cursor: Cursor,
        saved: Option<Checkpoint>,
        /// Holds a bounded replay's end, taken once the destination starts.
        log: LocalQueue,
    },
    Stream {
        feed: Box<StreamFeed>,
        acks: Box<Acks>,
    },
}

/// Reads a destination's messages from the queue and records its progress.
pub struct Feed(Kind);

enum Kind {
    Log {
        reader: Box<QueueReader>,
        ledger: LogLedger,
    },
    Stream {
        feed: Box<StreamFeed>,
        acks: Box<Acks>,
    },
}

/// Progress on the local log: a checkpoint saved in the destination's cursor file.
struct LogLedger {
    /// End of the last record read.
    read_end: u64,
    /// The destination's own mark (a file's length) after its last successful send.
    mark: u64,
    /// The checkpoint last noted, and what of it is not saved yet.
    recorded: Checkpoint,
    unsaved: Option<Checkpoint>,
    /// Out while a save runs on a blocking thread.
    cursor: Option<Cursor>,
}

impl Subscription {
    /// The checkpoint the destination saved last time; the shared log keeps none (a
    /// destination's outputs are its own there: a file destination is at-least-once).
    pub fn saved(&self) -> Option<Checkpoint> {
        match &self.kind {
            Attached::Log { saved, .. } => *saved,
            Attached::Stream { .. } => None,
        }
    }

    /// Starts reading, for a destination whose output is `sink_id` and stands at `mark`.
    /// On the local log, a new destination, or a mark that measures another output (the
    /// path or the kind changed), starts from where its cursor is (or the log's end) and
    /// saves that at once.
    pub fn start(self, mark: impl FnOnce() -> u64, sink_id: u64) -> Feed {
        let (mut reader, mut cursor, saved, log) = match self.kind {
            Attached::Stream { feed, acks } => return Feed(Kind::Stream { feed, acks }),
            Attached::Log {
                reader,
                cursor,
                saved,
                log,
            } => (reader, cursor, saved, log),
        };
        let (saved, save_soon) = match saved {
            Some(saved) if saved.sink_id == sink_id => (saved, false),
            _ => {
                let first = Checkpoint {
                    position: saved.map_or_else(|| reader.position(), |s| s.position),
                    sink_offset: mark(),
                    sink_id,
                };
                // A full disk must not keep the server from starting: it is saved as
                // soon as it can be (what arrives meanwhile is refused for the same lack
                // of space).
                let unsaved = cursor.commit(first).is_err_and(|e| {
                    tracing::warn!(destination = %self.name, error = %e,
                        "cannot save the first cursor; retrying in the background");
                    true
                });
                (first, unsaved)
            }
        };
        if let Some((until, stop_at)) = log.take_window(&self.name) {
            reader.replay_until(until, stop_at);
        }
        let read_end = reader.position();
        let mut feed = Feed::log(reader, cursor, read_end, saved);
        if save_soon {
            if let Kind::Log { ledger, .. } = &mut feed.0 {
                ledger.unsaved = Some(ledger.recorded);
            }
        }
        feed
    }
}

impl Feed {
    /// On the local log, where the reader is (`read_end`), from the `saved` checkpoint.
    pub(crate) fn log(
        reader: Box<QueueReader>,
        cursor: Cursor,
        read_end: u64,
        saved: Checkpoint,
    ) -> Feed {
        Feed(Kind::Log {
            reader,
            ledger: LogLedger {
                read_end,
                mark: saved.sink_offset,
                recorded: Checkpoint {
                    position: read_end,
                    ..saved
                },
                unsaved: None,
                cursor: Some(cursor),
            },
        })
    }

    /// Waits until there is something to read. False when nothing more will come.
    pub async fn wait_for_data(&mut self) -> bool {
        match &mut self.0 {
            Kind::Log { reader, .. } => reader.wait_for_data().await,
            Kind::Stream { feed, .. } => feed.wait_for_data().await,
        }
    }

    /// Whether more is there to read right now.
    pub fn has_more(&self) -> bool {
        match &self.0 {
            Kind::Log { reader, .. } => reader.lag() > 0,
            Kind::Stream { feed, .. } => feed.has_more(),
        }
    }

    /// Reads up to `max_records` or about `max_bytes`, each record entered as read (a
    /// message the shared log delivered again while it is still held here is left out).
    /// Near the end of the log (what was just written, in the page cache) the log is
    /// read in place: a blocking-pool hand-off costs more than the copy. Further back it
    /// is read on a blocking thread, so the feed is handed over and comes back with what
    /// was read.
    pub async fn read(
        self,
        max_records: usize,
        max_bytes: usize,
    ) -> (Feed, io::Result<Vec<Record>>) {
        /// Unread bytes below which the reader is taken to be reading cached data.
        const READ_IN_PLACE: u64 = 4 * 1024 * 1024;
        match self.0 {
            Kind::Log { reader, mut ledger } => {
                let (reader, records) = if reader.lag() <= READ_IN_PLACE {
                    let mut reader = reader;
                    let records = reader.read_batch(max_records, max_bytes);
                    (reader, records)
                } else {
                    let mut reader = reader;
                    tokio::task::spawn_blocking(move || {
                        let records = reader.read_batch(max_records, max_bytes);
                        (reader, records)
                    })
                    .await
                    .expect("queue read task panicked")
                };
                let records = records.map(|records| {
                    records
                        .into_iter()
                        .map(|record| {
                            let start = std::mem::replace(&mut ledger.read_end, record.receipt);
                            record.with_receipt(Place(At::Log(start)))
                        })
                        .collect()
                });
                (Feed(Kind::Log { reader, ledger }), records)
            }
            Kind::Stream { mut feed, mut acks } => {
                let records = feed
                    .read(max_records, max_bytes)
                    .into_iter()
                    .filter_map(|record| {
                        let key = acks.read(record.receipt.clone())?;
                        Some(record.with_receipt(Place(At::Stream(key))))
                    })
                    .collect();
                (Feed(Kind::Stream { feed, acks }), Ok(records))
            }
        }
    }

    /// The message at `place` is delivered, durably dead-lettered, or passed over.
    pub fn settle(&mut self, place: Place) {
        if let (Kind::Stream { acks, .. }, At::Stream(key)) = (&mut self.0, place.0) {
            acks.settle(key);
        }
    }

    /// The destination's mark after a successful send.
    pub fn set_mark(&mut self, mark: u64) {
        if let Kind::Log { ledger, .. } = &mut self.0 {
            ledger.mark = mark;
        }
    }

    /// Where the local log's cursor may move now, given the oldest message not settled.
    pub fn checkpoint(&self, oldest: Option<Place>) -> Option<Checkpoint> {
        match &self.0 {
            Kind::Log { ledger, .. } => Some(Checkpoint {
                position: match oldest {
                    Some(Place(At::Log(start))) => start,
                    _ => ledger.read_end,
                },
                sink_offset: ledger.mark,
                sink_id: ledger.recorded.sink_id,
            }),
            Kind::Stream { .. } => None,
        }
    }

    /// Takes the current progress as the one to record; true when it moved.
    pub fn note(&mut self, oldest: Option<Place>) -> bool {
        let checkpoint = self.checkpoint(oldest);
        match (&mut self.0, checkpoint) {
            (Kind::Log { ledger, .. }, Some(now)) => {
                if now == ledger.recorded {
                    return false;
                }
                ledger.recorded = now;
                ledger.unsaved = Some(now);
                true
            }
            (Kind::Log { .. }, None) => false,
            (Kind::Stream { acks, .. }, _) => acks.has_unsaved(),
        }
    }

    /// Whether noted progress waits to be recorded.
    pub fn has_unsaved(&self) -> bool {
        match &self.0 {
            Kind::Log { ledger, .. } => ledger.unsaved.is_some(),
            Kind::Stream { acks, .. } => acks.has_unsaved(),
        }
    }

    /// Records the noted progress once `flush` made the destination's output durable
    /// (both run on a blocking thread): saves the cursor, or acknowledges what is settled.
    /// On failure it stays noted.
    pub async fn save(
        &mut self,
        flush: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        match &mut self.0 {
            Kind::Log { ledger, .. } => ledger.save(flush).await,
            Kind::Stream { acks, .. } => {
                tokio::task::spawn_blocking(flush)
                    .await
                    .expect("flush task panicked")?;
                acks.commit().await.map_err(io::Error::other)
            }
        }
    }

    /// Stops reading. The messages read and not settled go back to the shared log for
    /// whichever instance delivers next.
    pub async fn close(self) {
        if let Kind::Stream { feed, mut acks } = self.0 {
            let held = acks.release();
            feed.close(held).await;
        }
    }

    /// A local-log place just past `end`, entered as `read` enters a record (for tests
    /// of what is built on the feed).
    #[cfg(test)]
    pub(crate) fn log_place(&mut self, end: u64) -> Place {
        match &mut self.0 {
            Kind::Log { ledger, .. } => {
                Place(At::Log(std::mem::replace(&mut ledger.read_end, end)))
            }
            Kind::Stream { .. } => panic!("not a local-log feed"),
        }
    }
}

impl LogLedger {
    async fn save(
        &mut self,
        flush: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let Some(checkpoint) = self.unsaved.take() else {
            return Ok(());
        };
        let mut cursor = self.cursor.take().expect("cursor is back after each save");
        let (cursor, saved) = tokio::task::spawn_blocking(move || {
            // What the cursor passes must be durable at the destination first.
            let saved = flush().and_then(|()| cursor.commit(checkpoint));
            (cursor, saved)
        })
        .await
        .expect("cursor task panicked");
        self.cursor = Some(cursor);
        if saved.is_err() {
            self.unsaved.get_or_insert(checkpoint);
        }
        saved
    }
}
