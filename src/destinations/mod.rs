//! Stage 8: destination kinds, one file each, behind one trait. The delivery engine
//! decides what to send and when; a destination only knows how to send one batch.

mod file;
mod http;
mod klaviyo;
mod segment;
mod stdout;
mod webhook;

use std::future::Future;
use std::time::Duration;

pub use file::FileDestination;
pub use http::{classify, parse_retry_after};
pub use klaviyo::{KlaviyoBodies, KlaviyoDestination, KlaviyoRequest};
pub use segment::{batch_body as segment_batch_body, SegmentDestination};
pub use stdout::StdoutDestination;
pub use webhook::WebhookDestination;

use crate::config::{DestinationConfig, DestinationKind};
use crate::queue::Checkpoint;

/// Why a batch was not delivered.
///
/// `detail` is fanout's own account (a status, an error code, a transport error without
/// the URL) and is safe to log; `answer` is the receiver's answer body, which can echo
/// message values or credentials, so it is kept only with the dead letter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later: transport failures, timeouts, 408/429/5xx, local I/O.
    #[error("{detail}")]
    Retryable {
        status: Option<u16>,
        /// What the destination asked for in `Retry-After`.
        retry_after: Option<Duration>,
        detail: String,
        answer: Option<String>,
    },
    /// The destination refused this content; sending it again cannot succeed.
    #[error("rejected with {status}: {detail}")]
    Rejected {
        status: u16,
        detail: String,
        answer: Option<String>,
    },
}

impl SendError {
    pub fn io(e: std::io::Error) -> SendError {
        SendError::Retryable {
            status: None,
            retry_after: None,
            detail: format!("I/O error: {e}"),
            answer: None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            SendError::Retryable { status, .. } => *status,
            SendError::Rejected { status, .. } => Some(*status),
        }
    }
}

/// What a destination makes of one message before any request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Send,
    /// Not for this destination by design (e.g. alias for Klaviyo): settled, not sent.
    Skip(&'static str),
    /// Cannot be sent as it is: dead-letter it with `code` and `detail`.
    Refuse {
        code: String,
        detail: String,
    },
}

/// Sends batches of messages (each one JSON object, as stored) in the order given.
pub trait Destination: Send + Sync + 'static {
    /// Looks at one message before it is batched for sending; most destinations send all.
    fn check(&self, _message: &[u8]) -> Check {
        Check::Send
    }

    /// Delivers the whole batch or fails as a whole. Returns the mark to save with the
    /// cursor (see `Checkpoint::sink_offset`); 0 when the destination has none.
    fn send(&self, messages: &[&[u8]]) -> impl Future<Output = Result<u64, SendError>> + Send;

    /// True when batches must go one at a time, in order, each retried until it succeeds
    /// (a local file whose length is saved with the cursor).
    fn sequential(&self) -> bool {
        false
    }

    /// Makes everything sent so far durable; called (blocking) before a cursor that
    /// passes it is saved. Only local sinks have anything to do.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// The mark as things stand now (saved with a new destination's first checkpoint).
    fn mark(&self) -> u64 {
        0
    }

    /// What the mark measures (see `Checkpoint::sink_id`); 0 when there is no mark.
    fn sink_id(&self) -> u64 {
        0
    }
}

/// Any configured destination; dispatches to the kind.
pub enum AnyDestination {
    File(FileDestination),
    Stdout(StdoutDestination),
    Webhook(WebhookDestination),
    Segment(SegmentDestination),
    /// Boxed: the mapping and three rate buckets make it the largest by far.
    Klaviyo(Box<KlaviyoDestination>),
}

impl AnyDestination {
    /// Builds the destination, reading its secrets from the environment. `saved` is its
    /// last checkpoint (the file destination cuts its output back to it).
    pub fn build(
        config: &DestinationConfig,
        saved: Option<Checkpoint>,
    ) -> anyhow::Result<AnyDestination> {
        Ok(match config.kind {
            DestinationKind::File => AnyDestination::File(FileDestination::open(config, saved)?),
            DestinationKind::Stdout => AnyDestination::Stdout(StdoutDestination::new()),
            DestinationKind::Webhook => AnyDestination::Webhook(WebhookDestination::new(config)?),
            DestinationKind::Segment => AnyDestination::Segment(SegmentDestination::new(config)?),
            DestinationKind::Klaviyo => {
                AnyDestination::Klaviyo(Box::new(KlaviyoDestination::new(config)?))
            }
        })
    }
}

impl AnyDestination {
    /// Checks that `config` can be built: its secrets are set, its URL parses, its output
    /// file can be opened. Without a checkpoint nothing is cut, so this touches no data.
    pub fn validate(config: &DestinationConfig) -> anyhow::Result<()> {
        AnyDestination::build(config, None).map(drop)
    }
}

impl Destination for AnyDestination {
    fn check(&self, message: &[u8]) -> Check {
        match self {
            AnyDestination::File(d) => d.check(message),
            AnyDestination::Stdout(d) => d.check(message),
            AnyDestination::Webhook(d) => d.check(message),
            AnyDestination::Segment(d) => d.check(message),
            AnyDestination::Klaviyo(d) => d.check(message),
        }
    }

    async fn send(&self, messages: &[&[u8]]) -> Result<u64, SendError> {
        match self {
            AnyDestination::File(d) => d.send(messages).await,
            AnyDestination::Stdout(d) => d.send(messages).await,
            AnyDestination::Webhook(d) => d.send(messages).await,
            AnyDestination::Segment(d) => d.send(messages).await,
            AnyDestination::Klaviyo(d) => d.send(messages).await,
        }
    }

    fn sequential(&self) -> bool {
        match self {
            AnyDestination::File(d) => d.sequential(),
            AnyDestination::Stdout(d) => d.sequential(),
            AnyDestination::Webhook(d) => d.sequential(),
            AnyDestination::Segment(d) => d.sequential(),
            AnyDestination::Klaviyo(d) => d.sequential(),
        }
    }

    fn flush(&self) -> std::io::Result<()> {
        match self {
            AnyDestination::File(d) => d.flush(),
            AnyDestination::Stdout(d) => d.flush(),
            AnyDestination::Webhook(d) => d.flush(),
            AnyDestination::Segment(d) => d.flush(),
            AnyDestination::Klaviyo(d) => d.flush(),
        }
    }

    fn mark(&self) -> u64 {
        match self {
            AnyDestination::File(d) => d.mark(),
            AnyDestination::Stdout(d) => d.mark(),
            AnyDestination::Webhook(d) => d.mark(),
            AnyDestination::Segment(d) => d.mark(),
            AnyDestination::Klaviyo(d) => d.mark(),
        }
    }

    fn sink_id(&self) -> u64 {
        match self {
            AnyDestination::File(d) => d.sink_id(),
            AnyDestination::Stdout(d) => d.sink_id(),
            AnyDestination::Webhook(d) => d.sink_id(),
            AnyDestination::Segment(d) => d.sink_id(),
            AnyDestination::Klaviyo(d) => d.sink_id(),
        }
    }
}

/// Reads a secret named by a `*_env` key; the error names the variable, never the value.
fn secret_from_env(destination: &str, key: &str, var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => anyhow::bail!(
            "destination `{destination}`: {key} names the environment variable `{var}`, \
             which is not set"
        ),
    }
}

/// One JSON line per message, as written by file-like destinations.
fn json_lines(messages: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum());
    for message in messages {
        out.extend_from_slice(message);
        out.push(b'\n');
    }
    out
}

/// `[m1,m2,…]` from messages that are each one JSON value.
fn json_array(messages: &[&[u8]], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(message);
    }
    out.push(b']');
}
