//! How far one destination has come: the queue messages it read and has not settled,
//! and when to record that, at most every `COMMIT_INTERVAL` and only after the
//! destination made what it records durable (a file destination syncs first). What is
//! recorded (a cursor, acknowledgements) is the queue's business (`queue::Feed`).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::context::DeliveryContext;
use crate::metrics::DestinationGauges;
use crate::queue::{Feed, Place, Record};
use crate::throttle::LogThrottle;

/// Cursor saves are spaced at least this far apart; a crash re-sends at most this much
/// more (the file destination cuts back to the saved mark, so it still holds each once).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

pub struct Progress {
    /// Where the messages come from and progress is recorded; out while a read runs.
    feed: Option<Feed>,
    /// Accepted-at time (Unix seconds) and place of every queue message read and not
    /// settled, by sequence number.
    unsettled: BTreeMap<u64, (u32, Place)>,
    next_seq: u64,
    last_save: Instant,
    /// Saves failed in a row, and how often that is logged.
    save_failures: u64,
    save_log: LogThrottle,
    /// What `/metrics` shows of `unsettled`.
    gauges: DestinationGauges,
}

impl Progress {
    pub fn new(feed: Feed, gauges: DestinationGauges) -> Progress {
        Progress {
            feed: Some(feed),
            unsettled: BTreeMap::new(),
            next_seq: 0,
            last_save: Instant::now(),
            save_failures: 0,
            save_log: LogThrottle::new(Duration::from_secs(10)),
            gauges,
        }
    }

    fn feed(&self) -> &Feed {
        self.feed
            .as_ref()
            .expect("the feed is back after each read")
    }

    fn feed_mut(&mut self) -> &mut Feed {
        self.feed
            .as_mut()
            .expect("the feed is back after each read")
    }

    /// Waits until there is something to read. False when nothing more will come.
    pub async fn wait_for_data(&mut self) -> bool {
        self.feed_mut().wait_for_data().await
    }

    /// Whether more is there to read right now.
    pub fn has_more(&self) -> bool {
        self.feed().has_more()
    }

    /// Reads up to `max_records` or about `max_bytes` from the queue.
    pub async fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<Record>> {
        let feed = self.feed.take().expect("the feed is back after each read");
        let (feed, read) = feed.read(max_records, max_bytes).await;
        self.feed = Some(feed);
        read
    }

    /// A message read from the queue, to be settled later; returns its sequence number.
    pub fn read(&mut self, place: Place, accepted_at: u32) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unsettled.insert(seq, (accepted_at, place));
        seq
    }

    /// A message passed over (not for this destination): settled as it is read.
    pub fn pass(&mut self, place: Place) {
        self.feed_mut().settle(place);
    }

    /// The message `seq` is delivered or durably dead-lettered.
    pub fn settled(&mut self, seq: u64) {
        if let Some((_, place)) = self.unsettled.remove(&seq) {
            self.feed_mut().settle(place);
        }
    }

    /// The destination's mark after a successful send.
    pub fn set_mark(&mut self, mark: u64) {
        self.feed_mut().set_mark(mark);
    }

    fn oldest(&self) -> Option<Place> {
        self.unsettled
            .first_key_value()
            .map(|(_, &(_, place))| place)
    }

    /// Where the local log's cursor may move now.
    #[cfg(test)]
    fn checkpoint(&self) -> Option<crate::queue::Checkpoint> {
        self.feed().checkpoint(self.oldest())
    }

    /// Takes the current progress as the one to record; true when it moved.
    pub fn note(&mut self) -> bool {
        let oldest = self.oldest();
        self.feed_mut().note(oldest)
    }

    /// Whether noted progress waits to be recorded.
    pub fn has_unsaved(&self) -> bool {
        self.feed().has_unsaved()
    }

    /// When the next save is due, if one waits.
    pub fn save_at(&self) -> Option<Instant> {
        self.has_unsaved()
            .then_some(self.last_save + COMMIT_INTERVAL)
    }

    /// Whether a save now would be at least `COMMIT_INTERVAL` after the last one.
    pub fn save_due(&self) -> bool {
        self.last_save.elapsed() >= COMMIT_INTERVAL
    }

    /// Records the noted progress, after the destination's `flush`; on failure it stays
    /// noted (delivered messages past the old cursor would be sent again after a restart)
    /// and is tried again at the next `save_at`.
    pub async fn save(&mut self, context: &Arc<DeliveryContext>) {
        if !self.has_unsaved() {
            return;
        }
        self.last_save = Instant::now();
        let sink = context.clone();
        let saved = self.feed_mut().save(move || sink.destination.flush()).await;
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

    /// At stop: the shared log's messages read and not settled go back.
    pub async fn close(&mut self) {
        if let Some(feed) = self.feed.take() {
            feed.close().await;
        }
    }

    /// Shows the unsettled messages in `/metrics`: how many, and the oldest's age.
    pub fn report(&self) {
        let oldest = self.unsettled.first_key_value().map(|(_, &(at, _))| at);
        self.gauges.set(self.unsettled.len(), oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Checkpoint, LocalQueue};

    /// The place of a local-log record that ends at `end`, read next.
    fn at(p: &mut Progress, end: u64) -> Place {
        p.feed_mut().log_place(end)
    }

    fn progress(dir: &std::path::Path) -> Progress {
        let (queue, _writer) =
            LocalQueue::open(dir, 1 << 20, 1 << 30, crate::clock::Clock::system()).unwrap();
        let (reader, cursor, _) = queue.subscribe("d").unwrap();
        crate::metrics::install();
        let saved = Checkpoint {
            position: 100,
            sink_offset: 7,
            sink_id: 3,
        };
        let feed = Feed::log(Box::new(reader), cursor, 100, saved);
        Progress::new(
            feed,
            DestinationGauges::register("d", crate::clock::Clock::system()),
        )
    }

    #[test]
    fn the_cursor_stops_at_the_oldest_unsettled_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = progress(dir.path());
        assert!(!p.note(), "nothing moved yet");
        let place = at(&mut p, 110);
        let a = p.read(place, 1);
        let place = at(&mut p, 120);
        let b = p.read(place, 1);
        let place = at(&mut p, 130);
        p.pass(place);
        let place = at(&mut p, 140);
        let c = p.read(place, 1);
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
        let place = at(&mut p, 110);
        let seq = p.read(place, 1);
        p.settled(seq);
        p.note();
        let due = p.save_at().unwrap();
        assert_eq!(due, p.last_save + COMMIT_INTERVAL);
        assert!(!p.save_due());
        tokio::time::sleep(COMMIT_INTERVAL).await;
        assert!(p.save_due());
    }
}
