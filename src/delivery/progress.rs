//! How far one destination has come: the queue messages it read and has not settled,
//! and the checkpoint to save. The cursor may move to the start of the oldest message not
//! yet settled (delivered or dead-lettered), or past everything read when none is left.
//! It is saved at most every `COMMIT_INTERVAL`, and only after the destination made
//! what it passes durable (a file destination syncs first).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::batch::DeliveryContext;
use crate::metrics::DestinationGauges;
use crate::queue::{Checkpoint, Cursor};
use crate::throttle::LogThrottle;

/// Cursor saves are spaced at least this far apart; a crash re-sends at most this much
/// more (the file destination cuts back to the saved mark, so it still holds each once).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

pub struct Progress {
    /// Start position and accepted-at time (Unix seconds) of every queue message read
    /// and not settled, by sequence number.
    unsettled: BTreeMap<u64, (u64, u32)>,
    /// End of the last record read.
    read_end: u64,
    next_seq: u64,
    /// The destination's own mark (a file's length) after its last successful send.
    mark: u64,
    /// The checkpoint last noted, and what of it is not saved yet.
    recorded: Checkpoint,
    unsaved: Option<Checkpoint>,
    last_save: Instant,
    /// Out while a save runs on a blocking thread.
    cursor: Option<Cursor>,
    /// Saves failed in a row, and how often that is logged.
    save_failures: u64,
    save_log: LogThrottle,
    /// What `/metrics` shows of `unsettled`.
    gauges: DestinationGauges,
}

impl Progress {
    /// Starting at `read_end` (where the reader is), from the `saved` checkpoint.
    pub fn new(
        read_end: u64,
        saved: Checkpoint,
        cursor: Cursor,
        gauges: DestinationGauges,
    ) -> Progress {
        Progress {
            unsettled: BTreeMap::new(),
            read_end,
            next_seq: 0,
            mark: saved.sink_offset,
            recorded: Checkpoint {
                position: read_end,
                ..saved
            },
            unsaved: None,
            last_save: Instant::now(),
            cursor: Some(cursor),
            save_failures: 0,
            save_log: LogThrottle::new(Duration::from_secs(10)),
            gauges,
        }
    }

    /// The checkpoint it starts from is not saved yet: save it as soon as it can.
    pub fn save_soon(&mut self) {
        self.unsaved = Some(self.recorded);
    }

    /// A message read from the queue, ending at `end`, to be settled later; returns its
    /// sequence number.
    pub fn read(&mut self, end: u64, accepted_at: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unsettled.insert(seq, (self.read_end, accepted_at));
        self.read_end = end;
        seq
    }

    /// A message passed over (not for this destination): settled as it is read.
    pub fn pass(&mut self, end: u64) {
        self.read_end = end;
    }

    /// The message `seq` is delivered or durably dead-lettered.
    pub fn settled(&mut self, seq: u64) {
        self.unsettled.remove(&seq);
    }

    /// The destination's mark after a successful send.
    pub fn set_mark(&mut self, mark: u64) {
        self.mark = mark;
    }

    /// Where the cursor may move now.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self
                .unsettled
                .first_key_value()
                .map_or(self.read_end, |(_, &(start, _))| start),
            sink_offset: self.mark,
            sink_id: self.recorded.sink_id,
        }
    }

    /// Takes the current checkpoint as the one to save; true when it moved.
    pub fn note(&mut self) -> bool {
        let now = self.checkpoint();
        if now == self.recorded {
            return false;
        }
        self.recorded = now;
        self.unsaved = Some(now);
        true
    }

    /// Whether a noted checkpoint waits to be saved.
    pub fn has_unsaved(&self) -> bool {
        self.unsaved.is_some()
    }

    /// When the next save is due, if one waits.
    pub fn save_at(&self) -> Option<Instant> {
        self.unsaved.map(|_| self.last_save + COMMIT_INTERVAL)
    }

    /// Whether a save now would be at least `COMMIT_INTERVAL` after the last one.
    pub fn save_due(&self) -> bool {
        self.last_save.elapsed() >= COMMIT_INTERVAL
    }

    /// Saves the noted checkpoint, after the destination's `flush`; on failure it stays
    /// noted (delivered messages past the old cursor would be sent again after a restart)
    /// and is tried again at the next `save_at`.
    pub async fn save(&mut self, context: &Arc<DeliveryContext>) {
        let Some(checkpoint) = self.unsaved.take() else {
            return;
        };
        self.last_save = Instant::now();
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
                        "cannot save the cursor; retrying"
                    );
                }
                self.unsaved.get_or_insert(checkpoint);
            }
        }
    }

    /// Shows the unsettled messages in `/metrics`: how many, and the oldest's age.
    pub fn report(&self) {
        let oldest = self.unsettled.first_key_value().map(|(_, &(_, at))| at);
        self.gauges.set(self.unsettled.len(), oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Queue;

    fn progress(dir: &std::path::Path) -> Progress {
        let (queue, _writer) = Queue::open(dir, 1 << 20, 1 << 30).unwrap();
        let (_, cursor, _) = queue.subscribe("d").unwrap();
        crate::metrics::install();
        let saved = Checkpoint {
            position: 100,
            sink_offset: 7,
            sink_id: 3,
        };
        Progress::new(100, saved, cursor, DestinationGauges::register("d"))
    }

    #[test]
    fn the_cursor_stops_at_the_oldest_unsettled_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = progress(dir.path());
        assert!(!p.note(), "nothing moved yet");
        let a = p.read(110, 1);
        let b = p.read(120, 1);
        p.pass(130);
        let c = p.read(140, 1);
        assert_eq!(p.checkpoint().position, 100, "`a` is not settled");
        p.settled(b);
        assert_eq!(
            p.checkpoint().position,
            100,
            "`b` settled, `a` still holds it"
        );
        p.settled(a);
        assert_eq!(
            p.checkpoint().position,
            130,
            "up to `c`, past the passed message"
        );
        assert!(p.note());
        assert!(p.has_unsaved());
        p.settled(c);
        assert_eq!(p.checkpoint().position, 140, "everything read is settled");
        assert_eq!((p.checkpoint().sink_offset, p.checkpoint().sink_id), (7, 3));
        p.set_mark(9);
        assert_eq!(p.checkpoint().sink_offset, 9);
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
        let seq = p.read(110, 1);
        p.settled(seq);
        p.note();
        let due = p.save_at().unwrap();
        assert_eq!(due, p.last_save + COMMIT_INTERVAL);
        assert!(!p.save_due());
        tokio::time::sleep(COMMIT_INTERVAL).await;
        assert!(p.save_due());
    }
}
