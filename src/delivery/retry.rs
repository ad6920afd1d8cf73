//! When to try a failed batch again (the backoff of `pace`) and when to give up.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::destinations::RetryConfig;
use crate::pace::Backoff;

pub struct RetryPolicy {
    pub backoff: Backoff,
    max_attempts: u32,
    max_age: Duration,
}

impl RetryPolicy {
    pub fn new(config: RetryConfig) -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff {
                initial: config.initial_backoff,
                max: config.max_backoff,
                max_retry_after: config.max_retry_after,
            },
            max_attempts: config.max_attempts,
            max_age: config.max_age,
        }
    }

    /// True when a batch first tried at `first` has used up its attempts or time.
    pub fn exhausted(&self, attempts: u32, first: Instant, now: Instant) -> bool {
        (self.max_attempts > 0 && attempts >= self.max_attempts)
            || now.saturating_duration_since(first) >= self.max_age
    }
}

/// Sleeps until `until`; false if shutdown came first.
pub async fn sleep_unless_stopped(stop: &mut watch::Receiver<bool>, until: Instant) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => true,
        _ = stop.wait_for(|&s| s) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_after_attempts_or_age() {
        let p = RetryPolicy::new(RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 3,
            max_age: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(5),
        });
        let t = Instant::now();
        assert!(!p.exhausted(2, t, t));
        assert!(p.exhausted(3, t, t));
        assert!(p.exhausted(1, t, t + Duration::from_secs(60)));
    }
}
