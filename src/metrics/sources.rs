//! Per-source quota metrics. The `source` label names a configured source, so its values
//! are bounded by the config.

use metrics::{counter, describe_counter};

const THROTTLED: &str = "fanout_source_throttled_total";

pub(super) fn describe() {
    describe_counter!(
        THROTTLED,
        "Events refused with 429 because their source was over its rate_limit \
         (sources[].rate_limit), by source."
    );
}

/// Counts `events` of a request refused for its source's quota.
pub fn source_throttled(source: &str, events: u64) {
    counter!(THROTTLED, "source" => source.to_owned()).increment(events);
}
