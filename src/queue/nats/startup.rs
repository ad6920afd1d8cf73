//! Start-up beside instances starting at the same moment: making the stream, consumers,
//! buckets and the dead-letter stream is idempotent, and a call that fails while the
//! cluster is busy (a new stream's leader not elected yet, a create racing another
//! instance's) is tried again until a deadline instead of ending the process.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::throttle::LogThrottle;

/// How long start-up keeps trying a call before giving up.
pub(super) const START_DEADLINE: Duration = Duration::from_secs(30);
/// The longest pause between tries.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// A failure trying again cannot mend (a stream that is not fanout's, a partition count
/// that differs): returned at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(pub String);

/// Runs `attempt` until it succeeds, fails with `Refused`, or `START_DEADLINE` passes
/// (the last error is returned then). `what` says what is tried, for the log.
pub async fn retried<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let until = Instant::now() + START_DEADLINE;
    let log = LogThrottle::new(Duration::from_secs(5));
    let mut pause = Duration::from_millis(100);
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if error.downcast_ref::<Refused>().is_some() || Instant::now() + pause >= until {
            return Err(error);
        }
        if log.ready() {
            tracing::warn!(error = %format!("{error:#}"), "{what} failed; trying again");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_call_is_tried_again_until_it_works() {
        let tries = AtomicU32::new(0);
        let value = retried("a call", || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(anyhow::anyhow!("timed out")),
                _ => Ok(7),
            }
        })
        .await
        .unwrap();
        assert_eq!((value, tries.load(Ordering::SeqCst)), (7, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_not_tried_again_and_a_deadline_ends_the_rest() {
        let tries = AtomicU32::new(0);
        let refused: anyhow::Result<()> = retried("a call", || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(Refused("not fanout's".into()).into())
        })
        .await;
        assert_eq!(refused.unwrap_err().to_string(), "not fanout's");
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        let started = Instant::now();
        let failing: anyhow::Result<()> =
            retried("a call", || async { Err(anyhow::anyhow!("timed out")) }).await;
        assert_eq!(failing.unwrap_err().to_string(), "timed out");
        assert!(started.elapsed() <= START_DEADLINE);
    }
}
