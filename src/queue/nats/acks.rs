//! One destination's acknowledgements on the shared log: which delivered messages it
//! holds, and which it has settled and must acknowledge. (The progress signals that keep
//! held messages here are `keepalive.rs`'s.)
//!
//! Each message is acknowledged on its own (`AckPolicy::Explicit`). Acknowledging "all up
//! to here" would be cheaper, but after a fail-over it would also acknowledge messages
//! the dead instance held and nobody had delivered again yet: lost. Explicit acks can
//! only ever cost a duplicate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};

use super::delivery::{send, Delivery, DeliveryKey};
use super::keepalive::InFlight;

/// Acknowledged keys remembered, to recognise a delivery that crossed its own ack.
const RECENT: usize = 65_536;

/// What a stopping destination gives back: the messages it holds, and which messages it
/// settled recently. A copy of a settled one still on its way (the server delivers a
/// message again when its ack wait passes first) is acknowledged, never given back: the
/// server may have taken the first ack as stale, and a give-back would deliver it twice.
#[derive(Default)]
pub struct Handback {
    pub held: Vec<Delivery>,
    pub settled: HashSet<DeliveryKey>,
}

/// A stream message read and not settled: its newest delivery's reply subject (the one
/// its ack goes to), the delivery whose records go on, and how many of its records are
/// not settled yet.
struct Held {
    reply: Subject,
    passing: Subject,
    unsettled: u32,
}

/// Enters a record of a message not just acknowledged: passed on when it belongs to the
/// message's first delivery here; a later delivery's only renews the ack subject.
fn admit(held: &mut HashMap<DeliveryKey, Held>, delivery: Delivery) -> Option<DeliveryKey> {
    let key = delivery.key();
    match held.get_mut(&key) {
        Some(held) if held.passing == delivery.reply => Some(key),
        Some(held) => {
            held.reply = delivery.reply;
            None
        }
        None => {
            held.insert(
                key,
                Held {
                    reply: delivery.reply.clone(),
                    passing: delivery.reply,
                    unsettled: delivery.records.max(1),
                },
            );
            Some(key)
        }
    }
}

pub struct Acks {
    client: Client,
    /// Read and not settled.
    held: HashMap<DeliveryKey, Held>,
    /// Settled, to acknowledge at the next commit.
    settled: Vec<(DeliveryKey, Subject)>,
    /// Recently acknowledged, oldest first.
    recent: VecDeque<DeliveryKey>,
    recent_set: HashSet<DeliveryKey>,
    /// What is kept alive until acknowledged.
    in_flight: Arc<InFlight>,
}

impl Acks {
    pub(super) fn new(client: Client, in_flight: Arc<InFlight>) -> Acks {
        Acks {
            client,
            held: HashMap::new(),
            settled: Vec::new(),
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            in_flight,
        }
    }

    /// A record delivered to the engine. `None` when its stream message was delivered
    /// again and is held already (the newer handle is kept) or was just acknowledged (it
    /// is acknowledged again, in case the first ack was lost): either way not sent twice.
    /// Only the first delivery's records go on: a pack's repeat brings all its records
    /// again, and every one of them is left out.
    pub fn read(&mut self, delivery: Delivery) -> Option<DeliveryKey> {
        let key = delivery.key();
        if self.recent_set.contains(&key) {
            self.settled.push((key, delivery.reply));
            return None;
        }
        admit(&mut self.held, delivery)
    }

    /// One record is delivered or durably dead-lettered; its stream message is settled
    /// with its last record. Remembered at once, so that a copy the server sends again
    /// before the ack goes out is acknowledged, not sent.
    pub fn settle(&mut self, key: DeliveryKey) {
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        held.unsettled = held.unsettled.saturating_sub(1);
        if held.unsettled == 0 {
            if let Some(held) = self.held.remove(&key) {
                self.settled.push((key, held.reply));
                self.remember(key);
            }
        }
    }

    /// Whether settled messages wait for their acknowledgement.
    pub fn has_unsaved(&self) -> bool {
        !self.settled.is_empty()
    }

    /// Acknowledges everything settled. On an error the rest stay for the next commit.
    pub async fn commit(&mut self) -> Result<(), async_nats::Error> {
        while let Some((key, reply)) = self.settled.pop() {
            if let Err(e) = send(&self.client, &reply, AckKind::Ack).await {
                self.settled.push((key, reply));
                return Err(e);
            }
            self.in_flight.done(&key);
        }
        Ok(())
    }

    /// Gives up the held messages (at stop), for the feed to hand back to the stream.
    pub fn release(&mut self) -> Handback {
        let held = self
            .held
            .drain()
            .map(|((consumer, epoch, sequence), held)| Delivery {
                consumer,
                epoch,
                sequence,
                reply: held.reply,
                records: held.unsettled,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(reply: &str) -> Delivery {
        Delivery {
            consumer: 3,
            epoch: 0,
            sequence: 42,
            reply: Subject::from(reply),
            records: 3,
        }
    }

    #[test]
    fn a_repeat_of_a_held_pack_passes_none_of_its_records() {
        let mut held = HashMap::new();
        let first: Vec<_> = (0..2).map(|_| admit(&mut held, pack("r1"))).collect();
        // The repeat arrives between the first delivery's records.
        let repeat: Vec<_> = (0..3).map(|_| admit(&mut held, pack("r2"))).collect();
        let last = admit(&mut held, pack("r1"));
        assert_eq!(first, vec![Some((3, 0, 42)); 2]);
        assert_eq!(repeat, vec![None; 3], "a repeat's records are all left out");
        assert_eq!(last, Some((3, 0, 42)));
        let entry = &held[&(3, 0, 42)];
        assert_eq!(
            entry.reply,
            Subject::from("r2"),
            "acknowledged on the newest"
        );
        assert_eq!(entry.unsettled, 3);
    }
}
