//! Delivering one batch: wait for the destination's gate, a send slot and rate tokens;
//! send; on a retryable failure back off and try again until the batch is delivered or
//! out of attempts; on a rejection split it in halves, down to single messages, so that
//! only the message the destination refuses is dead-lettered.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::context::DeliveryContext;
use super::insert::Inserted;
use crate::destinations::RatePer;
use crate::destinations::{Check, Outgoing, Prepared, SendError};
use crate::metrics::DeliveryMetrics;
use crate::queue::dead_letters::{Failure, Reason};
use crate::queue::Earlier;

/// Where a message came from, which decides what happens once it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The queue; `seq` is its place in the engine's read order.
    Queue { seq: u64 },
    /// A dead letter being replayed.
    Replay { id: i64 },
}

#[derive(Debug)]
pub struct Item {
    pub origin: Origin,
    pub source: String,
    pub json: Vec<u8>,
    /// Ordering key (hash of anonymousId or userId); 0 when the message has none.
    pub user: u64,
    /// When the engine read it; a partial batch waits at most `linger` past this.
    pub read_at: Instant,
    /// A dead letter sent again through the shared log: its attempts before.
    pub earlier: Option<Earlier>,
}

#[derive(Debug, Clone)]
pub enum Settled {
    Delivered,
    Dead(Arc<Failure>),
    /// Shutdown came first; the message is still owed.
    Abandoned,
}

pub struct BatchResult {
    pub items: Vec<Item>,
    /// One per item.
    pub settled: Vec<Settled>,
    /// The destination's mark after the last successful send, if any.
    pub mark: Option<u64>,
}

enum Attempt {
    Delivered(u64),
    /// Delivered except these messages (indices into the range sent), refused on their own.
    PartlyRejected(Vec<(usize, Failure)>),
    Rejected(Failure),
    Exhausted(Failure),
    Stopped,
}

