//! A destination's consumer lag for `/metrics`.

use std::time::Duration;

use super::NatsQueue;

/// How often the consumers' lag is read.
const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// Sets the destination's consumer gauges every `LAG_INTERVAL`: messages not yet
/// delivered, delivered and not acknowledged, and delivered more than once; and its
/// partitions delivered here, of the live instances'.
pub(super) async fn report_lag(queue: NatsQueue, destination: String, consumers: Vec<String>) {
    crate::metrics::install();
    let gauges = crate::metrics::ConsumerGauges::register(&destination);
    loop {
        let mut sums = (0u64, 0u64, 0u64);
        let mut complete = true;
        for name in &consumers {
            match queue.inner.stream.consumer_info(name).await {
                Ok(info) => {
                    sums.0 += info.num_pending;
                    sums.1 += info.num_ack_pending as u64;
                    sums.2 += info.num_redelivered as u64;
                }
                Err(_) => complete = false,
            }
        }
        if complete {
            gauges.set(sums.0, sums.1, sums.2);
        }
        if let Some(membership) = queue.inner.membership.get() {
            let partitions = queue.inner.settings.partitions;
            let members = membership.members();
            let held = (0..partitions)
                .filter(|&k| members.borrow().owns(&destination, partitions, k))
                .count();
            crate::metrics::queue_share(membership.live_count(), Some((&destination, held)));
        }
        tokio::time::sleep(LAG_INTERVAL).await;
    }
}
