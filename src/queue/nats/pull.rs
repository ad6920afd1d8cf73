//! The pullers behind a `StreamFeed`: one task per consumer, pulling only while its
//! partition is this instance's share and the engine keeps up, catching up when newly
//! pinned, handing over when the share moves, and decoding each stream message into the
//! records the engine reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::keepalive::InFlight;
use super::members::Members;
use super::{delivery as wire, Delivery, NatsQueue, GROUP};
use crate::queue::record::{read_record, ReadOutcome};
use crate::queue::{Earlier, Record};
use crate::throttle::LogThrottle;

/// How long one pull request waits at the server.
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// The longest gap between a live puller's requests while the engine reads: a request's
/// expiry, plus the time its messages take to go on.
const PULL_SLACK: Duration = Duration::from_secs(5);

/// Headers a replayed dead letter carries: its attempts so far, and when the first was.
pub const ATTEMPTS_HEADER: &str = "Fanout-Attempts";
pub const FIRST_ATTEMPT_HEADER: &str = "Fanout-First-Attempt-At";

/// Stream messages one pull asks for (each holds one or more records).
const PULL_BATCH: usize = 64;
/// Room the channel must have before a pull is sent.
const PULL_ROOM: usize = 256;
/// Bytes one pull may bring, unless the largest message allowed is bigger.
const PULL_MAX_BYTES: usize = 4 << 20;
/// A stopping feed keeps reading what was already sent to it until this much silence.
const DRAIN_QUIET: Duration = Duration::from_millis(150);

/// What a feed's pullers share: the live members, which say whose share each partition
/// is, and the messages in flight, kept alive until acknowledged or given back.
#[derive(Clone)]
pub(super) struct Shared {
    pub members: watch::Receiver<Members>,
    pub in_flight: Arc<InFlight>,
}

/// Pulls one consumer into the channel until stopped; then keeps what was already sent
/// to it (until `DRAIN_QUIET` passes without more) and returns that, to be given back.
pub(super) async fn pull_into(
    queue: NatsQueue,
    consumer: consumer::PullConsumer,
    index: u16,
    records: mpsc::Sender<Record<Delivery>>,
    stop: watch::Receiver<bool>,
    Shared { members, in_flight }: Shared,
    destination: String,
) -> Vec<Delivery> {
    let name = consumer.cached_info().name.clone();
    let client = queue.inner.client.clone();
    Puller {
        next_subject: format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{name}",
            queue.inner.names.stream
        ),
        max_bytes: PULL_MAX_BYTES.max(2 * client.server_info().max_payload),
        name,
        client,
        context: queue.inner.js.clone(),
        ack_wait: queue.inner.settings.ack_wait,
        queue,
        consumer,
        index,
        records,
        stop,
        members,
        in_flight,
        destination,
        errors: LogThrottle::new(Duration::from_secs(30)),
        pin: None,
        catch_up: None,
    }
    .run()
    .await
}

struct Puller {
    queue: NatsQueue,
    client: async_nats::Client,
    context: async_nats::jetstream::Context,
    consumer: consumer::PullConsumer,
    name: String,
    /// Where pull requests go.
    next_subject: String,
    /// Bytes one pull request may bring (at least two of the largest message).
    max_bytes: usize,
    index: u16,
    records: mpsc::Sender<Record<Delivery>>,
    stop: watch::Receiver<bool>,
    /// The live instances: whose share this partition is.
    members: watch::Receiver<Members>,
    /// What is kept alive until acknowledged or given back.
    in_flight: Arc<InFlight>,
    destination: String,
    ack_wait: Duration,
    errors: LogThrottle,
    /// The pin this puller holds, as the server last said.
    pin: Option<String>,
    /// Set while newly pinned and the previous holder's messages are not all here yet.
    catch_up: Option<CatchUp>,
}

/// Newly pinned, a puller holds back what it receives until every message the consumer
/// has out unacknowledged was delivered to it, then passes all of it on in stream order.
/// Messages a dead instance held come back only after the ack wait, possibly after newer
/// ones: without this, a user's later message could overtake its earlier one. (A clean
/// stop gives its messages back before the pin moves, so this ends at once.)
struct CatchUp {
    /// Received since the pin: each stream message's records, by stream sequence.
    held: BTreeMap<u64, Vec<Record<Delivery>>>,
    /// The consumer sequence of the first delivery under this pin.
    first: u64,
    /// The newest consumer sequence received.
    last: u64,
    /// Past this, what is held goes on anyway (the ack wait has run out long ago).
    until: Instant,
}

/// How often a catching-up puller with a full buffer asks for what is due again.
const CATCH_UP_CHECK: Duration = Duration::from_millis(100);
/// Messages a catching-up puller holds before it pulls one at a time.
const CATCH_UP_LIMIT: usize = 2048;

