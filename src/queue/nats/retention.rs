//! `server.retention` and replays on the shared log.
//!
//! The stream keeps a message while some consumer has not acknowledged it (interest
//! retention). One more consumer, fanout's own, acknowledges messages only once they are
//! older than the retention, or at once while the stream is near its byte budget (the
//! budget wins, as on the local log). Its acks never drop a message a destination still
//! needs: that destination's consumer keeps it. A replay reads the stream from a start
//! time with a consumer of its own and puts the messages on the destination's replay
//! subject, which its replay consumer delivers (as dead-letter replays are).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;

use super::NatsQueue;
use crate::queue::record::{read_record, ReadOutcome};

/// The durable consumer that holds messages for the retention time.
const CONSUMER: &str = "fanout_retention";
/// How often the retention consumer looks for messages that have aged out.
const TICK: Duration = Duration::from_secs(1);
/// Messages looked at per fetch.
const BATCH: usize = 256;
/// Above this share of `max_bytes`, retained messages go before their time.
const PRESSURE: f64 = 0.9;

/// Why a replay did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The stream no longer holds messages from `since`; it holds from this time on (or
    /// nothing).
    #[error("not retained")]
    NotRetained(Option<DateTime<Utc>>),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

fn offset(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        t.timestamp_nanos_opt().unwrap_or(0),
    ))
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn chrono_time(t: time::OffsetDateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())
}

impl NatsQueue {
    /// Keeps messages for `retention` (runs until the queue goes); with zero, removes the
    /// retention consumer so that nothing is held.
    pub async fn keep_retained(&self, retention: Duration) -> anyhow::Result<()> {
        let stream = &self.inner.stream;
        if retention.is_zero() {
            match stream.delete_consumer(CONSUMER).await {
                Ok(_) => tracing::info!("server.retention is 0s: stopped retaining the shared log"),
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(e).context("cannot remove the retention consumer"),
            }
            return Ok(());
        }
        let config = pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            description: Some("fanout: keeps messages for server.retention".into()),
            filter_subject: format!("{}.p.*", self.inner.names.stream),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            // Young messages are left unacknowledged and come back after this.
            ack_wait: Duration::from_secs(5),
            max_deliver: -1,
            max_ack_pending: (BATCH * 4) as i64,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config.clone())
            .await
            .context("cannot create the retention consumer")?;
        self.inner.consumers.keep(config);
        let queue = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = queue.age_out(&consumer, retention).await {
                    tracing::debug!(error = %e, "retention: cannot read the stream now");
                }
                tokio::time::sleep(TICK).await;
            }
        });
        Ok(())
    }

    /// Acknowledges, oldest first, every message older than `retention` (all of them
    /// while the stream is near its budget), up to the first younger one.
    async fn age_out(
        &self,
        consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
        retention: Duration,
    ) -> anyhow::Result<()> {
        let info = self.inner.stream.get_info().await?;
        let budget = self.inner.settings.max_bytes as f64;
        let pressed = info.state.bytes as f64 > budget * PRESSURE;
        // Compared with the times nats-server stamped the messages with, by its own clock.
        #[allow(clippy::disallowed_methods)]
        let cutoff = time::OffsetDateTime::now_utc() - retention;
        let mut evicted = 0u64;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(BATCH)
                .expires(Duration::from_millis(200))
                .messages()
                .await?;
            let mut seen = 0;
            let mut young = false;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!(e))?;
                seen += 1;
                if young {
                    continue;
                }
                let published = message.info().map_err(|e| anyhow::anyhow!(e))?.published;
                if published > cutoff && !pressed {
                    young = true;
                    continue;
                }
                if published > cutoff {
                    evicted += 1;
                }
                message.ack().await.map_err(|e| anyhow::anyhow!(e))?;
            }
            if young || seen < BATCH {
                break;
            }
        }
        if evicted > 0 {
            crate::metrics::retention_evicted(evicted);
            tracing::warn!(
                messages = evicted,
                "let retained messages go before their retention ended: the stream is near \
                 server.max_queue_bytes"
            );
        }
        Ok(())
    }

    /// Puts what the stream holds from `since` (to `until`) on `destination`'s replay
    /// subject; returns how many messages.
    pub async fn replay(
        &self,
        destination: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Result<u64, ReplayError> {
        let failed = |e: anyhow::Error| ReplayError::Failed(e);
        let stream = &self.inner.stream;
        let info = stream
            .get_info()
            .await
            .context("cannot read the stream")
            .map_err(failed)?;
        let state = &info.state;
        // Something was removed (sequences start at 1): a start before what is left may
        // miss messages.
        if state.first_sequence > 1 || state.messages == 0 {
            let oldest = (state.messages > 0)
                .then(|| chrono_time(state.first_timestamp))
                .flatten();
            if oldest.is_none_or(|oldest| since < oldest) && state.last_sequence > 0 {
                return Err(ReplayError::NotRetained(oldest));
            }
        }
        let last = state.last_sequence;
        let reader = stream
            .create_consumer(pull::Config {
                description: Some(format!("fanout: replay of `{destination}`")),
                filter_subject: format!("{}.p.*", self.inner.names.stream),
                deliver_policy: DeliverPolicy::ByStartTime {
                    start_time: offset(since),
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .context("cannot create a replay consumer")
            .map_err(failed)?;
        let target = self.inner.names.replay_subject(destination);
        let until = until.map(offset);
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut messages = 0u64;
        let mut pending = Vec::new();
        'reading: loop {
            let mut batch = reader
                .fetch()
                .max_messages(BATCH)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|e| failed(anyhow::anyhow!(e)))?;
            let mut seen = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| failed(anyhow::anyhow!(e)))?;
                seen += 1;
                let info = message.info().map_err(|e| failed(anyhow::anyhow!(e)))?;
                let sequence = info.stream_sequence;
                if sequence > last || until.is_some_and(|until| info.published > until) {
                    break 'reading;
                }
                messages += count_records(&message.payload);
                let publish = PublishMessage::build()
                    .payload(message.payload.clone())
                    .message_id(format!("replay-{run}-{sequence}"));
                let ack = self
                    .inner
                    .js
                    .send_publish(target.clone(), publish)
                    .await
                    .map_err(|e| failed(anyhow::anyhow!("cannot republish: {e}")))?;
                pending.push(ack);
                if pending.len() >= BATCH {
                    for ack in pending.drain(..) {
                        ack.await.map_err(|e| failed(anyhow::anyhow!(e)))?;
                    }
                }
                if sequence == last {
                    break 'reading;
                }
            }
            if seen == 0 {
                break;
            }
        }
        for ack in pending {
            ack.await.map_err(|e| failed(anyhow::anyhow!(e)))?;
        }
        let name = reader.cached_info().name.clone();
        if let Err(e) = stream.delete_consumer(&name).await {
            tracing::debug!(error = %e, "the replay consumer goes by itself in 30 s");
        }
        Ok(messages)
    }
}

/// How many records a stream message (a pack) holds.
fn count_records(mut payload: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok(ReadOutcome::Record { .. }) = read_record(&mut payload) {
        n += 1;
    }
    n
}
