//! How far one destination has come: the queue messages it read and has not settled,
//! and what to record of that, at most every `COMMIT_INTERVAL` and only after the
//! destination made what it records durable (a file destination syncs first).
//!
//! On the local log, the cursor may move to the start of the oldest message not yet
//! settled (delivered or dead-lettered), or past everything read when none is left. On
//! the shared log, each settled message is acknowledged, and held ones are kept alive
//! with progress signals (`queue::nats::Acks`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::batch::DeliveryContext;
use crate::metrics::DestinationGauges;
use crate::queue::nats::DeliveryKey;
use crate::queue::{Acks, Checkpoint, Cursor, Handback, Receipt};
use crate::throttle::LogThrottle;

/// Cursor saves are spaced at least this far apart; a crash re-sends at most this much
/// more (the file destination cuts back to the saved mark, so it still holds each once).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

pub struct Progress {
    /// Accepted-at time (Unix seconds) and place of every queue message read and not
    /// settled, by sequence number.
    unsettled: BTreeMap<u64, (u32, Place)>,
    next_seq: u64,
    ledger: Ledger,
    last_save: Instant,
    /// Saves failed in a row, and how often that is logged.
    save_failures: u64,
    save_log: LogThrottle,
    /// What `/metrics` shows of `unsettled`.
    gauges: DestinationGauges,
}

/// Where a message read is: its start in the local log, or its delivery from the
/// shared log.
#[derive(Debug, Clone, Copy)]
enum Place {
    Log(u64),
    Stream(DeliveryKey),
}

/// How progress is recorded: a checkpoint saved in a cursor file, or acknowledgements.
enum Ledger {
    Log(LogLedger),
    Stream(Box<Acks>),
}

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

impl Progress {
    /// On the local log: starting at `read_end` (where the reader is), from the `saved`
    /// checkpoint.
    pub fn log(
        read_end: u64,
        saved: Checkpoint,
        cursor: Cursor,
        gauges: DestinationGauges,
    ) -> Progress {
        Progress::new(
            Ledger::Log(LogLedger {
                read_end,
                mark: saved.sink_offset,
                recorded: Checkpoint {
                    position: read_end,
                    ..saved
                },
                unsaved: None,
                cursor: Some(cursor),
            }),
            gauges,
        )
    }

    /// On the shared log.
    pub fn stream(acks: Box<Acks>, gauges: DestinationGauges) -> Progress {
        Progress::new(Ledger::Stream(acks), gauges)
    }

    fn new(ledger: Ledger, gauges: DestinationGauges) -> Progress {
        Progress {
            unsettled: BTreeMap::new(),
            next_seq: 0,
            ledger,
            last_save: Instant::now(),
            save_failures: 0,
            save_log: LogThrottle::new(Duration::from_secs(10)),
            gauges,
        }
    }

    /// The checkpoint it starts from is not saved yet: save it as soon as it can.
    pub fn save_soon(&mut self) {
        if let Ledger::Log(log) = &mut self.ledger {
            log.unsaved = Some(log.recorded);
        }
    }

    /// A message read from the queue, to be settled later; returns its sequence number.
    /// `None` when the queue delivered a message again that is still held here.
    pub fn read(&mut self, receipt: Receipt, accepted_at: u32) -> Option<u64> {
        let seq = self.next_seq;
        let place = match (&mut self.ledger, receipt) {
            (Ledger::Log(log), Receipt::Log { end }) => {
                Place::Log(std::mem::replace(&mut log.read_end, end))
            }
            (Ledger::Stream(acks), Receipt::Stream(delivery)) => {
                Place::Stream(acks.read(delivery)?)
            }
            _ => unreachable!("a feed's receipts are its own ledger's"),
        };
        self.next_seq += 1;
        self.unsettled.insert(seq, (accepted_at, place));
        Some(seq)
    }

