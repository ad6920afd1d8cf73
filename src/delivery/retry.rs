//! When to try a failed batch again: exponential backoff with full jitter, at least what
//! the destination asked for in `Retry-After` (clamped), and when to give up.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;

pub struct RetryPolicy {
    config: RetryConfig,
}

impl RetryPolicy {
    pub fn new(config: RetryConfig) -> RetryPolicy {
        RetryPolicy { config }
    }

    /// Delay before attempt `attempts + 1`, after `attempts` failures: a uniform pick in
    /// [0, min(max, initial × 2^(attempts−1))], raised to `retry_after` if the destination
    /// asked for more. Full jitter spreads retries of many batches apart.
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let ceiling = self
            .config
            .initial_backoff
            .saturating_mul(1 << exp)
            .min(self.config.max_backoff);
        let jittered = ceiling.mul_f64(fastrand::f64());
        match retry_after {
            Some(asked) => jittered.max(self.clamp_retry_after(asked)),
            None => jittered,
        }
    }

    pub fn clamp_retry_after(&self, asked: Duration) -> Duration {
        asked.min(self.config.max_retry_after)
    }

    /// True when a batch first tried at `first` has used up its attempts or time.
    pub fn exhausted(&self, attempts: u32, first: Instant, now: Instant) -> bool {
        (self.config.max_attempts > 0 && attempts >= self.config.max_attempts)
            || now.saturating_duration_since(first) >= self.config.max_age
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 3,
            max_age: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(5),
        })
    }

    #[test]
    fn backoff_is_jittered_under_a_growing_cap() {
        let p = policy();
        for _ in 0..200 {
            assert!(p.delay(1, None) <= Duration::from_millis(100));
            assert!(p.delay(3, None) <= Duration::from_millis(400));
            assert!(p.delay(40, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_is_clamped() {
        let p = policy();
        assert!(p.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn gives_up_after_attempts_or_age() {
        let p = policy();
        let t = Instant::now();
        assert!(!p.exhausted(2, t, t));
        assert!(p.exhausted(3, t, t));
        assert!(p.exhausted(1, t, t + Duration::from_secs(60)));
    }
}
