//! One destination's delivery loop: read the queue ahead of the cursor, group messages
//! into batches, run a bounded number of batches at once, and move the cursor to the
//! start of the oldest message not yet settled (delivered or dead-lettered).
//!
//! Ordering: each message's user (anonymousId, else userId) has messages in at most one
//! unsettled batch at a time. Waiting messages sit in per-user lines (`lines.rs`); a
//! batch takes from the lines of free users only, in queue order, so a batch that is
//! retrying holds back its own users' later messages while other users' messages keep
//! flowing. Held messages are bounded (`MAX_HELD_BYTES`); past that the destination
//! stops reading until the retrying batch settles. With `ordering = false` every message
//! is free at once. Sequential destinations (files) run one batch at a time, so their
//! order is the queue's order.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::batch::{self, BatchResult, DeliveryContext, Item, Origin, Settled};
use super::dead_letters::{DeadLetters, Failure};
use super::lines::{wire_len, Lines};
use crate::destinations::BatchLimits;
use crate::metrics::DestinationGauges;
use crate::queue::{Checkpoint, Cursor, QueueReader, Record};
use crate::routing::{user_key, Decision};

/// How often marked dead letters are looked for.
const REPLAY_POLL: Duration = Duration::from_secs(1);
/// Cursor saves are spaced at least this far apart; a crash re-sends at most this much
/// more (the file destination cuts back to the saved mark, so it still holds each once).
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
const READ_RETRY: Duration = Duration::from_secs(1);
/// Most message bytes held back behind retrying users before reading pauses.
const MAX_HELD_BYTES: usize = 16 * 1024 * 1024;

/// How a destination's messages are grouped and how many batches may be unsettled.
pub struct Shape {
    pub limits: BatchLimits,
    /// Keep each user's messages in order (see the module comment).
    pub ordering: bool,
    /// Batches unsettled at once (sending, waiting to send, or backing off).
    pub max_outstanding: usize,
}

pub struct Engine {
    context: Arc<DeliveryContext>,
    dead_letters: Arc<DeadLetters>,
    limits: BatchLimits,
    ordering: bool,
    max_outstanding: usize,
    reader: Option<QueueReader>,
    cursor: Option<Cursor>,
    stop: watch::Receiver<bool>,

    /// Read from the queue, not yet in a batch.
    lines: Lines,
    /// Dead letters marked for replay, not yet in a batch.
    replays: VecDeque<Item>,
    /// Replayed items in unsettled batches, and the highest row id taken.
    replaying: usize,
    replay_after: i64,
    next_replay_poll: Instant,
    /// Start position and accepted-at time (Unix seconds) of every queue message read
    /// and not settled, by sequence number: the cursor may move up to the first of them
    /// (or to `read_end` if there is none).
    unsettled: BTreeMap<u64, (u64, u32)>,
    /// What `/metrics` shows of `unsettled`.
    gauges: DestinationGauges,
    /// Messages not routed to this destination.
    skipped: metrics::Counter,
    /// End of the last record read.
    read_end: u64,
    next_seq: u64,
    /// Users with messages in an unsettled batch: the batch and how many.
    owners: HashMap<u64, (u64, usize)>,
    running: JoinSet<BatchResult>,
    next_batch: u64,
    /// Settled position and destination mark not yet saved, and the last recorded.
    unsaved: Option<Checkpoint>,
    recorded: Checkpoint,
    last_commit: Instant,
    /// Cursor saves failed in a row, and how often that is logged.
    save_failures: u64,
    save_log: crate::throttle::LogThrottle,
    mark: u64,
    read_again_at: Option<Instant>,
    /// When the partial batch held back for `linger` may go.
    linger_until: Option<Instant>,
    /// The stop sender is gone: behave as stopped.
    stop_closed: bool,
}

impl Engine {
    pub fn new(
        context: Arc<DeliveryContext>,
        dead_letters: Arc<DeadLetters>,
        shape: Shape,
        reader: QueueReader,
        cursor: Cursor,
        saved: Checkpoint,
    ) -> Engine {
        let stop = context.stop.clone();
        let read_end = reader.position();
        let mark = saved.sink_offset;
        crate::metrics::install();
        let gauges = DestinationGauges::register(&context.name);
        let skipped = crate::metrics::DeliveryMetrics::new(&context.name).skipped;
        Engine {
            gauges,
            skipped,
            context,
            dead_letters,
            limits: shape.limits,
            ordering: shape.ordering,
            max_outstanding: shape.max_outstanding,
            reader: Some(reader),
            cursor: Some(cursor),
            stop,
            lines: Lines::default(),
            replays: VecDeque::new(),
            replaying: 0,
            replay_after: 0,
            next_replay_poll: Instant::now(),
            unsettled: BTreeMap::new(),
            read_end,
            next_seq: 0,
            owners: HashMap::new(),
            running: JoinSet::new(),
            next_batch: 0,
            unsaved: None,
            recorded: Checkpoint {
                position: read_end,
                sink_offset: mark,
                sink_id: saved.sink_id,
            },
            last_commit: Instant::now(),
            save_failures: 0,
            save_log: crate::throttle::LogThrottle::new(Duration::from_secs(10)),
            mark,
            read_again_at: None,
            linger_until: None,
            stop_closed: false,
        }
    }

