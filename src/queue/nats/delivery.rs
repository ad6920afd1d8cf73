//! A stream message as a consumer delivered it, and the wire form of its
//! acknowledgements: shared by the acknowledgement book-keeping (`acks.rs`), the
//! keep-alive (`keepalive.rs`) and the pullers.

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};

/// A stream message as one consumer delivered it: where it is in the stream, the subject
/// its acknowledgement goes to (a handle of a few dozen bytes, many may be held), and how
/// many records it holds (a pack: one request's messages for one partition). Each record
/// read carries one; the message is acknowledged once all of its records are settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which of the destination's consumers delivered it (a partition, or the replays).
    pub consumer: u16,
    /// The stream's incarnation it came from: a stream made again (a wiped server store)
    /// numbers its messages from 1 again, and they are not the old ones.
    pub epoch: u32,
    /// Its sequence number in the stream.
    pub sequence: u64,
    pub(super) reply: Subject,
    pub(super) records: u32,
}

/// Identifies a message across its deliveries.
pub type DeliveryKey = (u16, u32, u64);

impl Delivery {
    pub fn key(&self) -> DeliveryKey {
        (self.consumer, self.epoch, self.sequence)
    }
}

/// Sends one acknowledgement (`AckKind`'s wire form) for a delivery.
pub(super) async fn send(
    client: &Client,
    reply: &Subject,
    kind: AckKind,
) -> Result<(), async_nats::Error> {
    client.publish(reply.clone(), kind.into()).await?;
    Ok(())
}
