//! Metrics of the shared log (`queue.backend = "nats"`): the stream, publishes of unknown
//! outcome, each destination's consumers and the live instances sharing them.

use metrics::{counter, describe_counter, describe_gauge, gauge, Gauge};

const STREAM_RECREATED: &str = "fanout_queue_stream_recreated_total";
const PUBLISH_UNKNOWN: &str = "fanout_queue_publish_unknown_total";
const PUBLISH_UNTRACKED: &str = "fanout_queue_publish_unknown_untracked_total";
const CONSUMER_PENDING: &str = "fanout_queue_consumer_pending";
const CONSUMER_ACK_PENDING: &str = "fanout_queue_consumer_ack_pending";
const CONSUMER_REDELIVERED: &str = "fanout_queue_consumer_redelivered";
const CONSUMER_SHARE: &str = "fanout_queue_consumer_partitions";
const INSTANCES: &str = "fanout_queue_instances";

pub(super) fn describe() {
    describe_counter!(
        STREAM_RECREATED,
        "Times the shared log's NATS stream was found made again (a wiped server store, a \
         stream deleted): the messages it held are gone (the ERROR log says up to which \
         sequence)."
    );
    describe_counter!(
        PUBLISH_UNKNOWN,
        "Messages answered 503 whose publish to the shared log had an unknown outcome (no \
         acknowledgement in time): stored or not, a retry within queue.duplicate_window is \
         stored once."
    );
    describe_counter!(
        PUBLISH_UNTRACKED,
        "Messages of unknown outcome fanout no longer recognises (queue.duplicate_window \
         ended before a retry, no messageId, or the 64 MiB kept for retries was full): a \
         retry of one stores it again, a duplicate if the first publish was stored."
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "queue.backend = nats: messages on the stream a destination's consumers have not \
         delivered to any instance yet."
    );
    describe_gauge!(
        CONSUMER_ACK_PENDING,
        "queue.backend = nats: messages delivered to an instance for a destination and not \
         acknowledged yet (being delivered, held in order behind a retry, or on a dead \
         instance until the ack wait runs out)."
    );
    describe_gauge!(
        CONSUMER_REDELIVERED,
        "queue.backend = nats: of the destination's unacknowledged messages, those delivered \
         more than once (after an instance died, or a handover)."
    );
    describe_gauge!(
        CONSUMER_SHARE,
        "queue.backend = nats: partitions of a destination this instance delivers (its share)."
    );
    describe_gauge!(
        INSTANCES,
        "queue.backend = nats: live instances sharing the stream, this one included."
    );
}

/// The shared log's stream was found made again, its messages gone.
pub fn nats_stream_recreated() {
    counter!(STREAM_RECREATED).increment(1);
}

/// Messages whose publish to the shared log had an unknown outcome.
pub fn publish_unknown(messages: u64) {
    counter!(PUBLISH_UNKNOWN).increment(messages);
}

/// Messages of unknown outcome whose retry can no longer be recognised.
pub fn publish_unknown_untracked(messages: u64) {
    counter!(PUBLISH_UNTRACKED).increment(messages);
}

/// A destination's consumers on the shared log, as last read from the server.
pub struct ConsumerGauges {
    pending: Gauge,
    ack_pending: Gauge,
    redelivered: Gauge,
}

impl ConsumerGauges {
    pub fn register(destination: &str) -> ConsumerGauges {
        let name = destination.to_owned();
        ConsumerGauges {
            pending: gauge!(CONSUMER_PENDING, "destination" => name.clone()),
            ack_pending: gauge!(CONSUMER_ACK_PENDING, "destination" => name.clone()),
            redelivered: gauge!(CONSUMER_REDELIVERED, "destination" => name),
        }
    }

    pub fn set(&self, pending: u64, ack_pending: u64, redelivered: u64) {
        self.pending.set(pending as f64);
        self.ack_pending.set(ack_pending as f64);
        self.redelivered.set(redelivered as f64);
    }
}

/// The shared log's live instances, and how many of `destination`'s partitions are here.
pub fn queue_share(instances: usize, destination: Option<(&str, usize)>) {
    gauge!(INSTANCES).set(instances as f64);
    if let Some((destination, held)) = destination {
        gauge!(CONSUMER_SHARE, "destination" => destination.to_owned()).set(held as f64);
    }
}
