//! Ingest's side of the shared log: a request's messages published in packs (one stream
//! message per partition), each acknowledged by the stream before the request is
//! answered. A publish without an acknowledgement has an unknown outcome: see
//! `unconfirmed.rs` for how its retry is kept from being stored twice.

use std::ops::Range;
use std::sync::atomic::Ordering;

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::unconfirmed::{Key, Pack as Published};
use super::NatsQueue;
use crate::message::Stamp;
use crate::queue::{QueueError, RecordBatch};

impl NatsQueue {
    /// Publishes a request's messages, each to its user's partition, and returns once
    /// every one is acknowledged by the stream.
    pub async fn append(&self, batch: RecordBatch) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.inner.client.connection_state() != State::Connected {
            return Err(QueueError::Unavailable("not connected to NATS".into()));
        }
        let framed: Vec<_> = batch.framed().collect();
        let bytes = batch.into_bytes();
        let size = bytes.len() as u64;
        let unconfirmed = &self.inner.unconfirmed;
        let now = Instant::now();
        // Sent in order on one connection, publishes before the guard is released reach
        // the server before a stream made again exists (and fail), or after its
        // consumers do (see recover.rs).
        let sending = self.inner.remaking.read().await;
        // Messages whose earlier publish had an unknown outcome: that pack goes again as
        // it was (the stream stores it at most once), and its messages are then stored.
        let keys: Vec<Key> = framed
            .iter()
            .filter(|(_, stamp)| stamp.tag.has_key())
            .map(|(_, stamp)| stamp.tag.key)
            .collect();
        for earlier in unconfirmed.holding(&keys, now) {
            let publish = PublishMessage::build()
                .payload(earlier.payload.clone())
                .message_id(earlier.id.clone());
            let sent = self.inner.js.send_publish(earlier.subject, publish).await;
            let ack = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(_) => unconfirmed.confirmed(&earlier.id, now),
                Err(e) => return Err(self.refused(e, size)),
            }
        }
        let stored_before = unconfirmed.stored_of(&keys, now);
        let framed: Vec<_> = framed
            .into_iter()
            .filter(|(_, stamp)| !(stamp.tag.has_key() && stored_before.contains(&stamp.tag.key)))
            .collect();
        let max_payload = self.inner.client.server_info().max_payload;
        let mut sent = Vec::new();
        let mut failure = None;
        for pack in packs(&framed, self.inner.names.partitions.len(), max_payload) {
            let subject = self.inner.names.partitions[pack.partition].clone();
            let published = pack.published(&bytes, subject.clone());
            let mut publish = PublishMessage::build().payload(published.payload.clone());
            if !published.id.is_empty() {
                publish = publish.message_id(published.id.clone());
            }
            match self.inner.js.send_publish(subject, publish).await {
                Ok(ack) => sent.push((published, ack)),
                Err(e) => {
                    failure = Some(self.refused(e, size));
                    break;
                }
            }
        }
        drop(sending);
        // Every pack sent is waited for, even after a failure: what was stored must be
        // known to keep a retry from storing it again.
        let mut stored = Vec::new();
        let mut unknown = Vec::new();
        for (published, ack) in sent {
            match ack.await {
                Ok(ack) => {
                    self.inner
                        .last_sequence
                        .fetch_max(ack.sequence, Ordering::Relaxed);
                    stored.extend(published.keys);
                }
                Err(e) => {
                    let error = self.refused(e, size);
                    if matches!(error, QueueError::Uncertain(_)) {
                        unknown.push(published);
                        failure = Some(error);
                    } else {
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        let Some(failure) = failure else {
            self.inner.refused_bytes.store(0, Ordering::Relaxed);
            self.inner.failing.set(None);
            return Ok(());
        };
        if !stored.is_empty() {
            unconfirmed.stored(stored, now);
        }
        for published in unknown {
            let messages = published.keys.len() as u64;
            crate::metrics::publish_unknown(messages);
            if published.id.is_empty() || !unconfirmed.unknown(published, now) {
                crate::metrics::publish_unknown_untracked(messages);
            }
        }
        Err(failure)
    }

    /// Maps a publish failure to why ingest answers 503, and remembers it for `/ready`.
    fn refused(&self, e: PublishError, size: u64) -> QueueError {
        let text = e.to_string();
        let error = if text.contains("maximum bytes") || text.contains("maximum messages") {
            self.inner.refused_bytes.store(size, Ordering::Relaxed);
            QueueError::Full(format!(
                "stream `{}` is at its limit of {} bytes; server.max_queue_bytes",
                self.inner.names.stream, self.inner.settings.max_bytes
            ))
        } else if e.kind() == PublishErrorKind::TimedOut {
            QueueError::Uncertain(format!(
                "no acknowledgement from stream `{}` in time (queue.publish_timeout)",
                self.inner.names.stream
            ))
        } else if e.kind() == PublishErrorKind::BrokenPipe {
            QueueError::Uncertain(format!(
                "the connection to NATS went before stream `{}` acknowledged",
                self.inner.names.stream
            ))
        } else {
            QueueError::Unavailable(text)
        };
        self.inner.failing.set(Some(error.to_string()));
        error
    }
}

/// The messages of one request that go to one partition, published as one stream
/// message: a fraction of the per-message cost (acks, storage, an fsync each with
/// `sync_interval: always`).
struct Pack<'a> {
    partition: usize,
    records: Vec<&'a (Range<usize>, Stamp)>,
    bytes: usize,
}

impl Pack<'_> {
    /// The stream message: its records' bytes, and (when every record has a dedupe key)
    /// a digest of their keys as `Nats-Msg-Id` (empty otherwise).
    fn published(&self, bytes: &[u8], subject: async_nats::Subject) -> Published {
        let mut payload = Vec::with_capacity(self.bytes);
        let mut keys = Vec::with_capacity(self.records.len());
        for (range, stamp) in &self.records {
            payload.extend_from_slice(&bytes[range.clone()]);
            if stamp.tag.has_key() {
                keys.push(stamp.tag.key);
            }
        }
        let id = if keys.len() == self.records.len() {
            pack_id(&keys)
        } else {
            String::new()
        };
        Published {
            id,
            subject,
            payload: payload.into(),
            keys,
        }
    }
}

/// Groups a request's records by partition, in order, each pack within `max_payload`
/// (a record alone may be bigger; the server then refuses it with a clear error).
fn packs(framed: &[(Range<usize>, Stamp)], partitions: usize, max_payload: usize) -> Vec<Pack<'_>> {
    let mut done = Vec::new();
    let mut open: Vec<Option<Pack>> = (0..partitions).map(|_| None).collect();
    for record in framed {
        let partition = (record.1.user % partitions as u64) as usize;
        let len = record.0.len();
        if let Some(pack) = &open[partition] {
            if pack.bytes + len > max_payload {
                done.extend(open[partition].take());
            }
        }
        let pack = open[partition].get_or_insert_with(|| Pack {
            partition,
            records: Vec::new(),
            bytes: 0,
        });
        pack.records.push(record);
        pack.bytes += len;
    }
    done.extend(open.into_iter().flatten());
    done
}

/// A pack's `Nats-Msg-Id`: a digest of its messages' dedupe keys, so a publish retried
/// after a lost acknowledgement (the same request, packed the same way) is stored once.
fn pack_id(keys: &[Key]) -> String {
    let mut hasher = Sha256::new();
    for key in keys {
        key.iter().for_each(|k| hasher.update(k.to_le_bytes()));
    }
    let digest = hasher.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}
