//! Dead letters on the engine's side: rows an operator marked for replay (by the CLI or
//! the admin API) are picked up and sent again in batches of their own; the failures of
//! a batch are stored, retrying until the store takes them, before its messages count
//! as settled.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

use super::batch::{BatchResult, Item, Origin, Settled};
use super::lines::wire_len;
use crate::destinations::BatchLimits;
use crate::queue::dead_letters::{DeadLetters, Failure};
use crate::queue::Earlier;

/// How often marked dead letters are looked for.
const POLL: Duration = Duration::from_secs(1);

/// Marked dead letters waiting for a batch, and those in batches.
pub struct Replays {
    waiting: VecDeque<Item>,
    /// Replayed messages in unsettled batches.
    in_flight: usize,
    /// The highest row id taken since the last time none was in flight.
    after: i64,
    /// `None` when the store is not polled (the shared log delivers replays itself).
    next_poll: Option<Instant>,
}

impl Replays {
    pub fn new(store: &DeadLetters) -> Replays {
        Replays {
            waiting: VecDeque::new(),
            in_flight: 0,
            after: 0,
            next_poll: store.polled().then(Instant::now),
        }
    }

    /// When to look for marked rows again, if ever.
    pub fn next_poll(&self) -> Option<Instant> {
        self.next_poll
    }

    /// Takes rows marked for `destination` (at most a batch's worth waiting), if a poll
    /// is due.
    pub async fn poll(&mut self, store: &Arc<DeadLetters>, destination: &str, max: usize) {
        let now = Instant::now();
        match self.next_poll {
            Some(at) if now >= at => self.next_poll = Some(now + POLL),
            _ => return,
        }
        if self.in_flight == 0 && self.waiting.is_empty() {
            self.after = 0;
        }
        if self.waiting.len() >= max {
            return;
        }
        match store.marked(destination, self.after, max).await {
            Ok(rows) => {
                if !rows.is_empty() {
                    tracing::info!(destination, messages = rows.len(), "replaying dead letters");
                }
                for (id, source, json) in rows {
                    self.after = self.after.max(id);
                    self.waiting.push_back(Item {
                        origin: Origin::Replay { id },
                        source,
                        json,
                        user: 0,
                        read_at: now,
                        earlier: None,
                    });
                }
            }
            Err(e) => tracing::error!(destination, error = %e, "cannot read dead letters"),
        }
    }

    /// The next batch of waiting rows, if any.
    pub fn take_batch(&mut self, limits: &BatchLimits) -> Option<Vec<Item>> {
        if self.waiting.is_empty() {
            return None;
        }
        let mut items = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.waiting.front() {
            if items.len() == limits.max_events
                || (!items.is_empty() && bytes + wire_len(next) > limits.max_bytes)
            {
                break;
            }
            bytes += wire_len(next);
            items.push(self.waiting.pop_front().expect("front exists"));
        }
        self.in_flight += items.len();
        Some(items)
    }

    /// A replayed message's batch settled.
    pub fn settled(&mut self) {
        self.in_flight -= 1;
    }
}

/// A replayed dead letter that failed again on the shared log: its attempts add up, and
/// its first attempt stays the first.
fn with_earlier(failure: &Arc<Failure>, earlier: Option<Earlier>) -> Arc<Failure> {
    match earlier {
        None => failure.clone(),
        Some(earlier) => Arc::new(Failure {
            attempts: failure.attempts + earlier.attempts,
            first_attempt_at: earlier.first_attempt_at.min(failure.first_attempt_at),
            ..Failure::clone(failure)
        }),
    }
}

/// Stores a settled batch's dead letters, retrying until the store takes them (a queue
/// message is settled only once its dead letter is durable): new rows for messages from
/// the queue, replayed rows put back with their new failure. False if `stop` came first
/// (the messages stay owed and are sent again after a restart).
pub async fn store_failures(
    store: &Arc<DeadLetters>,
    destination: &str,
    result: &BatchResult,
    at: DateTime<Utc>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut new = Vec::new();
    let mut again = Vec::new();
    for (item, settled) in result.items.iter().zip(&result.settled) {
        if let Settled::Dead(failure) = settled {
            match item.origin {
                Origin::Queue { .. } => new.push((
                    item.source.clone(),
                    item.json.clone(),
                    with_earlier(failure, item.earlier),
                )),
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
        .collect::<BTreeSet<_>>()
    {
        tracing::warn!(destination, reason, status, "dead-lettered");
    }
    let mut wait = Duration::from_millis(100);
    loop {
        // One transaction (local) or one id per letter (shared) per batch: a retry after
        // a failure never stores a letter twice.
        let stored = store.record(destination, &new, &again, at).await;
        match stored {
            Ok(()) => return true,
            Err(e) => {
                tracing::error!(destination, error = %e, "cannot store dead letters; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|&s| s) => return false,
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}
