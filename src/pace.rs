//! Pacing, shared by the delivery engine, the destinations that pace themselves and the
//! per-source quotas: token buckets (`rate` tokens per second, holding at most `burst`),
//! held by one instance or, on the shared log, by the whole cluster (`SharedBuckets`),
//! and exponential backoff with full jitter under a floor a destination asks for
//! (`Retry-After`), clamped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::throttle::LogThrottle;

/// A token bucket's state, as one instance or the cluster's store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    /// Below 0 after a take larger than the burst: a debt paid by refilling.
    pub tokens: f64,
    /// When `tokens` was counted, in seconds on the keeper's clock.
    pub at: f64,
}

impl Bucket {
    /// A full bucket at `at`.
    pub fn full(burst: f64, at: f64) -> Bucket {
        Bucket { tokens: burst, at }
    }

    /// Refills for the time since it was counted (a clock that went back adds nothing).
    pub fn refill(&mut self, now: f64, rate: f64, burst: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = self.at.max(now);
    }

    /// Takes `n` tokens once `min(n, burst)` are there (so a take larger than the burst
    /// passes when the bucket is full, and leaves a debt), or says how long until then.
    pub fn take(&mut self, now: f64, rate: f64, burst: f64, n: f64) -> Option<Duration> {
        self.refill(now, rate, burst);
        let needed = n.min(burst);
        // A hair short is rounding in the refill: waiting for it would not move a paused
        // clock (the wait rounds to nothing) and would spin.
        if self.tokens >= needed - 1e-9 {
            self.tokens -= n;
            None
        } else {
            // Capped so a tiny rate cannot overflow the Duration; callers ask again.
            Some(Duration::from_secs_f64(
                ((needed - self.tokens) / rate).min(3600.0),
            ))
        }
    }
}

/// Token buckets the whole cluster shares (a KV bucket beside the shared log), so that
/// a rate limit or quota holds for all instances together rather than for each.
pub trait SharedBuckets: Send + Sync {
    /// Takes `n` tokens from the bucket `key` (refilled at `rate`, at most `burst`; see
    /// `Bucket::take`), or says how long until there will be enough. `Err`: the store
    /// cannot be reached, and why.
    fn take<'a>(&'a self, key: &'a str, rate: f64, burst: f64, n: f64) -> Taking<'a>;
}

/// A shared store's answer to `take`: the wait until there are enough tokens (`None`:
/// taken now), or why the store cannot be reached.
pub type Taking<'a> = Pin<Box<dyn Future<Output = Result<Option<Duration>, String>> + Send + 'a>>;

/// The cluster's buckets, once the shared log installed them at start.
static SHARED: OnceLock<Arc<dyn SharedBuckets>> = OnceLock::new();

/// Makes every limiter named after this call hold for the whole cluster.
pub fn share_buckets(store: Arc<dyn SharedBuckets>) {
    let _ = SHARED.set(store);
}

/// How often a limiter falling back to its own bucket says so.
static FALLBACK_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(30));

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
    /// A named limit's key in the cluster's store, once there is one (`share_buckets`).
    key: Option<String>,
    /// A store given to this limiter alone, in place of the cluster's.
    store: Option<Arc<dyn SharedBuckets>>,
    start: Instant,
}