    /// A message passed over (not for this destination): settled as it is read.
    pub fn pass(&mut self, receipt: Receipt) {
        match (&mut self.ledger, receipt) {
            (Ledger::Log(log), Receipt::Log { end }) => log.read_end = end,
            (Ledger::Stream(acks), Receipt::Stream(delivery)) => {
                if let Some(key) = acks.read(delivery) {
                    acks.settle(key);
                }
            }
            _ => unreachable!("a feed's receipts are its own ledger's"),
        }
    }

    /// The message `seq` is delivered or durably dead-lettered.
    pub fn settled(&mut self, seq: u64) {
        let place = self.unsettled.remove(&seq).map(|(_, place)| place);
        if let (Some(Place::Stream(key)), Ledger::Stream(acks)) = (place, &mut self.ledger) {
            acks.settle(key);
        }
    }

    /// The destination's mark after a successful send.
    pub fn set_mark(&mut self, mark: u64) {
        if let Ledger::Log(log) = &mut self.ledger {
            log.mark = mark;
        }
    }

    /// Where the local log's cursor may move now.
    fn checkpoint(&self) -> Option<Checkpoint> {
        match &self.ledger {
            Ledger::Log(log) => Some(Checkpoint {
                position: match self.unsettled.first_key_value() {
                    Some((_, &(_, Place::Log(start)))) => start,
                    _ => log.read_end,
                },
                sink_offset: log.mark,
                sink_id: log.recorded.sink_id,
            }),
            Ledger::Stream(_) => None,
        }
    }

    /// Takes the current progress as the one to record; true when it moved.
    pub fn note(&mut self) -> bool {
        let checkpoint = self.checkpoint();
        match (&mut self.ledger, checkpoint) {
            (Ledger::Log(log), Some(now)) => {
                if now == log.recorded {
                    return false;
                }
                log.recorded = now;
                log.unsaved = Some(now);
                true
            }
            (Ledger::Log(_), None) => false,
            (Ledger::Stream(acks), _) => acks.has_unsaved(),
        }
    }

    /// Whether noted progress waits to be recorded.
    pub fn has_unsaved(&self) -> bool {
        match &self.ledger {
            Ledger::Log(log) => log.unsaved.is_some(),
            Ledger::Stream(acks) => acks.has_unsaved(),
        }
    }

    /// When the next save is due, if one waits (or held messages need their progress
    /// signal on the shared log).
    pub fn save_at(&self) -> Option<Instant> {
        let save = self
            .has_unsaved()
            .then_some(self.last_save + COMMIT_INTERVAL);
        let ping = match &self.ledger {
            Ledger::Stream(acks) => acks.ping_at(),
            Ledger::Log(_) => None,
        };
        save.into_iter().chain(ping).min()
    }

    /// Whether a save now would be at least `COMMIT_INTERVAL` after the last one.
    pub fn save_due(&self) -> bool {
        self.last_save.elapsed() >= COMMIT_INTERVAL
    }

    /// Records the noted progress, after the destination's `flush`; on failure it stays
    /// noted (delivered messages past the old cursor would be sent again after a restart)
    /// and is tried again at the next `save_at`.
    pub async fn save(&mut self, context: &Arc<DeliveryContext>) {
        if let Ledger::Stream(acks) = &mut self.ledger {
            acks.ping_if_due().await;
        }
        if !self.has_unsaved() {
            return;
        }
        self.last_save = Instant::now();
        let saved = match &mut self.ledger {
            Ledger::Log(log) => log.save(context).await,
            Ledger::Stream(acks) => acknowledge(acks, context).await,
        };
        match saved {
            Ok(()) => self.save_failures = 0,
            Err(e) => {
                self.save_failures += 1;
                // Tried again every COMMIT_INTERVAL: logged when it starts, then seldom.
                if self.save_failures == 1 || self.save_log.ready() {
                    tracing::error!(
                        destination = %context.name,
                        error = %e,
                        failures = self.save_failures,
                        "cannot record delivery progress (cursor or acks); retrying"
                    );
                }
            }
        }
    }

