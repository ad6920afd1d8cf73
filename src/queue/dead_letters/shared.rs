//! The dead-letter store beside the shared log: a stream of its own,
//! `<stream>_dead_letters`, one subject per destination (`<stream>.dead.<destination>`),
//! so every instance lists the same letters and any of them can replay them. A letter's
//! id is its sequence number in that stream.
//!
//! A replay moves letters back onto the shared log, on the destination's replay subject
//! (`<stream>.r.<destination>`, read by its `_replay` consumer), with their attempts so
//! far in headers, and then deletes them here: whichever instance delivers that
//! destination sends them, and one that fails again comes back as a new letter with its
//! attempts added up.
//!
//! Bounds: after each record, while the stream holds more than `max_bytes`, the oldest
//! letters go (down to nine tenths of it, so that a flood does not prune at every batch);
//! the stream's own limit, twice that, is a backstop should that fall behind.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{rfc3339, DeadLetter, Dropped, NewLetter};
use crate::message::{MessageType, Tag};
use crate::queue::nats::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER};
use crate::queue::{NatsQueue, RecordBatch};

/// Letters replayed per round (each round lists, republishes, then deletes).
const REPLAY_PAGE: usize = 500;
/// Letters looked at per fetch when looking for the ones to drop.
const SCAN_BATCH: usize = 1000;
/// What a stored letter costs the stream beside its subject and payload: its headers
/// and the store's own record header.
const STORED_OVERHEAD: u64 = 96;

pub struct SharedStore {
    queue: NatsQueue,
    stream: stream::Stream,
    /// `<stream>.dead`: a destination's letters are on `<prefix>.<destination>`.
    prefix: String,
    /// Past this many bytes in the stream, the oldest letters are dropped.
    max_bytes: u64,
    /// One drop at a time in this process, so no letter is counted twice.
    dropping: tokio::sync::Mutex<()>,
}

/// A letter as the stream holds it (its id and destination are its sequence and subject).
#[derive(Serialize, Deserialize)]
struct Stored {
    source: String,
    reason: String,
    status: Option<u16>,
    response: String,
    attempts: u32,
    first_attempt_at: String,
    dead_at: String,
    message: Box<RawValue>,
}