impl RateLimiter {
    /// A limiter this instance keeps on its own.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: f64::from(burst),
            state: Mutex::new(Bucket::full(f64::from(burst), 0.0)),
            key: None,
            store: None,
            start: Instant::now(),
        }
    }

    /// A limiter for the limit `key` (e.g. `d.<destination>`): shared by the cluster
    /// when the buckets are (`share_buckets`, looked up at each take, so it may come
    /// later), this instance's own otherwise.
    pub fn named(key: &str, rate: f64, burst: u32) -> RateLimiter {
        let mut limiter = RateLimiter::new(rate, burst);
        limiter.key = Some(key.to_string());
        limiter
    }

    /// `named`, in `store` rather than the cluster's.
    pub fn named_in(store: Arc<dyn SharedBuckets>, key: &str, rate: f64, burst: u32) -> Self {
        let mut limiter = RateLimiter::named(key, rate, burst);
        limiter.store = Some(store);
        limiter
    }

    /// The cluster's store and this limit's key there, when the limit is shared.
    fn shared(&self) -> Option<(&dyn SharedBuckets, &str)> {
        let key = self.key.as_deref()?;
        Some((self.store.as_ref().or(SHARED.get())?.as_ref(), key))
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Waits until `n` tokens are available and takes them. More than `burst` is
    /// taken as `burst` (batches are sized to fit, so this only guards misuse). Shared:
    /// this instance's bucket first (which holds what the receiver said is left), then
    /// the cluster's.
    pub async fn acquire(&self, n: u32) {
        let n = f64::from(n).min(self.burst);
        while let Some(wait) = self.try_take(n, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let Some((store, key)) = self.shared() else {
            return;
        };
        loop {
            match store.take(key, self.rate, self.burst, n).await {
                Ok(None) => return,
                Ok(Some(wait)) => tokio::time::sleep(wait).await,
                Err(why) => return fallback(key, &why),
            }
        }
    }

    /// Takes `n` tokens if they are there (a take larger than the burst once the bucket
    /// is full: see `Bucket::take`), or says how long until they will be. Shared: the
    /// cluster's bucket alone.
    pub async fn try_acquire(&self, n: u32) -> Result<(), Duration> {
        let n = f64::from(n);
        if let Some((store, key)) = self.shared() {
            match store.take(key, self.rate, self.burst, n).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(wait),
                Err(why) => fallback(key, &why),
            }
        }
        let now = self.seconds(Instant::now());
        let mut bucket = self.state.lock().expect("rate limiter lock poisoned");
        match bucket.take(now, self.rate, self.burst, n) {
            None => Ok(()),
            Some(wait) => Err(wait),
        }
    }

    /// What the receiver says is left of its current window (`RateLimit-Remaining`, and
    /// `RateLimit-Reset` until it renews): never assume more than that; with nothing
    /// left, the next request waits for the reset.
    pub fn observe(&self, remaining: u32, reset: Duration) {
        let now = self.seconds(Instant::now());
        let mut bucket = self.state.lock().expect("rate limiter lock poisoned");
        bucket.refill(now, self.rate, self.burst);
        let floor = if remaining == 0 {
            -reset.as_secs_f64().min(3600.0) * self.rate
        } else {
            f64::from(remaining)
        };
        bucket.tokens = bucket.tokens.min(floor);
    }

    /// Takes `n` tokens (at most `burst`) from this instance's bucket, or says how long
    /// until they will be there.
    fn try_take(&self, n: f64, now: Instant) -> Option<Duration> {
        let now = self.seconds(now);
        let mut bucket = self.state.lock().expect("rate limiter lock poisoned");
        bucket.take(now, self.rate, self.burst, n)
    }

    fn seconds(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// The cluster's store cannot be reached: this instance's own bucket alone limits until
/// it can (the cluster may then exceed the limit; ingest and delivery need it anyway).
fn fallback(key: &str, why: &str) {
    if FALLBACK_LOG.ready() {
        tracing::warn!(
            limit = key,
            why,
            "the cluster's rate limits cannot be read; each instance limits on its own meanwhile"
        );
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

    #[tokio::test(start_paused = true)]
    async fn a_quota_larger_than_its_burst_passes_when_full_and_leaves_a_debt() {
        let quota = RateLimiter::named("s.test", 10.0, 20);
        assert_eq!(quota.try_acquire(15).await, Ok(()));
        // 5 left: 15 more need 1 s of refill.
        let wait = quota.try_acquire(15).await.unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // 50 > burst: refused until the bucket is full (10 of 20 after 0.5 s: 1 s more),
        // then taken whole.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let wait = quota.try_acquire(50).await.unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        tokio::time::sleep(wait).await;
        assert_eq!(quota.try_acquire(50).await, Ok(()));
        // A debt of 30: one event waits 3.1 s.
        let wait = quota.try_acquire(1).await.unwrap_err();
        assert!((wait.as_secs_f64() - 3.1).abs() < 1e-6, "{wait:?}");
    }

    /// A store that counts what it is asked for and keeps one bucket per key.
    struct Counting(Mutex<std::collections::HashMap<String, (Bucket, u32)>>);

    impl SharedBuckets for Counting {
        fn take<'a>(&'a self, key: &'a str, rate: f64, burst: f64, n: f64) -> Taking<'a> {
            let mut buckets = self.0.lock().unwrap();
            let (bucket, asked) = buckets
                .entry(key.to_string())
                .or_insert((Bucket::full(burst, 0.0), 0));
            *asked += 1;
            // No time passes in the test that uses it.
            let taken = bucket.take(0.0, rate, burst, n);
            Box::pin(async move { Ok(taken) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn named_limiters_share_the_store_s_bucket() {
        let store = Arc::new(Counting(Mutex::new(Default::default())));
        let a = RateLimiter::named_in(store.clone(), "d.hook", 10.0, 10);
        let b = RateLimiter::named_in(store.clone(), "d.hook", 10.0, 10);
        // Two instances' limiters on one key: 10 between them, not 10 each.
        assert_eq!(a.try_acquire(6).await, Ok(()));
        assert!(b.try_acquire(6).await.is_err());
        assert_eq!(b.try_acquire(4).await, Ok(()));
        assert_eq!(store.0.lock().unwrap()["d.hook"].1, 3);
        // Waiting for tokens asks the store again, and the instance's own bucket first.
        let c = RateLimiter::named_in(store.clone(), "d.other", 10.0, 10);
        c.acquire(10).await;
        let (bucket, asked) = store.0.lock().unwrap()["d.other"];
        assert_eq!((bucket.tokens, asked), (0.0, 1));
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
