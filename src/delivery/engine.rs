//! One destination's delivery loop: read the queue ahead of the cursor, group messages
//! into batches, run a bounded number of batches at once, and move the cursor over what
//! is settled (`progress.rs`).
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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::batch::{self, BatchResult, Item, Origin, Settled};
use super::context::DeliveryContext;
use super::lines::Lines;
use super::progress::Progress;
use super::replay::{self, Replays};
use crate::destinations::BatchLimits;
use crate::queue::{DeadLetters, Record};
use crate::routing::{user_key, Decision};

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
    stop: watch::Receiver<bool>,
    /// Read from the queue, not yet in a batch.
    lines: Lines,
    replays: Replays,
    progress: Progress,
    /// Messages not routed to this destination.
    skipped: metrics::Counter,
    running: JoinSet<BatchResult>,
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
        progress: Progress,
    ) -> Engine {
        crate::metrics::install();
        let skipped = crate::metrics::DeliveryMetrics::new(&context.name).skipped;
        let replays = Replays::new(&dead_letters);
        Engine {
            stop: context.stop.clone(),
            progress,
            skipped,
            context,
            dead_letters,
            limits: shape.limits,
            ordering: shape.ordering,
            max_outstanding: shape.max_outstanding,
            lines: Lines::default(),
            replays,
            running: JoinSet::new(),
            read_again_at: None,
            linger_until: None,
            stop_closed: false,
        }
    }

    /// Messages read ahead of the cursor are bounded, so memory is too, however long
    /// the backlog behind a slow destination.
    fn lookahead_full(&self) -> bool {
        let slots = self.max_outstanding + 1;
        self.lines.free_count() >= self.limits.max_events * slots
            || self.lines.free_bytes() >= self.limits.max_bytes * slots
            || self.lines.held_bytes() >= MAX_HELD_BYTES
    }

    pub async fn run(mut self) {
        loop {
            let stopping = self.stop_closed || *self.stop.borrow();
            if !stopping {
                self.read_more().await;
                self.replays
                    .poll(
                        &self.dead_letters,
                        &self.context.name,
                        self.limits.max_events,
                    )
                    .await;
                self.start_batches();
            }
            if stopping && self.running.is_empty() {
                self.progress.save(&self.context).await;
                self.progress.close().await;
                return;
            }
            let linger_at = if stopping { None } else { self.linger_until };
            let save_at = self.progress.save_at();
            // Resolves at once if data arrived since the last read.
            let can_read = !stopping && !self.lookahead_full() && self.read_again_at.is_none();
            let replay_at = self.replays.next_poll();
            let read_again_at = self.read_again_at;
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
                _ = self.progress.wait_for_data(), if can_read => {}
                _ = sleep_until_opt(linger_at), if linger_at.is_some() => {}
                _ = sleep_until_opt(save_at), if save_at.is_some() => {
                    self.progress.save(&self.context).await;
                }
                _ = sleep_until_opt(replay_at), if replay_at.is_some() && !stopping => {}
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
        if self.lookahead_full() || !self.progress.has_more() || self.read_again_at.is_some() {
            return;
        }
        let slots = self.max_outstanding + 1;
        let max_records = (self.limits.max_events * slots).saturating_sub(self.lines.free_count());
        let max_bytes = (self.limits.max_bytes * slots).saturating_sub(self.lines.free_bytes());
        let read = self
            .progress
            .read_batch(max_records.max(1), max_bytes.max(1))
            .await;
        match read {
            Ok(records) => {
                let now = Instant::now();
                for record in records {
                    self.push_record(record, now);
                }
                // Messages passed over without a batch let the cursor move: the save
                // timer takes it past them, or they would hold the queue.
                self.progress.note();
                self.progress.report();
            }
            Err(e) => {
                tracing::error!(destination = %self.context.name, error = %e, "cannot read the queue");
                self.read_again_at = Some(Instant::now() + READ_RETRY);
            }
        }
    }

    /// Takes a record read from the queue into a line, unless it is not routed here.
    fn push_record(&mut self, record: Record, now: Instant) {
        if record.passed {
            self.progress.pass(record.receipt);
            return;
        }
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
                if crate::live::watching() {
                    super::live_view::tell_skipped(
                        &self.context,
                        &record.source,
                        &record.json,
                        why.as_str(),
                    );
                }
                self.progress.pass(record.receipt);
                return;
            }
        };
        // From the message as accepted: `drop_fields` may remove the ids it is made of.
        // Routing reports the key when it read the message anyway.
        let user = match (self.ordering, user) {
            (false, _) => 0,
            (true, Some(user)) => user,
            (true, None) => user_key(&record.json),
        };
        let seq = self.progress.read(record.receipt, record.tag.accepted_at);
        self.lines.push(Item {
            origin: Origin::Queue { seq },
            source: record.source,
            json: edited.unwrap_or(record.json),
            user,
            read_at: now,
            earlier: record.earlier,
        });
    }

    fn start_batches(&mut self) {
        self.linger_until = None;
        while self.running.len() < self.max_outstanding {
            let Some(items) = self
                .replays
                .take_batch(&self.limits)
                .or_else(|| self.form_batch())
            else {
                break;
            };
            self.lines.batch_started(&items);
            self.running
                .spawn(batch::deliver(self.context.clone(), items));
        }
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
                self.progress.has_more() && !self.lookahead_full() && self.read_again_at.is_none();
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
            self.progress.set_mark(mark);
        }
        // If shutdown interrupted storing dead letters, those messages stay owed.
        let dead_stored = replay::store_failures(
            &self.dead_letters,
            &self.context.name,
            &result,
            self.context.clock.now(),
            &mut self.stop,
        )
        .await;
        let mut delivered_replays = Vec::new();
        for (item, settled) in result.items.iter().zip(&result.settled) {
            let done = match settled {
                Settled::Delivered => true,
                Settled::Dead(_) => dead_stored,
                Settled::Abandoned => false,
            };
            match item.origin {
                Origin::Queue { seq } if done => self.progress.settled(seq),
                Origin::Queue { .. } => {}
                Origin::Replay { id } => {
                    self.replays.settled();
                    if matches!(settled, Settled::Delivered) {
                        delivered_replays.push(id);
                    }
                }
            }
        }
        self.lines.batch_settled(&result.items);
        self.progress.report();
        // A replay moves the mark (a file grew) without moving the position: save it too,
        // or a restart would cut the replayed lines off. Replayed rows are deleted below;
        // the mark that covers them must be saved first.
        if self.progress.note() && (!delivered_replays.is_empty() || self.progress.save_due()) {
            self.progress.save(&self.context).await;
        }
        if !delivered_replays.is_empty() && !self.progress.has_unsaved() {
            if let Err(e) = self.dead_letters.remove(delivered_replays).await {
                // They stay marked and are sent again: at least once.
                tracing::error!(destination = %self.context.name, error = %e, "cannot remove replayed dead letters");
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