impl SharedStore {
    /// Opens the store's stream, creating it with the shared log's replicas if missing
    /// (and setting its backstop limit if it exists).
    pub async fn open(queue: NatsQueue, max_bytes: u64) -> anyhow::Result<SharedStore> {
        let main = &queue.names().stream;
        let name = format!("{main}_dead_letters");
        let prefix = format!("{main}.dead");
        let config = stream::Config {
            name: name.clone(),
            description: Some("fanout's dead letters".into()),
            subjects: vec![format!("{prefix}.*")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: queue.replicas(),
            duplicate_window: Duration::from_secs(120),
            // The backstop: JetStream drops the oldest past it, uncounted.
            max_bytes: i64::try_from(max_bytes.saturating_mul(2)).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let stream = queue.open_dead_letter_stream(config).await?;
        Ok(SharedStore {
            queue,
            stream,
            prefix,
            max_bytes,
            dropping: tokio::sync::Mutex::new(()),
        })
    }

    fn subject(&self, destination: Option<&str>) -> String {
        format!("{}.{}", self.prefix, destination.unwrap_or("*"))
    }

    /// Publishes the letters and waits for every acknowledgement. Each carries an id of
    /// its content, so a retry after a lost acknowledgement stores it once. The oldest
    /// letters make room first (and again after, had another instance stored some
    /// meanwhile); returns how many of each destination's went.
    pub async fn record(
        &self,
        destination: &str,
        new: &[NewLetter],
        at: DateTime<Utc>,
    ) -> anyhow::Result<Dropped> {
        let subject = self.subject(Some(destination));
        let mut letters = Vec::with_capacity(new.len());
        let mut incoming = 0;
        for (source, json, failure) in new {
            let text = String::from_utf8_lossy(json).into_owned();
            let message = RawValue::from_string(text.clone())
                .or_else(|_| RawValue::from_string(serde_json::to_string(&text)?))?;
            let stored = Stored {
                source: source.clone(),
                reason: failure.reason.as_str().to_string(),
                status: failure.status,
                response: failure.response.clone(),
                attempts: failure.attempts,
                first_attempt_at: rfc3339(failure.first_attempt_at),
                dead_at: rfc3339(at),
                message,
            };
            let id = xxhash_rust::xxh3::xxh3_128(
                format!(
                    "{destination}\u{0}{source}\u{0}{}\u{0}{text}",
                    stored.attempts
                )
                .as_bytes(),
            );
            let payload = serde_json::to_vec(&stored)?;
            incoming += payload.len() as u64 + subject.len() as u64 + STORED_OVERHEAD;
            letters.push((payload, id));
        }
        let mut dropped = self.drop_over_cap(incoming).await;
        let mut pending = Vec::with_capacity(letters.len());
        for (payload, id) in letters {
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(format!("dead-{id:032x}"));
            pending.push(
                self.queue
                    .context()
                    .send_publish(subject.clone(), publish)
                    .await?,
            );
        }
        for ack in pending {
            ack.await?;
        }
        for (destination, letters) in self.drop_over_cap(0).await {
            *dropped.entry(destination).or_default() += letters;
        }
        Ok(dropped)
    }

    /// While the stream would hold more than `max_bytes` with `incoming` more, drops the
    /// oldest letters down to nine tenths of it. Skipped while another drop runs (that
    /// one sees these letters); a failure is only logged, the letters are kept then.
    async fn drop_over_cap(&self, incoming: u64) -> Dropped {
        let Ok(_alone) = self.dropping.try_lock() else {
            return Dropped::new();
        };
        let dropping = async {
            let held = self.stream.get_info().await?.state.bytes + incoming;
            if held <= self.max_bytes {
                return Ok(Dropped::new());
            }
            let mut excess = held - self.max_bytes / 10 * 9;
            self.drop_oldest(|size, _| {
                let goes = excess > 0;
                excess = excess.saturating_sub(size);
                goes
            })
            .await
        };
        dropping.await.unwrap_or_else(|e: anyhow::Error| {
            static FAILED: crate::throttle::LogThrottle =
                crate::throttle::LogThrottle::new(Duration::from_secs(10));
            if FAILED.ready() {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot drop dead letters past dead_letters.max_bytes; trying again at the next letter"
                );
            }
            Dropped::new()
        })
    }

    /// Drops the letters stored before `cutoff` (by the stream's clock, which stamps them
    /// as it stores them).
    pub async fn drop_expired(&self, cutoff: DateTime<Utc>) -> anyhow::Result<Dropped> {
        let _alone = self.dropping.lock().await;
        let cutoff = time::OffsetDateTime::from_unix_timestamp(cutoff.timestamp())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let state = self.stream.get_info().await?.state;
        if state.messages == 0 || state.first_timestamp >= cutoff {
            return Ok(Dropped::new());
        }
        self.drop_oldest(|_, stored| stored < cutoff).await
    }

    /// Reads the letters oldest first (headers only) while `goes(size, stored at)` says
    /// the letter is dropped, then removes those in one purge.
    async fn drop_oldest(
        &self,
        mut goes: impl FnMut(u64, time::OffsetDateTime) -> bool,
    ) -> anyhow::Result<Dropped> {
        let reader = self
            .stream
            .create_consumer(pull::Config {
                description: Some("fanout: dead letters past their bounds".into()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                headers_only: true,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .context("cannot read the dead letters to drop")?;
        let mut dropped = Dropped::new();
        let mut through = None;
        let scanned = async {
            'reading: loop {
                let mut batch = reader
                    .fetch()
                    .max_messages(SCAN_BATCH)
                    .expires(Duration::from_millis(200))
                    .messages()
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
                let mut seen = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| anyhow::anyhow!(e))?;
                    seen += 1;
                    let info = message.info().map_err(|e| anyhow::anyhow!(e))?;
                    let payload = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Size"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    let size = payload + message.subject.len() as u64 + STORED_OVERHEAD;
                    if !goes(size, info.published) {
                        break 'reading;
                    }
                    let destination = message
                        .subject
                        .strip_prefix(&format!("{}.", self.prefix))
                        .unwrap_or(&message.subject);
                    *dropped.entry(destination.to_string()).or_default() += 1;
                    through = Some(info.stream_sequence);
                }
                if seen == 0 {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let name = reader.cached_info().name.clone();
        if let Err(e) = self.stream.delete_consumer(&name).await {
            tracing::debug!(error = %e, "the dead-letter reader goes by itself in 30 s");
        }
        scanned?;
        if let Some(last) = through {
            self.stream
                .purge()
                .sequence(last + 1)
                .await
                .context("cannot drop dead letters")?;
        }
        Ok(dropped)
    }

    /// Up to `limit` letters on `destination` (every destination when `None`) with an id
    /// above `after`, oldest first.
    pub async fn list(
        &self,
        destination: Option<&str>,
        after: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        let subject = self.subject(destination);
        let mut letters = Vec::new();
        let mut next = u64::try_from(after).unwrap_or(0) + 1;
        while letters.len() < limit {
            let found = self
                .stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await;
            let message = match found {
                Ok(message) => message,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(e).context("cannot read dead letters"),
            };
            next = message.sequence + 1;
            letters.push(self.letter(&message.subject, message.sequence, &message.payload)?);
        }
        Ok(letters)
    }

    fn letter(&self, subject: &str, sequence: u64, payload: &[u8]) -> anyhow::Result<DeadLetter> {
        let stored: Stored = serde_json::from_slice(payload)
            .with_context(|| format!("dead letter {sequence} is not one fanout stored"))?;
        let destination = subject
            .strip_prefix(&format!("{}.", self.prefix))
            .unwrap_or(subject)
            .to_string();
        Ok(DeadLetter {
            id: i64::try_from(sequence).unwrap_or(i64::MAX),
            destination,
            source: stored.source,
            reason: stored.reason,
            status: stored.status,
            response: stored.response,
            attempts: stored.attempts,
            first_attempt_at: stored.first_attempt_at,
            dead_at: stored.dead_at,
            replay: false,
            message: stored.message,
        })
    }

    /// Moves every letter of `destination` back onto the shared log; returns how many.
    /// A letter is deleted only once its copy on the log is acknowledged, and the copy's
    /// `Nats-Msg-Id` is the letter's, so a replay interrupted and asked for again sends
    /// each letter once (within the stream's duplicate window). The copies count as
    /// accepted at `now`.
    pub async fn request_replay(
        &self,
        destination: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<usize> {
        let consumer = self.queue.replay_consumer(destination);
        if !self.queue.has_consumer(&consumer).await? {
            anyhow::bail!(
                "destination `{destination}` has never run on stream `{}` (no consumer \
                 `{consumer}`): start fanout with it configured, then replay",
                self.queue.names().stream
            );
        }
        let target = self.queue.names().replay_subject(destination);
        let mut replayed = 0;
        loop {
            let letters = self.list(Some(destination), 0, REPLAY_PAGE).await?;
            if letters.is_empty() {
                return Ok(replayed);
            }
            let mut pending = Vec::with_capacity(letters.len());
            for letter in &letters {
                pending.push(self.republish(letter, &target, now).await?);
            }
            for ack in pending {
                ack.await.context("cannot replay dead letters")?;
            }
            let ids: Vec<i64> = letters.iter().map(|letter| letter.id).collect();
            self.remove(&ids).await?;
            replayed += letters.len();
            tracing::info!(
                destination,
                letters = letters.len(),
                "dead letters put back on the stream"
            );
        }
    }

    pub async fn remove(&self, ids: &[i64]) -> anyhow::Result<()> {
        for &id in ids {
            self.stream
                .delete_message(id as u64)
                .await
                .context("cannot delete a dead letter")?;
        }
        Ok(())
    }

    async fn republish(
        &self,
        letter: &DeadLetter,
        target: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let mut record = RecordBatch::with_capacity(letter.message.get().len() + 64);
        let accepted_at = now.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
        record
            // The type is not stored; the framing wants one for ingest's metrics.
            .push_with(&letter.source, MessageType::Track, |out| {
                out.extend_from_slice(letter.message.get().as_bytes());
                Ok::<_, std::convert::Infallible>(Tag {
                    key: [0; 3],
                    accepted_at,
                })
            })
            .expect("framing cannot fail");
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(record.into_bytes()))
            .message_id(format!("replay-{}-{}", self.prefix, letter.id))
            .header(ATTEMPTS_HEADER, letter.attempts.to_string().as_str())
            .header(FIRST_ATTEMPT_HEADER, letter.first_attempt_at.as_str());
        Ok(self
            .queue
            .context()
            .send_publish(target.to_string(), publish)
            .await?)
    }
}