    /// The checkpoint it starts from is not saved yet: save it as soon as it can.
    pub fn save_soon(mut self) -> Engine {
        self.unsaved = Some(self.recorded);
        self
    }

    /// Messages read ahead of the cursor are bounded, so memory is too, however long
    /// the backlog behind a slow destination.
    fn lookahead_full(&self) -> bool {
        let slots = self.max_outstanding + 1;
        self.lines.free_count() >= self.limits.max_events * slots
            || self.lines.free_bytes() >= self.limits.max_bytes * slots
            || self.lines.held_bytes() >= MAX_HELD_BYTES
    }

    fn reader(&self) -> &QueueReader {
        self.reader
            .as_ref()
            .expect("reader is back after each read")
    }

    pub async fn run(mut self) {
        loop {
            let stopping = self.stop_closed || *self.stop.borrow();
            if !stopping {
                self.read_more().await;
                self.poll_replays().await;
                self.start_batches();
            }
            if stopping && self.running.is_empty() {
                self.save().await;
                return;
            }
            let linger_at = if stopping { None } else { self.linger_until };
            let commit_at = self.unsaved.map(|_| self.last_commit + COMMIT_INTERVAL);
            // Resolves at once if data arrived since the last read.
            let can_read = !stopping && !self.lookahead_full() && self.read_again_at.is_none();
            let replay_at = self.next_replay_poll;
            let read_again_at = self.read_again_at;
            let reader = self.reader.as_mut().expect("reader present");
            tokio::select! {
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    match done {
                        Ok(result) => self.settle(result).await,
                        Err(e) => tracing::error!(
                            destination = %self.context.name, error = %e,
                            "a batch task failed; its messages are delivered again after a restart"
                        ),
                    }
                }
                _ = reader.wait_for_data(), if can_read => {}
                _ = sleep_until_opt(linger_at), if linger_at.is_some() => {}
                _ = sleep_until_opt(commit_at), if commit_at.is_some() => self.save().await,
                _ = tokio::time::sleep_until(replay_at), if !stopping => {}
                _ = sleep_until_opt(read_again_at), if read_again_at.is_some() => {
                    self.read_again_at = None;
                }
                changed = self.stop.changed(), if !stopping => {
                    self.stop_closed = changed.is_err();
                }
            }
        }
    }

    /// Reads what fits in the lookahead from the queue.
    async fn read_more(&mut self) {
        if self.lookahead_full() || self.reader().lag() == 0 || self.read_again_at.is_some() {
            return;
        }
        let slots = self.max_outstanding + 1;
        let max_records = (self.limits.max_events * slots).saturating_sub(self.lines.free_count());
        let max_bytes = (self.limits.max_bytes * slots).saturating_sub(self.lines.free_bytes());
        let reader = self.reader.take().expect("reader present");
        let (reader, read) = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let read = reader.read_batch(max_records.max(1), max_bytes.max(1));
            (reader, read)
        })
        .await
        .expect("queue read task panicked");
        self.reader = Some(reader);
        match read {
            Ok(records) => {
                let now = Instant::now();
                let mut skipped = false;
                for record in records {
                    skipped |= !self.push_record(record, now);
                }
                if skipped {
                    self.note_skipped();
                }
                self.report_backlog();
            }
            Err(e) => {
                tracing::error!(destination = %self.context.name, error = %e, "cannot read the queue");
                self.read_again_at = Some(Instant::now() + READ_RETRY);
            }
        }
    }

    /// Takes a record read from the queue into a line; false when it is not routed here.
    fn push_record(&mut self, record: Record, now: Instant) -> bool {
        let (decision, user) = self
            .context
            .route
            .decide_with_user(&record.source, &record.json);
        let edited = match decision {
            Decision::Send(Cow::Borrowed(_)) => None,
            Decision::Send(Cow::Owned(edited)) => Some(edited),
            Decision::Skip(why) => {
                // Settled without a batch: the cursor may pass it.
                tracing::trace!(why = why.as_str(), "message not routed here");
                self.skipped.increment(1);
                self.read_end = record.end;
                return false;
            }
        };
        // From the message as accepted: `drop_fields` may remove the ids it is made of.
        // Routing reports the key when it read the message anyway.
        let user = match (self.ordering, user) {
            (false, _) => 0,
            (true, Some(user)) => user,
            (true, None) => user_key(&record.json),
        };
        let json = edited.unwrap_or(record.json);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unsettled
            .insert(seq, (self.read_end, record.tag.accepted_at));
        self.read_end = record.end;
        self.lines.push(Item {
            origin: Origin::Queue { seq },
            source: record.source,
            json,
            user,
            read_at: now,
        });
        true
    }

    /// Picks up dead letters marked for replay (by the CLI or the admin API).
    async fn poll_replays(&mut self) {
        let now = Instant::now();
        if now < self.next_replay_poll {
            return;
        }
        self.next_replay_poll = now + REPLAY_POLL;
        if self.replaying == 0 && self.replays.is_empty() {
            self.replay_after = 0;
        }
        if self.replays.len() >= self.limits.max_events {
            return;
        }
        let store = self.dead_letters.clone();
        let name = self.context.name.clone();
        let (after, limit) = (self.replay_after, self.limits.max_events);
        let rows = tokio::task::spawn_blocking(move || store.marked(&name, after, limit))
            .await
            .expect("dead-letter task panicked");
        match rows {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(destination = %self.context.name, messages = rows.len(), "replaying dead letters");
                }
                for (id, source, json) in rows {
                    self.replay_after = self.replay_after.max(id);
                    self.replays.push_back(Item {
                        origin: Origin::Replay { id },
                        source,
                        json,
                        user: 0,
                        read_at: now,
                    });
                }
            }
            Err(e) => {
                tracing::error!(destination = %self.context.name, error = %e, "cannot read dead letters")
            }
        }
    }

    fn start_batches(&mut self) {
        self.linger_until = None;
        while self.running.len() < self.max_outstanding {
            let Some(items) = self.form_replay_batch().or_else(|| self.form_batch()) else {
                break;
            };
            let id = self.next_batch;
            self.next_batch += 1;
            for item in &items {
                match item.origin {
                    Origin::Replay { .. } => self.replaying += 1,
                    Origin::Queue { .. } if item.user != 0 => {
                        self.owners.entry(item.user).or_insert((id, 0)).1 += 1;
                        self.lines.hold(item.user);
                    }
                    Origin::Queue { .. } => {}
                }
            }
            self.running
                .spawn(batch::deliver(self.context.clone(), items));
        }
    }

    fn form_replay_batch(&mut self) -> Option<Vec<Item>> {
        if self.replays.is_empty() {
            return None;
        }
        let mut items = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.replays.front() {
            if items.len() == self.limits.max_events
                || (!items.is_empty() && bytes + wire_len(next) > self.limits.max_bytes)
            {
                break;
            }
            bytes += wire_len(next);
            items.push(self.replays.pop_front().expect("front exists"));
        }
        Some(items)
    }

    /// The next batch of free messages, or `None` if none should go yet: nothing is
    /// free, or only a partial batch is and it may still fill (more is in the queue, or
    /// its oldest message has waited less than `linger`).
    fn form_batch(&mut self) -> Option<Vec<Item>> {
        let count = self.lines.free_count();
        if count == 0 {
            return None;
        }
        let full =
            count >= self.limits.max_events || self.lines.free_bytes() > self.limits.max_bytes;
        if !full && !*self.stop.borrow() {
            let more_coming =
                self.reader().lag() > 0 && !self.lookahead_full() && self.read_again_at.is_none();
            if more_coming {
                return None;
            }
            let oldest = self.lines.oldest_free()?.read_at;
            let linger_until = oldest + self.limits.linger;
            if Instant::now() < linger_until {
                self.linger_until = Some(linger_until);
                return None;
            }
        }
        Some(
            self.lines
                .take(self.limits.max_events, self.limits.max_bytes),
        )
    }

    /// Records a finished batch: dead letters stored, users freed, cursor advanced.
    async fn settle(&mut self, result: BatchResult) {
        if let Some(mark) = result.mark {
            self.mark = mark;
        }
        // If shutdown interrupted storing dead letters, those messages stay owed.
        let dead_stored = self.store_dead_letters(&result).await;
        let mut delivered_replays = Vec::new();
        let mut freed = Vec::new();
        for (item, settled) in result.items.iter().zip(&result.settled) {
            let done = match settled {
                Settled::Delivered => true,
                Settled::Dead(_) => dead_stored,
                Settled::Abandoned => false,
            };
            match item.origin {
                Origin::Queue { seq } => {
                    if item.user != 0 {
                        if let Some(owner) = self.owners.get_mut(&item.user) {
                            owner.1 -= 1;
                            if owner.1 == 0 {
                                self.owners.remove(&item.user);
                                freed.push(item.user);
                            }
                        }
                    }
                    if done {
                        self.unsettled.remove(&seq);
                    }
                }
                Origin::Replay { id } => {
                    self.replaying -= 1;
                    if matches!(settled, Settled::Delivered) {
                        delivered_replays.push(id);
                    }
                }
            }
        }
        for user in freed {
            self.lines.release(user);
        }
        self.report_backlog();
        let now = self.checkpoint();
        // A replay moves the mark (a file grew) without moving the position: save it too,
        // or a restart would cut the replayed lines off.
        if now != self.recorded {
            self.recorded = now;
            self.unsaved = Some(now);
            // Replayed rows are deleted below; the mark that covers them must be saved first.
            if !delivered_replays.is_empty() || self.last_commit.elapsed() >= COMMIT_INTERVAL {
                self.save().await;
            }
        }
        if !delivered_replays.is_empty() && self.unsaved.is_none() {
            let store = self.dead_letters.clone();
            let removed = tokio::task::spawn_blocking(move || store.remove(&delivered_replays))
                .await
                .expect("dead-letter task panicked");
            if let Err(e) = removed {
                // They stay marked and are sent again: at least once.
                tracing::error!(destination = %self.context.name, error = %e, "cannot remove replayed dead letters");
            }
        }
    }

    /// Where the cursor may move now: to the first unsettled message, or past all read.
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self
                .unsettled
                .first_key_value()
                .map_or(self.read_end, |(_, &(start, _))| start),
            sink_offset: self.mark,
            sink_id: self.recorded.sink_id,
        }
    }

    /// After messages were passed over without a batch (not routed here): let the
    /// commit timer save the cursor past them, or they would hold the queue.
    fn note_skipped(&mut self) {
        let now = self.checkpoint();
        if now != self.recorded {
            self.recorded = now;
            self.unsaved = Some(now);
        }
    }

    fn report_backlog(&self) {
        let oldest = self.unsettled.first_key_value().map(|(_, &(_, at))| at);
        self.gauges.set(self.unsettled.len(), oldest);
    }

    /// Stores the batch's dead letters, retrying until the store takes them: a queue
    /// message is only settled once its dead letter is durable. False if shutdown came
    /// first (the messages stay owed and are sent again after a restart).
    async fn store_dead_letters(&mut self, result: &BatchResult) -> bool {
        let mut new = Vec::new();
        let mut again = Vec::new();
        for (item, settled) in result.items.iter().zip(&result.settled) {
            if let Settled::Dead(failure) = settled {
                match item.origin {
                    Origin::Queue { .. } => {
                        new.push((item.source.clone(), item.json.clone(), failure.clone()))
                    }
                    Origin::Replay { id } => again.push((id, failure.clone())),
                }
            }
        }
        if new.is_empty() && again.is_empty() {
            return true;
        }
        for (reason, status) in new
            .iter()
            .map(|(_, _, f)| f)
            .chain(again.iter().map(|(_, f)| f))
            .map(|f| (f.reason.as_str(), f.status))
            .collect::<std::collections::BTreeSet<_>>()
        {
            tracing::warn!(destination = %self.context.name, reason, status, "dead-lettered");
        }
        let (new, again) = (Arc::new(new), Arc::new(again));
        let mut wait = Duration::from_millis(100);
        loop {
            let store = self.dead_letters.clone();
            let name = self.context.name.clone();
            let (new, again) = (new.clone(), again.clone());
            // One transaction per batch: a retry after a failure never adds rows twice.
            let stored = tokio::task::spawn_blocking(move || {
                let new: Vec<(&str, &[u8], &Failure)> = new
                    .iter()
                    .map(|(s, j, f)| (s.as_str(), j.as_slice(), f.as_ref()))
                    .collect();
                let again: Vec<(i64, &Failure)> =
                    again.iter().map(|(id, f)| (*id, f.as_ref())).collect();
                store.record(&name, &new, &again)
            })
            .await
            .expect("dead-letter task panicked");
            match stored {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(destination = %self.context.name, error = %e, "cannot store dead letters; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.wait_for(|&s| s) => return false,
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn save(&mut self) {
        let Some(checkpoint) = self.unsaved.take() else {
            return;
        };
        self.last_commit = Instant::now();
        let mut cursor = self.cursor.take().expect("cursor present");
        let context = self.context.clone();
        let (cursor, saved) = tokio::task::spawn_blocking(move || {
            // What the cursor passes must be durable at the destination first.
            let saved = context
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
                // Delivered messages past the old cursor are sent again after a restart.
                // Tried again every COMMIT_INTERVAL: logged when it starts, then seldom.
                self.save_failures += 1;
                if self.save_failures == 1 || self.save_log.ready() {
                    tracing::error!(
                        destination = %self.context.name,
                        error = %e,
                        failures = self.save_failures,
                        "cannot save the cursor; retrying"
                    );
                }
                self.unsaved.get_or_insert(checkpoint);
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
