//! Pacing, shared by the delivery engine and the destinations that pace themselves:
//! an outbound token bucket (`rate` tokens per second, holding at most `burst`), and
//! exponential backoff with full jitter under a floor a destination asks for
//! (`Retry-After`), clamped.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            state: Mutex::new(Bucket {
                tokens: f64::from(burst),
                refilled: Instant::now(),
            }),
        }
    }

    /// Waits until `n` tokens are available and takes them. More than `burst` is
    /// taken as `burst` (batches are sized to fit, so this only guards misuse).
    pub async fn acquire(&self, n: u32) {
        let n = f64::from(n).min(self.burst);
        loop {
            let wait = self.try_take(n, Instant::now());
            match wait {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// What the receiver says is left of its current window (`RateLimit-Remaining`, and
    /// `RateLimit-Reset` until it renews): never assume more than that; with nothing
    /// left, the next request waits for the reset.
    pub fn observe(&self, remaining: u32, reset: Duration) {
        let now = Instant::now();
        let mut bucket = self.state.lock().expect("rate limiter lock poisoned");
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refilled = now;
        let floor = if remaining == 0 {
            -reset.as_secs_f64().min(3600.0) * self.rate
        } else {
            f64::from(remaining)
        };
        bucket.tokens = bucket.tokens.min(floor);
    }

    /// Takes `n` tokens, or says how long until they will be there.
    fn try_take(&self, n: f64, now: Instant) -> Option<Duration> {
        let mut bucket = self.state.lock().expect("rate limiter lock poisoned");
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refilled = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            None
        } else {
            // Capped so a tiny rate cannot overflow the Duration; the loop re-checks.
            let secs = ((n - bucket.tokens) / self.rate).min(3600.0);
            Some(Duration::from_secs_f64(secs))
        }
    }
}

/// Exponential backoff with full jitter, at least what a destination asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Longest `Retry-After` honoured; longer requests are clamped to it.
    pub max_retry_after: Duration,
}

impl Backoff {
    /// Delay before attempt `attempts + 1`, after `attempts` failures: a uniform pick in
    /// [0, min(max, initial × 2^(attempts−1))], raised to `retry_after` if the destination
    /// asked for more. Full jitter spreads retries of many batches apart.
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let ceiling = self.initial.saturating_mul(1 << exp).min(self.max);
        let jittered = ceiling.mul_f64(fastrand::f64());
        match retry_after {
            Some(asked) => jittered.max(self.clamp_retry_after(asked)),
            None => jittered,
        }
    }

    pub fn clamp_retry_after(&self, asked: Duration) -> Duration {
        asked.min(self.max_retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_receivers_remaining_count_wins() {
        let limiter = RateLimiter::new(10.0, 10);
        // The receiver says 2 are left of its window: only 2 go at once.
        limiter.observe(2, Duration::from_secs(1));
        let now = Instant::now();
        assert_eq!(limiter.try_take(2.0, now), None);
        assert!(limiter.try_take(1.0, now).is_some());
        // Nothing left until its reset in 3 s: the next one waits at least that long.
        limiter.observe(0, Duration::from_secs(3));
        let wait = limiter.try_take(1.0, Instant::now()).unwrap();
        assert!(wait >= Duration::from_secs(3), "{wait:?}");
        let start = Instant::now();
        limiter.acquire(1).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[test]
    fn burst_then_rate() {
        let limiter = RateLimiter::new(50.0, 50);
        let start = Instant::now();
        assert_eq!(limiter.try_take(50.0, start), None, "the burst is free");
        let wait = limiter.try_take(50.0, start).unwrap();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        let later = start + Duration::from_millis(500);
        let wait = limiter.try_take(50.0, later).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(limiter.try_take(25.0, later), None);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_paces_to_the_rate() {
        let limiter = RateLimiter::new(10.0, 10);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire(10).await;
        }
        // 50 tokens at 10/s with 10 up front: 4 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_millis(4100),
            "{took:?}"
        );
    }

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_is_jittered_under_a_growing_cap() {
        let b = backoff();
        for _ in 0..200 {
            assert!(b.delay(1, None) <= Duration::from_millis(100));
            assert!(b.delay(3, None) <= Duration::from_millis(400));
            assert!(b.delay(40, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_is_clamped() {
        let b = backoff();
        assert!(b.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }
}