/// Delivers `items`, splitting on rejection. Every item comes back settled.
pub async fn deliver(context: Arc<DeliveryContext>, mut items: Vec<Item>) -> BatchResult {
    let metrics = DeliveryMetrics::new(&context.name);
    let mut settled = vec![Settled::Abandoned; items.len()];
    let mut mark = None;
    // The insert function first: what it skips or fails is settled here, the rest goes
    // on as it answered.
    let mut inserted = vec![true; items.len()];
    if let Some(function) = &context.insert {
        for (index, item) in items.iter_mut().enumerate() {
            inserted[index] = false;
            match super::insert::apply(&context, function, &item.json).await {
                Inserted::Send(json) => {
                    item.json = json;
                    inserted[index] = true;
                }
                Inserted::Skip(why) => {
                    metrics.skipped.increment(1);
                    tell(&context, "skipped", [&*item], json!({"reason": why}));
                    settled[index] = Settled::Delivered;
                }
                Inserted::Dead(failure) => {
                    metrics.dead_lettered.increment(1);
                    tell(
                        &context,
                        "dead_lettered",
                        [&*item],
                        failure_fields(&failure),
                    );
                    settled[index] = Settled::Dead(Arc::new(failure));
                }
                Inserted::Stopped => {
                    return BatchResult {
                        items,
                        settled,
                        mark,
                    }
                }
            }
        }
    }
    // What the destination can take at all is settled first, without a request; what it
    // prepares for the rest is kept for every attempt.
    let mut sendable = Vec::with_capacity(items.len());
    let mut prepared: Vec<Option<Prepared>> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        prepared.push(None);
        if !inserted[index] {
            continue;
        }
        let check = context.destination.check(&item.json);
        match check {
            Check::Send(ready) => {
                prepared[index] = ready;
                sendable.push(index);
            }
            Check::Skip(why) => {
                tracing::debug!(destination = %context.name, why, "message not for this destination");
                metrics.skipped.increment(1);
                tell(&context, "skipped", [item], json!({"reason": why}));
                settled[index] = Settled::Delivered;
            }
            Check::Refuse { code, detail } => {
                metrics.dead_lettered.increment(1);
                let failure = Failure {
                    reason: Reason::Refused(code),
                    status: None,
                    response: detail,
                    attempts: 0,
                    first_attempt_at: context.clock.now(),
                };
                tell(&context, "dead_lettered", [item], failure_fields(&failure));
                settled[index] = Settled::Dead(Arc::new(failure));
            }
        }
    }
    // Ranges of `sendable` still to send; the left half is pushed last so it goes first.
    let mut todo = vec![(0, sendable.len())];
    // `max_age` counts from the batch's first attempt, across the halves it splits into.
    let started = (Instant::now(), context.clock.now());
    while let Some((lo, hi)) = todo.pop() {
        if lo == hi {
            continue;
        }
        let range: Vec<Outgoing<'_>> = sendable[lo..hi]
            .iter()
            .map(|&i| Outgoing {
                source: &items[i].source,
                json: &items[i].json,
                prepared: prepared[i].as_ref(),
            })
            .collect();
        let mut settle = |outcome: Settled| {
            for &i in &sendable[lo..hi] {
                settled[i] = outcome.clone();
            }
        };
        // For the live view's `retried` events, which name each message's source.
        let sources: Vec<&str> = if crate::live::watching() {
            sendable[lo..hi]
                .iter()
                .map(|&i| &*items[i].source)
                .collect()
        } else {
            Vec::new()
        };
        match send_with_retries(&context, &metrics, &range, &sources, started).await {
            Attempt::Delivered(m) => {
                metrics.ok.increment((hi - lo) as u64);
                mark = Some(m);
                settle(Settled::Delivered);
                tell(
                    &context,
                    "delivered",
                    sendable[lo..hi].iter().map(|&i| &items[i]),
                    json!({}),
                );
            }
            Attempt::PartlyRejected(refused) => {
                let count = refused.len().min(hi - lo);
                metrics.ok.increment((hi - lo - count) as u64);
                metrics.dead_lettered.increment(count as u64);
                settle(Settled::Delivered);
                for (index, failure) in refused {
                    if let Some(&i) = sendable[lo..hi].get(index) {
                        tell(
                            &context,
                            "dead_lettered",
                            [&items[i]],
                            failure_fields(&failure),
                        );
                        settled[i] = Settled::Dead(Arc::new(failure));
                    }
                }
                let delivered = sendable[lo..hi]
                    .iter()
                    .filter(|&&i| matches!(settled[i], Settled::Delivered));
                tell(
                    &context,
                    "delivered",
                    delivered.map(|&i| &items[i]),
                    json!({}),
                );
            }
            Attempt::Rejected(failure) if hi - lo > 1 => {
                tracing::info!(
                    destination = %context.name,
                    messages = hi - lo,
                    status = failure.status,
                    "batch rejected; splitting it to find the message at fault"
                );
                let mid = lo + (hi - lo) / 2;
                todo.push((mid, hi));
                todo.push((lo, mid));
            }
            Attempt::Rejected(failure) | Attempt::Exhausted(failure) => {
                metrics.dead_lettered.increment((hi - lo) as u64);
                let fields = failure_fields(&failure);
                tell(
                    &context,
                    "dead_lettered",
                    sendable[lo..hi].iter().map(|&i| &items[i]),
                    fields,
                );
                settle(Settled::Dead(Arc::new(failure)));
            }
            Attempt::Stopped => break,
        }
    }
    BatchResult {
        items,
        settled,
        mark,
    }
}

