//! One destination's reading of the shared log: a durable pull consumer per partition
//! (and one for its replayed dead letters), each pulled by a task of its own into one
//! channel the engine reads.
//!
//! Order across instances: every consumer uses the `pinned_client` priority policy, so
//! the server delivers a partition to one instance at a time. The pin can move while
//! messages are still out on another instance (the server may unpin at once when a
//! client disconnects), so a newly pinned puller first catches up: it holds what arrives
//! until the consumer's state shows every outstanding delivery came back to it, or the
//! ack wait has passed, and then forwards in stream order. A clean stop hands over at
//! once: it pauses the consumers of its share, gives back (naks) what it holds in stream
//! order, leaves the membership (the others start pulling its share), releases the pins,
//! resumes.
//!
//! Spread: each instance pulls only the partitions the live members assign it
//! (`members.rs`). When the assignment moves a partition, its old owner stops pulling
//! between requests, gives back what it held unforwarded and releases its pin; the new
//! owner, pulling all along, is pinned then and catches up as above: never two instances
//! delivering one partition at once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::consumers::{destination_config, Registration};
use super::keepalive::{keep_alive, InFlight};
use super::pull::{pull_into, Shared};
use super::startup::retried;
use super::{delivery as wire, lag, Delivery, Handback, NatsQueue, GROUP};
use crate::queue::Record;

/// Records waiting between the pull tasks and the engine.
const CHANNEL: usize = 1024;
/// Longest a stop pauses the consumers (they resume on their own if the process dies).
const HANDOVER_PAUSE: Duration = Duration::from_secs(10);

pub struct StreamFeed {
    queue: NatsQueue,
    destination: String,
    consumers: Vec<String>,
    records: mpsc::Receiver<Record<Delivery>>,
    /// Taken off the channel by `wait_for_data`, not yet read.
    peeked: Option<Record<Delivery>>,
    stop: watch::Sender<bool>,
    pullers: Vec<JoinHandle<Vec<Delivery>>>,
    lag: JoinHandle<()>,
    /// Everything delivered here and not acknowledged yet, kept alive by `keep_alive`.
    in_flight: Arc<InFlight>,
    keep_alive: JoinHandle<()>,
    /// Its consumers are made again if they go missing while it reads them.
    _registration: Registration,
}