    /// At stop: the shared log's messages read and not settled, to be given back.
    pub fn release(&mut self) -> Handback {
        match &mut self.ledger {
            Ledger::Stream(acks) => acks.release(),
            Ledger::Log(_) => Handback::default(),
        }
    }

    /// Shows the unsettled messages in `/metrics`: how many, and the oldest's age.
    pub fn report(&self) {
        let oldest = self.unsettled.first_key_value().map(|(_, &(at, _))| at);
        self.gauges.set(self.unsettled.len(), oldest);
    }
}

/// Acknowledges what is settled, once the destination made it durable.
async fn acknowledge(acks: &mut Acks, context: &Arc<DeliveryContext>) -> std::io::Result<()> {
    let sink = context.clone();
    tokio::task::spawn_blocking(move || sink.destination.flush())
        .await
        .expect("flush task panicked")?;
    acks.commit().await.map_err(std::io::Error::other)
}

impl LogLedger {
    async fn save(&mut self, context: &Arc<DeliveryContext>) -> std::io::Result<()> {
        let Some(checkpoint) = self.unsaved.take() else {
            return Ok(());
        };
        let mut cursor = self.cursor.take().expect("cursor is back after each save");
        let sink = context.clone();
        let (cursor, saved) = tokio::task::spawn_blocking(move || {
            // What the cursor passes must be durable at the destination first.
            let saved = sink
                .destination
                .flush()
                .and_then(|()| cursor.commit(checkpoint));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::LocalQueue;

    fn at(end: u64) -> Receipt {
        Receipt::Log { end }
    }

    fn progress(dir: &std::path::Path) -> Progress {
        let (queue, _writer) =
            LocalQueue::open(dir, 1 << 20, 1 << 30, crate::clock::Clock::system()).unwrap();
        let (_, cursor, _) = queue.subscribe("d").unwrap();
        crate::metrics::install();
        let saved = Checkpoint {
            position: 100,
            sink_offset: 7,
            sink_id: 3,
        };
        Progress::log(
            100,
            saved,
            cursor,
            DestinationGauges::register("d", crate::clock::Clock::system()),
        )
    }

    #[test]
    fn the_cursor_stops_at_the_oldest_unsettled_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = progress(dir.path());
        assert!(!p.note(), "nothing moved yet");
        let a = p.read(at(110), 1).unwrap();
        let b = p.read(at(120), 1).unwrap();
        p.pass(at(130));
        let c = p.read(at(140), 1).unwrap();
        assert_eq!(p.checkpoint().unwrap().position, 100, "`a` is not settled");
        p.settled(b);
        assert_eq!(
            p.checkpoint().unwrap().position,
            100,
            "`b` settled, `a` still holds it"
        );
        p.settled(a);
        assert_eq!(
            p.checkpoint().unwrap().position,
            130,
            "up to `c`, past the passed message"
        );
        assert!(p.note());
        assert!(p.has_unsaved());
        p.settled(c);
        assert_eq!(
            p.checkpoint().unwrap().position,
            140,
            "everything read is settled"
        );
        assert_eq!(
            (
                p.checkpoint().unwrap().sink_offset,
                p.checkpoint().unwrap().sink_id
            ),
            (7, 3)
        );
        p.set_mark(9);
        assert_eq!(p.checkpoint().unwrap().sink_offset, 9);
    }

    #[test]
    fn a_moved_mark_alone_is_worth_saving() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = progress(dir.path());
        p.set_mark(8);
        assert!(
            p.note(),
            "a replay grows a file without moving the position"
        );
        assert!(!p.note(), "noted once");
    }

    #[tokio::test(start_paused = true)]
    async fn saves_are_spaced_by_the_commit_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = progress(dir.path());
        assert_eq!(p.save_at(), None);
        let seq = p.read(at(110), 1).unwrap();
        p.settled(seq);
        p.note();
        let due = p.save_at().unwrap();
        assert_eq!(due, p.last_save + COMMIT_INTERVAL);
        assert!(!p.save_due());
        tokio::time::sleep(COMMIT_INTERVAL).await;
        assert!(p.save_due());
    }
}