async fn send_with_retries(
    context: &DeliveryContext,
    metrics: &DeliveryMetrics,
    messages: &[Outgoing<'_>],
    sources: &[&str],
    (first, first_wall): (Instant, chrono::DateTime<Utc>),
) -> Attempt {
    let sequential = context.destination.sequential();
    let mut stop = context.stop.clone();
    let mut attempts = 0u32;
    loop {
        if let Some(until) = context.gate().filter(|&g| g > Instant::now()) {
            if !sleep_unless_stopped(&mut stop, until).await {
                return Attempt::Stopped;
            }
        }
        let permit = tokio::select! {
            permit = context.sends.acquire() => permit.expect("send semaphore never closes"),
            _ = stop.wait_for(|&s| s) => return Attempt::Stopped,
        };
        if let Some((limiter, per)) = &context.limiter {
            let tokens = match per {
                RatePer::Event => messages.len() as u32,
                RatePer::Request => 1,
            };
            tokio::select! {
                _ = limiter.acquire(tokens) => {}
                _ = stop.wait_for(|&s| s) => return Attempt::Stopped,
            }
        }
        // A Retry-After that arrived while this batch queued for its slot applies too.
        if context.gate().is_some_and(|g| g > Instant::now()) {
            continue;
        }
        attempts += 1;
        let sent_at = Instant::now();
        let result = if sequential {
            // A local write is short and must not be torn by shutdown.
            context.destination.send(messages).await
        } else {
            // Shutdown does not wait for a slow receiver: the batch stays owed and is
            // sent again after the restart.
            tokio::select! {
                result = context.destination.send(messages) => result,
                _ = stop.wait_for(|&s| s) => return Attempt::Stopped,
            }
        };
        metrics.duration.record(sent_at.elapsed().as_secs_f64());
        if let Err(SendError::Retryable {
            retry_after: Some(asked),
            ..
        }) = &result
        {
            // Held before the slot is released, so no queued batch slips through.
            context.hold_until(Instant::now() + context.policy.backoff.clamp_retry_after(*asked));
        }
        drop(permit);
        let (status, retry_after, detail, answer) = match result {
            Ok(mark) => return Attempt::Delivered(mark),
            Err(SendError::PartlyRejected { refused }) => {
                return Attempt::PartlyRejected(
                    refused
                        .into_iter()
                        .map(|r| {
                            let failure = Failure {
                                reason: Reason::Rejected,
                                status: Some(r.status),
                                response: r.answer.unwrap_or(r.detail),
                                attempts,
                                first_attempt_at: first_wall,
                            };
                            (r.index, failure)
                        })
                        .collect(),
                )
            }
            Err(SendError::Rejected {
                status,
                detail,
                answer,
            }) => {
                return Attempt::Rejected(Failure {
                    reason: Reason::Rejected,
                    status: Some(status),
                    response: answer.unwrap_or(detail),
                    attempts,
                    first_attempt_at: first_wall,
                })
            }
            Err(SendError::Retryable {
                status,
                retry_after,
                detail,
                answer,
            }) => (status, retry_after, detail, answer),
        };
        let now = Instant::now();
        // A local sink that fails is a disk problem: retry it without end rather than
        // dead-letter everything onto the same disk.
        if !sequential && context.policy.exhausted(attempts, first, now) {
            tracing::error!(
                destination = %context.name,
                messages = messages.len(),
                attempts,
                error = %detail,
                "giving up on a batch; dead-lettering it"
            );
            return Attempt::Exhausted(Failure {
                reason: Reason::RetriesExhausted,
                status,
                response: answer.unwrap_or(detail),
                attempts,
                first_attempt_at: first_wall,
            });
        }
        let delay = context.policy.backoff.delay(attempts, retry_after);
        metrics.retried.increment(messages.len() as u64);
        if crate::live::watching() {
            for (k, message) in messages.iter().enumerate() {
                let fields = json!({"status": status, "source": sources.get(k)});
                tell_message(context, "retried", message.json, fields);
            }
        }
        tracing::warn!(
            destination = %context.name,
            messages = messages.len(),
            attempts,
            status,
            retry_in_ms = delay.as_millis() as u64,
            error = %detail,
            "delivery failed; will retry"
        );
        if !sleep_unless_stopped(&mut stop, now + delay).await {
            return Attempt::Stopped;
        }
    }
}

/// Sleeps until `until`; false if shutdown came first.
async fn sleep_unless_stopped(stop: &mut watch::Receiver<bool>, until: Instant) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => true,
        _ = stop.wait_for(|&s| s) => false,
    }
}

/// Tells the live view what became of `items` at this destination (with what it was sent).
fn tell<'a>(
    context: &DeliveryContext,
    kind: &'static str,
    items: impl IntoIterator<Item = &'a Item>,
    fields: serde_json::Value,
) {
    if !crate::live::watching() {
        return;
    }
    for item in items {
        let mut fields = fields.clone();
        fields["source"] = json!(item.source);
        tell_message(context, kind, &item.json, fields);
    }
}

/// A message the destination's routing passed over, for the live view (`why`: the rule).
pub(super) fn tell_skipped(context: &DeliveryContext, source: &str, json: &[u8], why: &str) {
    let (mut fields, message_type) = crate::live::summary(json);
    fields["reason"] = json!(why);
    crate::live::publish(
        "skipped",
        Some(source),
        Some(&context.name),
        message_type,
        fields,
        None,
    );
}

fn tell_message(
    context: &DeliveryContext,
    kind: &'static str,
    json: &[u8],
    mut fields: serde_json::Value,
) {
    let (summary, message_type) = crate::live::summary(json);
    fields["messageId"] = summary["messageId"].clone();
    fields["event"] = summary["event"].clone();
    // What was sent: the message as it is, unless the destination translates it.
    let raw = match context.destination.live_payload(json) {
        Some(payload) => {
            fields["payload"] = payload;
            None
        }
        None => Some(("payload", json)),
    };
    let source = fields["source"].as_str().map(str::to_string);
    crate::live::publish(
        kind,
        source.as_deref(),
        Some(&context.name),
        message_type,
        fields,
        raw,
    );
}

/// A dead letter's reason for the live view.
fn failure_fields(failure: &Failure) -> serde_json::Value {
    json!({"reason": failure.reason.as_str(), "status": failure.status, "response": failure.response})
}
