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

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{rfc3339, DeadLetter, NewLetter};
use crate::message::{MessageType, Tag};
use crate::queue::nats::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER};
use crate::queue::{NatsQueue, RecordBatch};

/// Letters replayed per round (each round lists, republishes, then deletes).
const REPLAY_PAGE: usize = 500;

pub struct SharedStore {
    queue: NatsQueue,
    stream: stream::Stream,
    /// `<stream>.dead`: a destination's letters are on `<prefix>.<destination>`.
    prefix: String,
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
    /// Opens the store's stream, creating it with the shared log's replicas if missing.
    pub async fn open(queue: NatsQueue) -> anyhow::Result<SharedStore> {
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
            ..Default::default()
        };
        let stream = queue
            .context()
            .get_or_create_stream(config)
            .await
            .with_context(|| format!("cannot open the dead-letter stream `{name}`"))?;
        Ok(SharedStore {
            queue,
            stream,
            prefix,
        })
    }

    fn subject(&self, destination: Option<&str>) -> String {
        format!("{}.{}", self.prefix, destination.unwrap_or("*"))
    }

    /// Publishes the letters and waits for every acknowledgement. Each carries an id of
    /// its content, so a retry after a lost acknowledgement stores it once.
    pub async fn record(
        &self,
        destination: &str,
        new: &[NewLetter],
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let subject = self.subject(Some(destination));
        let mut pending = Vec::with_capacity(new.len());
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
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(serde_json::to_vec(&stored)?))
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
        Ok(())
    }

    /// Letters on `destination` (every destination when `None`), oldest first.
    pub async fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        let subject = self.subject(destination);
        let mut letters = Vec::new();
        let mut next = 1;
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

    pub async fn count(&self, destination: &str) -> anyhow::Result<u64> {
        let counts: HashMap<String, usize> = self
            .stream
            .info_with_subjects(self.subject(Some(destination)))
            .await?
            .try_collect()
            .await?;
        Ok(counts.values().sum::<usize>() as u64)
    }

    pub async fn get(&self, id: i64) -> anyhow::Result<Option<DeadLetter>> {
        let Ok(sequence) = u64::try_from(id) else {
            return Ok(None);
        };
        match self.stream.get_raw_message(sequence).await {
            Ok(message) if message.subject.starts_with(&format!("{}.", self.prefix)) => Ok(Some(
                self.letter(&message.subject, message.sequence, &message.payload)?,
            )),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e).context("cannot read the dead letter"),
        }
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
    /// each letter once (within the stream's duplicate window).
    pub async fn request_replay(&self, destination: &str) -> anyhow::Result<usize> {
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
            let letters = self.list(Some(destination), REPLAY_PAGE).await?;
            if letters.is_empty() {
                return Ok(replayed);
            }
            let mut pending = Vec::with_capacity(letters.len());
            for letter in &letters {
                pending.push(self.republish(letter, &target).await?);
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
    ) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let mut record = RecordBatch::with_capacity(letter.message.get().len() + 64);
        let accepted_at = Utc::now().timestamp().clamp(0, i64::from(u32::MAX)) as u32;
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
