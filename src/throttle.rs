//! Spacing out log lines about a condition that repeats (a full disk, an unreachable
//! store): the first occurrence and then one line per interval, never a flood.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogThrottle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval,
            last: Mutex::new(None),
        }
    }

    /// True when a line may be written now (and counts it as written).
    pub fn ready(&self) -> bool {
        let mut last = self.last.lock().expect("log throttle poisoned");
        if last.is_some_and(|t| t.elapsed() < self.interval) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_line_through_per_interval() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        assert!(throttle.ready());
        assert!(!throttle.ready());
        std::thread::sleep(Duration::from_millis(60));
        assert!(throttle.ready());
    }
}
