//! Delivering one batch: wait for the destination's gate, a send slot and rate tokens;
//! send; on a retryable failure back off and try again until the batch is delivered or
//! out of attempts; on a rejection split it in halves, down to single messages, so that
//! only the message the destination refuses is dead-lettered.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tokio::time::Instant;

use super::context::DeliveryContext;
use super::insert::Inserted;
use super::live_view::{failure_fields, tell, tell_message};
use super::retry::sleep_unless_stopped;
use crate::destinations::RatePer;
use crate::destinations::{Check, Outgoing, Prepared, Refusal, RefusalKind, SendError};
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
    /// Settled message by message (indices into the messages sent); the ones not named
    /// here were delivered.
    Partly {
        refused: Vec<(usize, Failure)>,
        skipped: Vec<(usize, &'static str)>,
        /// The ones to send again, on their own.
        retry: Option<Retry>,
    },
    Rejected(Failure),
    Exhausted(Failure),
    Stopped,
}

/// Messages of a send to try again (indices into the messages sent), after `attempts`
/// attempts, at `at`.
struct Retry {
    indices: Vec<usize>,
    attempts: u32,
    at: Instant,
}

/// Delivers `items`, splitting on rejection. Every item comes back settled.
pub async fn deliver(context: Arc<DeliveryContext>, mut items: Vec<Item>) -> BatchResult {
    let metrics = DeliveryMetrics::new(&context.name);
    let mut settled = vec![Settled::Abandoned; items.len()];
    let mut mark = None;
    context
        .enrich(items.iter_mut().map(|item| &mut item.json))
        .await;
    // A suppressed subject's messages (still in the log, or replayed) go nowhere; then
    // the insert function: what it skips or fails is settled here, the rest goes on.
    let mut inserted = super::suppressed::screen(&context, &metrics, items.iter().map(shown));
    for index in (0..items.len()).filter(|&i| !inserted[i]) {
        settled[index] = Settled::Delivered;
    }
    if let Some(function) = &context.insert {
        for (index, item) in items.iter_mut().enumerate() {
            if !std::mem::take(&mut inserted[index]) {
                continue;
            }
            match super::insert::apply(&context, function, &item.json).await {
                Inserted::Send(json) => {
                    super::insert::tell_inserted(&context, &item.source, &item.json, &json);
                    item.json = json;
                    inserted[index] = true;
                }
                Inserted::Skip(why) => {
                    metrics.skipped.increment(1);
                    tell(&context, "skipped", [shown(item)], json!({"reason": why}));
                    settled[index] = Settled::Delivered;
                }
                Inserted::Dead(failure) => {
                    metrics.dead_lettered.increment(1);
                    tell(
                        &context,
                        "dead_lettered",
                        [shown(item)],
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
        // A large batch's checks are long work (a warehouse's mapping): the runtime's one
        // thread takes turns with the other batches' sends every so many.
        tokio::task::coop::consume_budget().await;
        let check = context.destination.check(&item.json);
        match check {
            Check::Send(ready) => {
                prepared[index] = ready;
                sendable.push(index);
            }
            Check::Skip(why) => {
                tracing::debug!(destination = %context.name, why, "message not for this destination");
                metrics.skipped.increment(1);
                tell(&context, "skipped", [shown(item)], json!({"reason": why}));
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
                tell(
                    &context,
                    "dead_lettered",
                    [shown(item)],
                    failure_fields(&failure),
                );
                settled[index] = Settled::Dead(Arc::new(failure));
            }
        }
    }
    // Still to send; the left half of a split is pushed last so it goes first, and the
    // messages a send asks to retry go before anything after them.
    let mut todo = vec![Todo {
        indices: sendable,
        attempts: 0,
        not_before: None,
    }];
    // `max_age` counts from the batch's first attempt, across the parts it splits into.
    let started = (Instant::now(), context.clock.now());
    while let Some(Todo {
        indices,
        attempts,
        not_before,
    }) = todo.pop()
    {
        if indices.is_empty() {
            continue;
        }
        let range: Vec<Outgoing<'_>> = indices
            .iter()
            .map(|&i| Outgoing {
                source: &items[i].source,
                json: &items[i].json,
                prepared: prepared[i].as_ref(),
            })
            .collect();
        // For the live view's `retried` events, which name each message's source.
        let sources: Vec<&str> = if crate::live::watching() {
            indices.iter().map(|&i| &*items[i].source).collect()
        } else {
            Vec::new()
        };
        let tries = Tries {
            attempts,
            not_before,
            started,
        };
        match send_with_retries(&context, &metrics, &range, &sources, tries).await {
            Attempt::Delivered(m) => {
                metrics.ok.increment(indices.len() as u64);
                mark = Some(m);
                for &i in &indices {
                    settled[i] = Settled::Delivered;
                }
                tell(
                    &context,
                    "delivered",
                    indices.iter().map(|&i| shown(&items[i])),
                    json!({}),
                );
            }
            Attempt::Partly {
                refused,
                skipped,
                retry,
            } => {
                // Positions (into `indices`) the destination did not name were delivered.
                let mut delivered = vec![true; indices.len()];
                metrics.dead_lettered.increment(refused.len() as u64);
                for (k, failure) in refused {
                    delivered[k] = false;
                    let i = indices[k];
                    tell(
                        &context,
                        "dead_lettered",
                        [shown(&items[i])],
                        failure_fields(&failure),
                    );
                    settled[i] = Settled::Dead(Arc::new(failure));
                }
                metrics.skipped.increment(skipped.len() as u64);
                for (k, why) in skipped {
                    delivered[k] = false;
                    let i = indices[k];
                    tell(
                        &context,
                        "skipped",
                        [shown(&items[i])],
                        json!({"reason": why}),
                    );
                    settled[i] = Settled::Delivered;
                }
                if let Some(retry) = retry {
                    for &k in &retry.indices {
                        delivered[k] = false;
                    }
                    todo.push(Todo {
                        indices: retry.indices.iter().map(|&k| indices[k]).collect(),
                        attempts: retry.attempts,
                        not_before: Some(retry.at),
                    });
                }
                let delivered: Vec<usize> = (0..indices.len())
                    .filter(|&k| delivered[k])
                    .map(|k| indices[k])
                    .collect();
                metrics.ok.increment(delivered.len() as u64);
                for &i in &delivered {
                    settled[i] = Settled::Delivered;
                }
                tell(
                    &context,
                    "delivered",
                    delivered.iter().map(|&i| shown(&items[i])),
                    json!({}),
                );
            }
            Attempt::Rejected(failure) if indices.len() > 1 => {
                tracing::info!(
                    destination = %context.name,
                    messages = indices.len(),
                    status = failure.status,
                    "batch rejected; splitting it to find the message at fault"
                );
                let mut left = indices;
                let right = left.split_off(left.len() / 2);
                for half in [right, left] {
                    todo.push(Todo {
                        indices: half,
                        attempts: 0,
                        not_before: None,
                    });
                }
            }
            Attempt::Rejected(failure) | Attempt::Exhausted(failure) => {
                metrics.dead_lettered.increment(indices.len() as u64);
                let fields = failure_fields(&failure);
                tell(
                    &context,
                    "dead_lettered",
                    indices.iter().map(|&i| shown(&items[i])),
                    fields,
                );
                let failure = Arc::new(failure);
                for &i in &indices {
                    settled[i] = Settled::Dead(failure.clone());
                }
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

/// Messages of a batch to send together (indices into its items), the attempts they
/// have had, and when they may go.
struct Todo {
    indices: Vec<usize>,
    attempts: u32,
    not_before: Option<Instant>,
}

/// Where a send starts: the attempts before it, when it may go, and when the batch was
/// first tried (monotonic, for `max_age`; wall, for the dead letter).
#[derive(Clone, Copy)]
struct Tries {
    attempts: u32,
    not_before: Option<Instant>,
    started: (Instant, chrono::DateTime<Utc>),
}

async fn send_with_retries(
    context: &DeliveryContext,
    metrics: &DeliveryMetrics,
    messages: &[Outgoing<'_>],
    sources: &[&str],
    tries: Tries,
) -> Attempt {
    let sequential = context.destination.sequential();
    let mut stop = context.stop.clone();
    let Tries {
        mut attempts,
        not_before,
        started,
    } = tries;
    if let Some(at) = not_before {
        if !sleep_unless_stopped(&mut stop, at).await {
            return Attempt::Stopped;
        }
    }
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
        if let Some(asked) = asked_to_wait(&result) {
            // Held before the slot is released, so no queued batch slips through.
            context.hold_until(Instant::now() + context.policy.backoff.clamp_retry_after(asked));
        }
        drop(permit);
        let failed = match result {
            Ok(mark) => return Attempt::Delivered(mark),
            Err(SendError::PartlyRejected { refused }) => {
                let tried = Tries { attempts, ..tries };
                return partly(context, metrics, messages, sources, refused, tried);
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
                    first_attempt_at: started.1,
                })
            }
            Err(SendError::Retryable {
                status,
                retry_after,
                detail,
                answer,
            }) => Failed {
                status,
                retry_after,
                detail,
                answer,
            },
        };
        let tried = Tries { attempts, ..tries };
        match next_try(context, metrics, messages, sources, tried, failed) {
            Ok(at) => {
                if !sleep_unless_stopped(&mut stop, at).await {
                    return Attempt::Stopped;
                }
            }
            Err(failure) => return Attempt::Exhausted(failure),
        }
    }
}

/// The longest `Retry-After` an answer asked for, of the batch or of any message in it.
fn asked_to_wait(result: &Result<u64, SendError>) -> Option<std::time::Duration> {
    match result {
        Err(SendError::Retryable { retry_after, .. }) => *retry_after,
        Err(SendError::PartlyRejected { refused }) => refused
            .iter()
            .filter_map(|r| match r.kind {
                RefusalKind::Retry { retry_after } => retry_after,
                _ => None,
            })
            .max(),
        _ => None,
    }
}

/// Sorts what a send settled message by message (`tries.attempts` counts that send):
/// refused and skipped ones as they are, retried ones into one retry of them alone (or
/// dead letters, when out of attempts). An index out of range or named twice is ignored.
fn partly(
    context: &DeliveryContext,
    metrics: &DeliveryMetrics,
    messages: &[Outgoing<'_>],
    sources: &[&str],
    refusals: Vec<Refusal>,
    tries: Tries,
) -> Attempt {
    let mut named = vec![false; messages.len()];
    let (mut refused, mut skipped, mut retried) = (Vec::new(), Vec::new(), Vec::new());
    for r in refusals {
        if named.get(r.index) != Some(&false) {
            continue;
        }
        named[r.index] = true;
        match r.kind {
            RefusalKind::Refused => {
                let failure = Failure {
                    reason: Reason::Rejected,
                    status: r.status,
                    response: r.answer.unwrap_or(r.detail),
                    attempts: tries.attempts,
                    first_attempt_at: tries.started.1,
                };
                refused.push((r.index, failure));
            }
            RefusalKind::Skipped { reason } => skipped.push((r.index, reason)),
            RefusalKind::Retry { retry_after } => retried.push((r, retry_after)),
        }
    }
    let Some((first, _)) = retried.first() else {
        return Attempt::Partly {
            refused,
            skipped,
            retry: None,
        };
    };
    let failed = Failed {
        status: first.status,
        retry_after: retried.iter().filter_map(|(_, asked)| *asked).max(),
        detail: first.detail.clone(),
        answer: first.answer.clone(),
    };
    let indices: Vec<usize> = retried.iter().map(|(r, _)| r.index).collect();
    let subset: Vec<Outgoing<'_>> = indices.iter().map(|&k| messages[k]).collect();
    let subset_sources: Vec<&str> = indices
        .iter()
        .filter_map(|&k| sources.get(k).copied())
        .collect();
    let retry = match next_try(context, metrics, &subset, &subset_sources, tries, failed) {
        Ok(at) => Some(Retry {
            indices,
            attempts: tries.attempts,
            at,
        }),
        Err(failure) => {
            refused.extend(indices.into_iter().map(|k| (k, failure.clone())));
            None
        }
    };
    Attempt::Partly {
        refused,
        skipped,
        retry,
    }
}

/// A failed attempt, as the destination told it.
struct Failed {
    status: Option<u16>,
    retry_after: Option<std::time::Duration>,
    detail: String,
    answer: Option<String>,
}

/// After `messages` failed (`tries.attempts` counts that attempt): when to try them
/// again, or, out of attempts or time, the failure to dead-letter them with. A local
/// sink that fails is a disk problem: it is retried without end rather than
/// dead-lettering everything onto the same disk.
fn next_try(
    context: &DeliveryContext,
    metrics: &DeliveryMetrics,
    messages: &[Outgoing<'_>],
    sources: &[&str],
    tries: Tries,
    failed: Failed,
) -> Result<Instant, Failure> {
    let Failed {
        status,
        retry_after,
        detail,
        answer,
    } = failed;
    let attempts = tries.attempts;
    let now = Instant::now();
    if !context.destination.sequential() && context.policy.exhausted(attempts, tries.started.0, now)
    {
        tracing::error!(
            destination = %context.name,
            messages = messages.len(),
            attempts,
            error = %detail,
            "giving up on a batch; dead-lettering it"
        );
        return Err(Failure {
            reason: Reason::RetriesExhausted,
            status,
            response: answer.unwrap_or(detail),
            attempts,
            first_attempt_at: tries.started.1,
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
    Ok(now + delay)
}

/// An item as the live view names it: its source and JSON.
fn shown(item: &Item) -> (&str, &[u8]) {
    (&item.source, &item.json)
}
