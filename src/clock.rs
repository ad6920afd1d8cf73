//! Wall-clock time, read through one seam. In production it is the system clock; in
//! tests it can follow tokio's clock from a fixed start, so that TTLs, retry ages and
//! timestamps are tested on paused time (`tokio::time::pause`) instead of by sleeping.
//! Durations and deadlines use `tokio::time::Instant`, which tokio pauses by itself.

use chrono::{DateTime, TimeDelta, Utc};

#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// `None`: the system clock. Else a start in wall time and on tokio's clock.
    follows: Option<(DateTime<Utc>, tokio::time::Instant)>,
}

impl Clock {
    /// The system clock.
    pub const fn system() -> Clock {
        Clock { follows: None }
    }

    /// Starts at `at` and moves as tokio's clock does (paused in tests).
    pub fn following_tokio(at: DateTime<Utc>) -> Clock {
        Clock {
            follows: Some((at, tokio::time::Instant::now())),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self.follows {
            // The one production read of the system clock: everything else comes here.
            #[allow(clippy::disallowed_methods)]
            None => Utc::now(),
            Some((at, start)) => {
                at + TimeDelta::from_std(start.elapsed()).unwrap_or(TimeDelta::MAX)
            }
        }
    }

    /// Unix seconds, as the dedupe window and the log's tags keep them.
    pub fn unix_secs(&self) -> u32 {
        self.now().timestamp().clamp(0, i64::from(u32::MAX)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    #[allow(clippy::disallowed_methods)] // compares the seam with the system clock itself
    async fn a_following_clock_moves_with_paused_time() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let clock = Clock::following_tokio(start);
        assert_eq!(clock.unix_secs(), 1_700_000_000);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(clock.unix_secs(), 1_700_000_090);
        let system = Clock::system().now();
        assert!((system - Utc::now()).num_seconds().abs() < 5);
    }
}
