//! Watches the stream while fanout runs: keeps the held bytes current, clears `/ready`
//! once publishing can work again, and makes the stream, fanout's consumers and the
//! dead-letter stream again when they are gone (a server whose store was wiped, a
//! stream or consumer deleted by hand). What was lost with them cannot come back, so it
//! is said once, at ERROR: the sequence the stream had reached before and where the new
//! one starts.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use futures_util::TryStreamExt;

use super::Inner;

/// How often a failing stream is probed, and the stream's state read otherwise.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const STATE_INTERVAL: Duration = Duration::from_secs(5);

/// The stream as fanout last saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    /// When the stream was made: another time means another stream under the same name.
    pub created: time::OffsetDateTime,
    /// Messages held, as last read.
    pub messages: u64,
}

/// Keeps the held bytes current, and while publishing fails, probes the stream every
/// second so that `/ready` recovers without traffic: once the stream answers and (if it
/// was full) has room again. Makes a missing stream or consumer again.
pub(super) async fn watch_stream(inner: Weak<Inner>) {
    let mut last_state = tokio::time::Instant::now() - STATE_INTERVAL;
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let failing = inner.failing.is_failing();
        if !failing && last_state.elapsed() < STATE_INTERVAL {
            continue;
        }
        last_state = tokio::time::Instant::now();
        if inner.client.connection_state() != State::Connected {
            continue;
        }
        let Some((info, remade)) = stream_info(&inner).await else {
            continue;
        };
        restore_consumers(&inner, remade).await;
        restore_dead_letters(&inner).await;
        save_record(&inner).await;
        let held = info.state.bytes;
        inner.held_bytes.store(held, Ordering::Relaxed);
        // Full: ready again once the request refused last would fit.
        let refused = inner.refused_bytes.load(Ordering::Relaxed);
        if failing && held + refused <= inner.settings.max_bytes {
            inner.failing.set(None);
        }
    }
}

/// The stream's state, making the stream again if it is missing; with whether it is
/// another stream than the one seen before (made again here or elsewhere).
async fn stream_info(inner: &Inner) -> Option<(stream::Info, bool)> {
    let name = &inner.names.stream;
    let mut bumped = false;
    let info = match inner.stream.get_info().await {
        Ok(info) => info,
        Err(e) if is_missing(&e) => {
            // No publish goes out between the new stream and its consumers: a consumer
            // made after a message (it delivers what comes after it) never delivers it.
            let _remaking = inner.remaking.write().await;
            // Before the new stream exists, so that nothing read from it is taken for
            // one of the old stream's messages (its sequences start at 1 again).
            inner.epoch.fetch_add(1, Ordering::SeqCst);
            bumped = true;
            match inner.js.create_stream(inner.wanted.clone()).await {
                Ok(mut stream) => {
                    let info = stream.info().await.ok()?.clone();
                    restore_consumers(inner, true).await;
                    info
                }
                Err(e) => {
                    if inner.recovery_log.ready() {
                        tracing::error!(stream = %name, error = %e, "stream is missing and cannot be made again; ingest answers 503 until it can");
                    }
                    return None;
                }
            }
        }
        Err(_) => return None,
    };
    let before = {
        let mut seen = inner.seen.lock().expect("stream state poisoned");
        let before = *seen;
        *seen = Seen {
            created: info.created,
            messages: info.state.messages,
        };
        before
    };
    let known = inner
        .last_sequence
        .fetch_max(info.state.last_sequence, Ordering::SeqCst);
    if before.created == info.created {
        return Some((info, false));
    }
    if !bumped {
        inner.epoch.fetch_add(1, Ordering::SeqCst);
    }
    inner
        .last_sequence
        .store(info.state.last_sequence, Ordering::SeqCst);
    crate::metrics::nats_stream_recreated();
    tracing::error!(
        stream = %name,
        known_sequence = known,
        held_when_last_seen = before.messages,
        now_sequence = info.state.last_sequence,
        "stream `{name}` was recreated{}: messages up to seq {known} known before are gone \
         ({} were held, not yet delivered everywhere, when last seen); the new stream is at \
         seq {}",
        if bumped { " by this instance (it was missing)" } else { " (by another instance or by hand)" },
        before.messages,
        info.state.last_sequence,
    );
    Some((info, true))
}

