//! Keeps alive every message delivered to this instance for a destination until it is
//! acknowledged or given back: waiting in the channel to the engine, held back while a
//! puller catches up, or held by the engine. Each gets a progress signal (`+WPI`) once
//! half its ack wait has passed since it was delivered or last signalled, so that a busy
//! instance's messages are not delivered again elsewhere (a short `queue.ack_wait` under
//! load did that). The signals go from a task of their own, whatever the engine is doing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use tokio::time::Instant;

use super::delivery::{self, Delivery, DeliveryKey};

/// Messages delivered here and not yet acknowledged or given back.
#[derive(Default)]
pub(super) struct InFlight {
    held: Mutex<HashMap<DeliveryKey, Alive>>,
}

/// A message in flight: its newest delivery's reply subject, and when the server last
/// heard of it (its delivery, or a progress signal).
struct Alive {
    reply: Subject,
    since: Instant,
}

impl InFlight {
    /// A message arrived (again: the newer delivery's subject is the live one).
    pub(super) fn delivered(&self, delivery: &Delivery) {
        let mut held = self.held.lock().expect("in-flight poisoned");
        held.insert(
            delivery.key(),
            Alive {
                reply: delivery.reply.clone(),
                since: Instant::now(),
            },
        );
    }

    /// A message was acknowledged or given back: the server no longer waits on it here.
    pub(super) fn done(&self, key: &DeliveryKey) {
        self.held.lock().expect("in-flight poisoned").remove(key);
    }

    /// The reply subjects of messages last heard of before `before`, taken as signalled now.
    fn due(&self, before: Instant) -> Vec<Subject> {
        let now = Instant::now();
        let mut held = self.held.lock().expect("in-flight poisoned");
        held.values_mut()
            .filter(|alive| alive.since <= before)
            .map(|alive| {
                alive.since = now;
                alive.reply.clone()
            })
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.lock().expect("in-flight poisoned").len()
    }
}

/// Signals progress for the messages in flight that are half-way through their ack wait,
/// until the feed goes (it aborts this task).
pub(super) async fn keep_alive(in_flight: Arc<InFlight>, client: Client, ack_wait: Duration) {
    // Ticks well inside the half left: a message is signalled by 0.6 of its wait at most.
    let every = (ack_wait / 10).max(Duration::from_millis(100));
    let errors = crate::throttle::LogThrottle::new(Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let before = Instant::now().checked_sub(ack_wait / 2);
        let Some(before) = before else { continue };
        for reply in in_flight.due(before) {
            if let Err(e) = delivery::send(&client, &reply, AckKind::Progress).await {
                if errors.ready() {
                    tracing::warn!(error = %e, "cannot signal progress to NATS; held messages may be delivered again");
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(sequence: u64, reply: &str) -> Delivery {
        Delivery {
            consumer: 0,
            epoch: 0,
            sequence,
            reply: Subject::from(reply),
            records: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn messages_are_due_half_way_through_their_wait_until_done() {
        let in_flight = InFlight::default();
        in_flight.delivered(&delivery(1, "r1"));
        tokio::time::advance(Duration::from_secs(2)).await;
        in_flight.delivered(&delivery(2, "r2"));
        let half = Duration::from_millis(2500);
        tokio::time::advance(Duration::from_millis(600)).await;
        // Only the first is 2.5 s old; it is signalled and so not due again at once.
        assert_eq!(
            in_flight.due(Instant::now() - half),
            vec![Subject::from("r1")]
        );
        assert!(in_flight.due(Instant::now() - half).is_empty());
        // A new delivery of the second replaces its subject.
        in_flight.delivered(&delivery(2, "r2b"));
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut due = in_flight.due(Instant::now() - half);
        due.sort();
        assert_eq!(due, vec![Subject::from("r1"), Subject::from("r2b")]);
        in_flight.done(&(0, 0, 1));
        in_flight.done(&(0, 0, 2));
        assert_eq!(in_flight.len(), 0);
    }
}