impl Puller {
    /// Pulls while the engine keeps up: one request at a time, sent only when the
    /// channel has room for what it may bring, so what waits in memory is bounded by
    /// `PULL_BATCH` messages (and `max_bytes`) plus the channel, however long the
    /// destination stalls. (The client library's pull stream renews its requests on a
    /// timer whether or not its messages are read, which piled up messages without
    /// bound behind a slow destination.)
    async fn run(mut self) -> Vec<Delivery> {
        let inbox = self.client.new_inbox();
        let mut replies = loop {
            match self.client.subscribe(inbox.clone()).await {
                Ok(replies) => break replies,
                Err(e) => {
                    self.warn("cannot subscribe for pulls; retrying", &e);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopped(&mut self.stop) => return self.give_back(None).await,
                    }
                }
            }
        };
        loop {
            // Between requests nothing is on its way here: the hand-over leaves no request
            // at the server that could pin this instance again.
            if !self.owned() && !self.sit_out().await {
                return self.give_back(Some(replies)).await;
            }
            // Between requests nothing is on its way here, so the catch-up check is exact.
            if self.catch_up.is_some() && !self.check_caught_up().await {
                return self.give_back(Some(replies)).await;
            }
            // While catching up nothing goes on; past a bound, only what is due again
            // (the server sends that first) is pulled, one at a time.
            let full = self
                .catch_up
                .as_ref()
                .is_some_and(|c| c.held.len() >= CATCH_UP_LIMIT);
            if full {
                tokio::select! {
                    _ = tokio::time::sleep(CATCH_UP_CHECK) => {}
                    _ = self.members.changed() => continue,
                    _ = stopped(&mut self.stop) => return self.give_back(Some(replies)).await,
                }
            }
            // Room first: a request's messages must fit without waiting long.
            let room = tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => false,
                _ = self.members.changed() => continue,
                room = self.records.reserve_many(PULL_ROOM) => room.is_ok(),
            };
            if !room {
                return self.give_back(Some(replies)).await;
            }
            let batch = if full { 1 } else { PULL_BATCH };
            let request = serde_json::json!({
                "batch": batch,
                "max_bytes": self.max_bytes,
                "expires": PULL_EXPIRES.as_nanos() as u64,
                "group": GROUP,
                "id": self.pin,
            });
            let sent = self
                .client
                .publish_with_reply(
                    self.next_subject.clone(),
                    inbox.clone(),
                    request.to_string().into(),
                )
                .await;
            if let Err(e) = sent {
                self.warn("cannot send a pull request; retrying", &e);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopped(&mut self.stop) => return self.give_back(Some(replies)).await,
                }
            }
            // The request's answers, until it is complete or has expired.
            let deadline = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
            let mut received = 0;
            while received < batch {
                let next = tokio::select! {
                    biased;
                    _ = stopped(&mut self.stop) => return self.give_back(Some(replies)).await,
                    _ = tokio::time::sleep_until(deadline) => break,
                    next = replies.next() => next,
                };
                let Some(message) = next else {
                    // The subscription ended (the client is closing).
                    return self.give_back(None).await;
                };
                match message.status {
                    None | Some(async_nats::StatusCode::OK) => {}
                    Some(async_nats::StatusCode::IDLE_HEARTBEAT) => continue,
                    Some(async_nats::StatusCode::NOT_FOUND)
                    | Some(async_nats::StatusCode::TIMEOUT) => break,
                    // The request's byte budget is used up: it is complete.
                    Some(async_nats::StatusCode::REQUEST_TERMINATED)
                        if message
                            .description
                            .as_deref()
                            .is_some_and(|d| d.contains("MaxBytes")) =>
                    {
                        break
                    }
                    Some(async_nats::StatusCode::PIN_ID_MISMATCH) => {
                        // Pinned elsewhere now: ask again as a candidate.
                        self.pin = None;
                        break;
                    }
                    // No consumer leader yet (a consumer just made, a node restarting):
                    // routine at start-up, not worth a warning per partition.
                    Some(async_nats::StatusCode::NO_RESPONDERS) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    Some(status) => {
                        let why = message
                            .description
                            .clone()
                            .unwrap_or_else(|| status.to_string());
                        self.warn("a pull request ended early; pulling again", &why);
                        // Not in a tight loop if the server keeps refusing at once.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                }
                let message = Message {
                    message,
                    context: self.context.clone(),
                };
                received += 1;
                if !self.take(message).await {
                    return self.give_back(Some(replies)).await;
                }
            }
        }
    }

    /// Whether this partition is this instance's share now.
    fn owned(&self) -> bool {
        let partitions = self.queue.inner.settings.partitions;
        self.members
            .borrow()
            .owns(&self.destination, partitions, self.index)
    }

    /// The partition is another instance's share now: hands it over, and waits until it
    /// is this one's again. False once stopping.
    async fn sit_out(&mut self) -> bool {
        self.release().await;
        loop {
            if self.owned() {
                return true;
            }
            tokio::select! {
                changed = self.members.changed() => if changed.is_err() {
                    stopped(&mut self.stop).await;
                    return false;
                },
                _ = stopped(&mut self.stop) => return false,
            }
        }
    }

    /// Gives back (in stream order) what was held here unforwarded, and releases this
    /// instance's pin, so that the new owner is pinned at once; it catches up on what the
    /// engine here still delivers before passing anything on, which keeps a user's order.
    async fn release(&mut self) {
        if let Some(catch_up) = self.catch_up.take() {
            for records in catch_up.held.into_values() {
                if let Some(record) = records.first() {
                    let _ =
                        wire::send(&self.client, &record.receipt.reply, AckKind::Nak(None)).await;
                }
            }
        }
        let Some(pin) = self.pin.take() else {
            return;
        };
        // Only a pin this instance still holds: past the priority timeout it may be the
        // new owner's already.
        let ours = self.consumer.get_info().await.is_ok_and(|info| {
            info.priority_groups
                .iter()
                .any(|g| g.pinned_client_id.as_deref() == Some(pin.as_str()))
        });
        if ours {
            let stream = &self.queue.inner.stream;
            if let Err(e) = stream.unpin_consumer(&self.name, GROUP).await {
                self.warn("cannot release the pin; it lapses by itself", &e);
            }
        }
        tracing::debug!(destination = %self.destination, consumer = %self.name,
            "partition handed over to another instance");
    }

    /// What its deliveries are told apart by: the consumer, and the stream's incarnation.
    fn origin(&self) -> (u16, u32) {
        (self.index, self.queue.epoch())
    }

    fn warn(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.errors.ready() {
            tracing::warn!(destination = %self.destination, consumer = %self.name, error = %e, "{what}");
        }
    }

    /// One delivered message: passed on, or held while catching up. False once stopping.
    async fn take(&mut self, message: Message) -> bool {
        let pin = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_PIN_ID))
            .map(|v| v.as_str().to_string());
        let consumer_sequence = message.info().map_or(0, |i| i.consumer_sequence);
        let Some((sequence, records)) = decode(message, self.origin(), &self.destination).await
        else {
            return true;
        };
        if let Some(record) = records.first() {
            self.in_flight.delivered(&record.receipt);
        }
        if pin.is_some() && pin != self.pin {
            self.pin = pin;
            self.catch_up = Some(CatchUp {
                held: BTreeMap::new(),
                first: consumer_sequence,
                last: consumer_sequence,
                until: Instant::now() + self.ack_wait + PULL_EXPIRES + Duration::from_secs(2),
            });
        }
        match &mut self.catch_up {
            Some(catch_up) => {
                catch_up.last = catch_up.last.max(consumer_sequence);
                // A repeat delivery of one held replaces it (its reply is the live one).
                catch_up.held.insert(sequence, records);
                true
            }
            None => self.forward(sequence, records).await,
        }
    }

    /// Asks the server whether everything it has out for this consumer was delivered
    /// here since the pin; if so (or the wait is over), passes the held messages on in
    /// stream order. False once stopping.
    async fn check_caught_up(&mut self) -> bool {
        let Some(catch_up) = &self.catch_up else {
            return true;
        };
        let done = if Instant::now() >= catch_up.until {
            tracing::warn!(
                destination = %self.destination,
                consumer = %self.name,
                "messages another instance held did not come back in time; delivering what \
                 is here (a user's order may not hold for them)"
            );
            true
        } else {
            match self.consumer.get_info().await {
                // Every delivery since the pin came here, and the server has nothing
                // unacknowledged beyond them.
                Ok(info) => {
                    let delivered_here = info
                        .delivered
                        .consumer_sequence
                        .saturating_sub(catch_up.first)
                        + 1;
                    catch_up.last >= info.delivered.consumer_sequence
                        && info.num_ack_pending as u64 <= delivered_here
                }
                Err(_) => false,
            }
        };
        if !done {
            return true;
        }
        let Some(CatchUp { held, first, .. }) = self.catch_up.take() else {
            return true;
        };
        tracing::debug!(
            destination = %self.destination,
            consumer = %self.name,
            messages = held.len(),
            from = first,
            "pinned to this instance; delivering in stream order"
        );
        let mut held = held.into_iter();
        while let Some((sequence, records)) = held.next() {
            if !self.forward(sequence, records).await {
                // Stopping: what did not go on is given back with the rest.
                if let Some(catch_up) = &mut self.catch_up {
                    catch_up.held.extend(held);
                }
                return false;
            }
        }
        true
    }

    /// Hands a stream message's records to the engine, waiting for room. False once
    /// stopping (what did not go on is kept with the catch-up buffer, to be given back;
    /// the engine gives back the message too if it has some of its records).
    async fn forward(&mut self, sequence: u64, records: Vec<Record<Delivery>>) -> bool {
        let mut records = records.into_iter();
        while let Some(record) = records.next() {
            let room = tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => None,
                room = self.records.reserve() => room.ok(),
            };
            match room {
                Some(room) => room.send(record),
                None => {
                    let catch_up = self.catch_up.get_or_insert_with(|| CatchUp {
                        held: BTreeMap::new(),
                        first: 0,
                        last: 0,
                        until: Instant::now(),
                    });
                    catch_up
                        .held
                        .insert(sequence, std::iter::once(record).chain(records).collect());
                    return false;
                }
            }
        }
        true
    }

    /// At stop: what was held back and what the server had already sent, to give back.
    async fn give_back(&mut self, replies: Option<async_nats::Subscriber>) -> Vec<Delivery> {
        let mut returned: Vec<Delivery> = self
            .catch_up
            .take()
            .map(|c| {
                c.held
                    .into_values()
                    .filter_map(|records| records.into_iter().next().map(|record| record.receipt))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(replies) = replies {
            returned.extend(drain(replies, &self.context, self.origin()).await);
        }
        returned
    }
}

/// Resolves once the feed is stopping (or its owner is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

/// What the server had already sent to a stopping puller.
async fn drain(
    mut replies: async_nats::Subscriber,
    context: &async_nats::jetstream::Context,
    (index, epoch): (u16, u32),
) -> Vec<Delivery> {
    let mut held = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(DRAIN_QUIET, replies.next()).await {
        if message
            .status
            .is_some_and(|s| s != async_nats::StatusCode::OK)
        {
            continue;
        }
        let message = Message {
            message,
            context: context.clone(),
        };
        let sequence = message.info().map(|i| i.stream_sequence);
        if let (Ok(sequence), Some(reply)) = (sequence, message.message.reply.clone()) {
            held.push(Delivery {
                consumer: index,
                epoch,
                sequence,
                reply,
                records: 0,
            });
        }
    }
    held
}

/// A delivered stream message as the engine reads it: its sequence and its records. One
/// that is not framed records cannot be delivered anywhere: it is logged and terminated
/// (never delivered again).
async fn decode(
    message: Message,
    (index, epoch): (u16, u32),
    destination: &str,
) -> Option<(u64, Vec<Record<Delivery>>)> {
    let sequence = match message.info() {
        Ok(info) => info.stream_sequence,
        Err(e) => {
            tracing::error!(%destination, error = %e, "a delivered message has no JetStream metadata");
            return None;
        }
    };
    let earlier = message.headers.as_ref().and_then(|headers| {
        let attempts = headers.get(ATTEMPTS_HEADER)?.as_str().parse().ok()?;
        let first = headers.get(FIRST_ATTEMPT_HEADER)?.as_str().parse().ok()?;
        Some(Earlier {
            attempts,
            first_attempt_at: first,
        })
    });
    let Some(reply) = message.message.reply.clone() else {
        tracing::error!(%destination, "a delivered message has no reply subject");
        return None;
    };
    let mut payload = message.payload.as_ref();
    let mut parts = Vec::new();
    let valid = loop {
        match read_record(&mut payload) {
            Ok(ReadOutcome::Record {
                source, tag, json, ..
            }) => parts.push((source, tag, json)),
            Ok(ReadOutcome::End) => break !parts.is_empty(),
            _ => break false,
        }
    };
    if !valid {
        tracing::error!(
            %destination,
            subject = %message.subject,
            sequence,
            "a message on the stream is not fanout records; it is dropped"
        );
        let _ = message.ack_with(AckKind::Term).await;
        return None;
    }
    let delivery = Delivery {
        consumer: index,
        epoch,
        sequence,
        reply,
        records: parts.len() as u32,
    };
    let records = parts
        .into_iter()
        .map(|(source, tag, json)| Record {
            source,
            tag,
            json,
            earlier,
            receipt: delivery.clone(),
            passed: false,
        })
        .collect();
    Some((sequence, records))
}

/// How long a pin outlives its client's last pull: past the ack wait plus the longest
/// gap between a live client's pulls, so that a live but slow instance keeps its pin and
/// a dead one's messages are usually due again by the time another is pinned (the
/// catch-up covers the rest; see `feed.rs`'s module comment).
pub(super) fn priority_timeout(ack_wait: Duration) -> Duration {
    ack_wait + PULL_EXPIRES + PULL_SLACK + Duration::from_secs(2)
}