/// Makes again every consumer in use here that the stream lacks. The pullers of a
/// consumer made again pull from it at their next request.
async fn restore_consumers(inner: &Inner, stream_remade: bool) {
    let wanted = inner.consumers.wanted();
    if wanted.is_empty() {
        return;
    }
    let present: HashSet<String> = match inner.stream.consumer_names().try_collect().await {
        Ok(names) => names,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the stream's consumers");
            return;
        }
    };
    let mut made = 0;
    for (name, config) in wanted {
        if present.contains(&name) {
            continue;
        }
        match inner.stream.create_consumer(config).await {
            Ok(_) => made += 1,
            Err(e) => {
                if inner.recovery_log.ready() {
                    tracing::error!(consumer = %name, error = %e, "consumer is missing and cannot be made again; retrying");
                }
                continue;
            }
        }
        if !stream_remade {
            let sequence = inner.last_sequence.load(Ordering::SeqCst);
            tracing::error!(
                consumer = %name,
                known_sequence = sequence,
                "consumer `{name}` was missing and is recreated: it delivers what the stream \
                 receives from now on; what it had not acknowledged up to seq {sequence} is \
                 not delivered by it"
            );
        }
    }
    if stream_remade && made > 0 {
        tracing::info!(
            consumers = made,
            "made the consumers again on the new stream"
        );
    }
}

/// Makes the dead-letter stream again if it is gone: without it no message can be
/// dead-lettered or blocked by a tracking plan. The letters it held cannot come back.
async fn restore_dead_letters(inner: &Inner) {
    let Some(wanted) = inner.dead_letters.lock().expect("poisoned").clone() else {
        return;
    };
    let name = wanted.name.clone();
    match inner.js.get_stream(&name).await {
        Err(e) if super::is_not_found(&e) => {}
        _ => return,
    }
    match inner.js.create_stream(wanted).await {
        Ok(_) => tracing::error!(
            stream = %name,
            "dead-letter stream `{name}` was missing and is recreated: the dead letters it \
             held are gone"
        ),
        Err(e) => {
            if inner.recovery_log.ready() {
                tracing::error!(stream = %name, error = %e, "dead-letter stream is missing and cannot be made again; retrying");
            }
        }
    }
}

/// Whether a stream request failed because the stream does not exist.
fn is_missing(e: &stream::InfoError) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// What this instance last saw of the stream, kept in `server.data_dir` so that a stream
/// made again while fanout was stopped is noticed at its next start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Saved {
    stream: String,
    created_unix: i64,
    created_nanos: u32,
    last_sequence: u64,
}

impl Saved {
    fn now(inner: &Inner) -> Saved {
        let created = inner.seen.lock().expect("stream state poisoned").created;
        Saved {
            stream: inner.names.stream.clone(),
            created_unix: created.unix_timestamp(),
            created_nanos: created.nanosecond(),
            last_sequence: inner.last_sequence.load(Ordering::SeqCst),
        }
    }

    fn created(&self) -> String {
        chrono::DateTime::from_timestamp(self.created_unix, self.created_nanos)
            .map_or_else(|| self.created_unix.to_string(), |t| t.to_rfc3339())
    }
}

impl super::NatsQueue {
    /// Says (at ERROR) if the stream is not the one this instance saw before it last
    /// stopped, as recorded in `data_dir`; then keeps that record current.
    pub async fn keep_record(&self, data_dir: &std::path::Path) {
        let inner = &self.inner;
        let path = data_dir.join(format!("nats-stream-{}.json", inner.names.stream));
        let now = Saved::now(inner);
        let before = tokio::fs::read(&path)
            .await
            .ok()
            .and_then(|text| serde_json::from_slice::<Saved>(&text).ok());
        if let Some(before) = before
            .filter(|b| (b.created_unix, b.created_nanos) != (now.created_unix, now.created_nanos))
        {
            crate::metrics::nats_stream_recreated();
            tracing::error!(
                stream = %now.stream,
                known_sequence = before.last_sequence,
                "stream `{}` is not the one this instance saw before it stopped (made {}, \
                 this one {}): messages up to seq {} known before are gone, unless \
                 queue.servers names other servers than then",
                now.stream,
                before.created(),
                now.created(),
                before.last_sequence,
            );
        }
        let _ = inner.record.set(path);
        save_record(inner).await;
    }
}

/// Writes the record when the stream moved on since it was last written.
async fn save_record(inner: &Inner) {
    let Some(path) = inner.record.get() else {
        return;
    };
    let now = Saved::now(inner);
    {
        let mut written = inner.record_written.lock().expect("record poisoned");
        if written.as_ref() == Some(&now) {
            return;
        }
        *written = Some(now.clone());
    }
    let text = serde_json::to_vec(&now).expect("the record serializes");
    let partial = path.with_extension("json.partial");
    let written = async {
        tokio::fs::write(&partial, text).await?;
        tokio::fs::rename(&partial, path).await
    };
    if let Err(e) = written.await {
        // Before `server.data_dir` exists, or a full disk: the next tick tries again.
        *inner.record_written.lock().expect("record poisoned") = None;
        tracing::debug!(path = %path.display(), error = %e, "cannot save what was seen of the stream");
    }
}
