//! One destination's acknowledgements on the shared log: which delivered messages it
//! holds, which it has settled and must acknowledge, and the progress signals that keep
//! JetStream from handing held messages to another instance.
//!
//! Each message is acknowledged on its own (`AckPolicy::Explicit`). Acknowledging "all up
//! to here" would be cheaper, but after a fail-over it would also acknowledge messages
//! the dead instance held and nobody had delivered again yet: lost. Explicit acks can
//! only ever cost a duplicate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use tokio::time::Instant;

/// A message as one consumer delivered it: where it is in the stream, and the subject
/// its acknowledgement goes to (a handle of a few dozen bytes, many may be held).
#[derive(Debug)]
pub struct Delivery {
    /// Which of the destination's consumers delivered it (a partition, or the replays).
    pub consumer: u16,
    /// Its sequence number in the stream.
    pub sequence: u64,
    pub(super) reply: Subject,
}

/// Identifies a message across its deliveries.
pub type DeliveryKey = (u16, u64);

impl Delivery {
    pub fn key(&self) -> DeliveryKey {
        (self.consumer, self.sequence)
    }
}

/// Acknowledged keys remembered, to recognise a delivery that crossed its own ack.
const RECENT: usize = 65_536;

/// Sends one acknowledgement (`AckKind`'s wire form) for a delivery.
pub(super) async fn send(
    client: &Client,
    reply: &Subject,
    kind: AckKind,
) -> Result<(), async_nats::Error> {
    client.publish(reply.clone(), kind.into()).await?;
    Ok(())
}

/// What a stopping destination gives back: the messages it holds, and which messages it
/// settled recently. A copy of a settled one still on its way (the server delivers a
/// message again when its ack wait passes first) is acknowledged, never given back: the
/// server may have taken the first ack as stale, and a give-back would deliver it twice.
#[derive(Default)]
pub struct Handback {
    pub held: Vec<Delivery>,
    pub settled: HashSet<DeliveryKey>,
}

pub struct Acks {
    client: Client,
    /// Read and not settled: the newest delivery's reply subject of each.
    held: HashMap<DeliveryKey, Subject>,
    /// Settled, to acknowledge at the next commit.
    settled: Vec<(DeliveryKey, Subject)>,
    /// Recently acknowledged, oldest first.
    recent: VecDeque<DeliveryKey>,
    recent_set: HashSet<DeliveryKey>,
    /// Held messages are signalled "in progress" this often: well inside the ack wait.
    ping_every: Duration,
    next_ping: Instant,
}

impl Acks {
    pub(super) fn new(client: Client, ack_wait: Duration) -> Acks {
        let ping_every = ack_wait / 3;
        Acks {
            client,
            held: HashMap::new(),
            settled: Vec::new(),
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            ping_every,
            next_ping: Instant::now() + ping_every,
        }
    }

    /// A message delivered to the engine. `None` when it is a message delivered again
    /// that is held already (its newer handle is kept) or was just acknowledged (it is
    /// acknowledged again, in case the first ack was lost): either way not sent twice.
    pub fn read(&mut self, delivery: Delivery) -> Option<DeliveryKey> {
        let key = delivery.key();
        if self.recent_set.contains(&key) {
            self.settled.push((key, delivery.reply));
            return None;
        }
        if let Some(reply) = self.held.get_mut(&key) {
            *reply = delivery.reply;
            return None;
        }
        self.held.insert(key, delivery.reply);
        Some(key)
    }

    /// The message is delivered or durably dead-lettered. Remembered at once, so that a
    /// copy the server sends again before the ack goes out is acknowledged, not sent.
    pub fn settle(&mut self, key: DeliveryKey) {
        if let Some(reply) = self.held.remove(&key) {
            self.settled.push((key, reply));
            self.remember(key);
        }
    }

    /// Whether settled messages wait for their acknowledgement.
    pub fn has_unsaved(&self) -> bool {
        !self.settled.is_empty()
    }

    /// When held messages next need their progress signal, if any are held.
    pub fn ping_at(&self) -> Option<Instant> {
        (!self.held.is_empty()).then_some(self.next_ping)
    }

    /// Acknowledges everything settled. On an error the rest stay for the next commit.
    pub async fn commit(&mut self) -> Result<(), async_nats::Error> {
        while let Some((key, reply)) = self.settled.pop() {
            if let Err(e) = send(&self.client, &reply, AckKind::Ack).await {
                self.settled.push((key, reply));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Tells the server the held messages are still being worked on, when that is due,
    /// so that it does not give them to another instance after the ack wait.
    pub async fn ping_if_due(&mut self) {
        if Instant::now() < self.next_ping {
            return;
        }
        self.next_ping = Instant::now() + self.ping_every;
        for reply in self.held.values() {
            if let Err(e) = send(&self.client, reply, AckKind::Progress).await {
                tracing::warn!(error = %e, "cannot signal progress to NATS; held messages may be delivered again");
                return;
            }
        }
    }

    /// Gives up the held messages (at stop), for the feed to hand back to the stream.
    pub fn release(&mut self) -> Handback {
        let held = self
            .held
            .drain()
            .map(|((consumer, sequence), reply)| Delivery {
                consumer,
                sequence,
                reply,
            })
            .collect();
        self.recent.clear();
        Handback {
            held,
            settled: std::mem::take(&mut self.recent_set),
        }
    }

    fn remember(&mut self, key: DeliveryKey) {
        if self.recent_set.insert(key) {
            self.recent.push_back(key);
            if self.recent.len() > RECENT {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
    }
}
