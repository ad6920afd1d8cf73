//! Per-function call metrics. The `function` label is the file as configured, so its
//! values are bounded by the config.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram, Counter, Histogram, Unit};

pub(super) const CALLS: &str = "fanout_function_calls_total";
pub(super) const CALL_DURATION: &str = "fanout_function_call_duration_seconds";

/// A call runs for well under a millisecond (pure JavaScript) up to its time limit
/// (a `fetch`, an endless loop stopped at 5 s by default).
pub(super) const CALL_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

pub(super) fn describe() {
    describe_counter!(
        CALLS,
        "Function handler calls, by file and outcome: returned, retry, timeout, \
         not_supported, invalid or error."
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Time a function's handler ran, its promise settled, by file."
    );
}

/// Outcomes a call can have, as the `outcome` label says them.
pub(super) const CALL_OUTCOMES: [&str; 6] = [
    "returned",
    "retry",
    "timeout",
    "not_supported",
    "invalid",
    "error",
];

/// One function's counters, looked up once when it loads.
pub struct FunctionMetrics {
    /// In the order of `CALL_OUTCOMES`.
    calls: [Counter; 6],
    duration: Histogram,
}

impl FunctionMetrics {
    pub fn new(function: &str) -> FunctionMetrics {
        let calls = CALL_OUTCOMES.map(
            |outcome| counter!(CALLS, "function" => function.to_owned(), "outcome" => outcome),
        );
        FunctionMetrics {
            calls,
            duration: histogram!(CALL_DURATION, "function" => function.to_owned()),
        }
    }

    /// Counts one call that ended with `outcome` (one of `CALL_OUTCOMES`) after `took`.
    pub fn record(&self, outcome: &str, took: Duration) {
        if let Some(i) = CALL_OUTCOMES.iter().position(|o| *o == outcome) {
            self.calls[i].increment(1);
        }
        self.duration.record(took.as_secs_f64());
    }
}