impl StreamFeed {
    /// Makes (or updates) the destination's consumers and starts pulling them.
    pub(super) async fn open(queue: NatsQueue, destination: &str) -> anyhow::Result<StreamFeed> {
        let settings = &queue.inner.settings;
        let membership = queue.membership().await?;
        membership.reads(destination);
        let members = membership.members();
        let (tx, records) = mpsc::channel(CHANNEL);
        let in_flight = Arc::new(InFlight::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut consumers = Vec::new();
        let mut pullers = Vec::new();
        let mut configs = Vec::new();
        // The partitions, then the replays.
        for index in 0..=settings.partitions {
            let config = destination_config(&queue.inner.names, settings, destination, index);
            let name = queue.inner.names.consumer(destination, index);
            let consumer = retried("making a consumer", || async {
                queue
                    .inner
                    .stream
                    .create_consumer(config.clone())
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot create consumer `{name}` for destination `{destination}`: {e}"
                        )
                    })
            })
            .await?;
            pullers.push(tokio::spawn(pull_into(
                queue.clone(),
                consumer,
                index,
                tx.clone(),
                stop_rx.clone(),
                Shared {
                    members: members.clone(),
                    in_flight: in_flight.clone(),
                },
                destination.to_string(),
            )));
            consumers.push(name);
            configs.push(config);
        }
        let registration = queue.inner.consumers.register(configs);
        let lag = tokio::spawn(lag::report_lag(
            queue.clone(),
            destination.to_string(),
            consumers.clone(),
        ));
        let keep_alive = tokio::spawn(keep_alive(
            in_flight.clone(),
            queue.inner.client.clone(),
            settings.ack_wait,
        ));
        Ok(StreamFeed {
            in_flight,
            keep_alive,
            queue,
            destination: destination.to_string(),
            consumers,
            records,
            peeked: None,
            stop,
            pullers,
            lag,
            _registration: registration,
        })
    }

    /// What is delivered here and not acknowledged yet (the acks take it off).
    pub(super) fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    /// Waits for a record. False if every pull task is gone (nothing more will come).
    pub async fn wait_for_data(&mut self) -> bool {
        if self.peeked.is_none() {
            self.peeked = self.records.recv().await;
        }
        self.peeked.is_some()
    }

    pub fn has_more(&self) -> bool {
        self.peeked.is_some() || !self.records.is_empty()
    }

    /// What has arrived, up to `max_records` or about `max_bytes`.
    pub fn read(&mut self, max_records: usize, max_bytes: usize) -> Vec<Record<Delivery>> {
        let mut records = Vec::new();
        let mut bytes = 0;
        while records.len() < max_records && bytes < max_bytes {
            let next = match self.peeked.take() {
                Some(record) => record,
                None => match self.records.try_recv() {
                    Ok(record) => record,
                    Err(_) => break,
                },
            };
            bytes += next.json.len();
            records.push(next);
        }
        records
    }

    /// Hands the destination's partitions over at a clean stop: no delivery meanwhile,
    /// everything this instance holds given back in stream order (copies of what it
    /// settled acknowledged instead), pins released.
    pub async fn close(mut self, handback: Handback) {
        let stream = &self.queue.inner.stream;
        // Only this instance's share: the others' partitions go on undisturbed.
        let share = self.held_here().await;
        // nats-server reads the deadline against its own clock, so the system's it is.
        #[allow(clippy::disallowed_methods)]
        let until = time::OffsetDateTime::now_utc() + HANDOVER_PAUSE;
        for name in &share {
            if let Err(e) = stream.pause_consumer(name, until).await {
                tracing::warn!(consumer = %name, error = %e, "cannot pause the consumer for the handover");
            }
        }
        let _ = self.stop.send(true);
        let Handback { held, settled } = handback;
        let mut returned = held;
        for puller in self.pullers.drain(..) {
            if let Ok(drained) = puller.await {
                returned.extend(drained);
            }
        }
        self.records.close();
        returned.extend(self.peeked.take().map(|record| record.receipt));
        while let Some(record) = self.records.recv().await {
            returned.push(record.receipt);
        }
        // The others take this instance's share now: pulling, they are pinned as soon
        // as the pins are released below.
        if let Ok(membership) = self.queue.membership().await {
            membership.stops_reading(&self.destination).await;
        }
        // The server delivers naked messages again in the order it got the naks.
        // (A message whose records were split between the engine and a puller is in both.)
        returned.sort_by_key(|d| d.key());
        returned.dedup_by_key(|d| d.key());
        let count = returned.len();
        let client = &self.queue.inner.client;
        for delivery in returned {
            let kind = if settled.contains(&delivery.key()) {
                AckKind::Ack
            } else {
                AckKind::Nak(None)
            };
            let _ = wire::send(client, &delivery.reply, kind).await;
        }
        let _ = self.queue.inner.client.flush().await;
        for name in &share {
            if let Err(e) = stream.unpin_consumer(name, GROUP).await {
                tracing::debug!(consumer = %name, error = %e, "cannot unpin the consumer");
            }
            if let Err(e) = stream.resume_consumer(name).await {
                tracing::warn!(consumer = %name, error = %e, "cannot resume the consumer; it resumes by itself within seconds");
            }
        }
        self.lag.abort();
        self.keep_alive.abort();
        tracing::debug!(destination = %self.destination, returned = count, "handed the consumers over");
    }
}

impl StreamFeed {
    /// The consumers that are this instance's share now.
    async fn held_here(&self) -> Vec<String> {
        let Ok(membership) = self.queue.membership().await else {
            return self.consumers.clone();
        };
        let members = membership.members();
        let members = members.borrow();
        let partitions = self.queue.inner.settings.partitions;
        (0..=partitions)
            .zip(&self.consumers)
            .filter(|(index, _)| members.owns(&self.destination, partitions, *index))
            .map(|(_, name)| name.clone())
            .collect()
    }
}

impl Drop for StreamFeed {
    fn drop(&mut self) {
        // Without `close` (aborted): the server delivers the rest again after the ack wait.
        for puller in &self.pullers {
            puller.abort();
        }
        self.lag.abort();
        self.keep_alive.abort();
    }
}
