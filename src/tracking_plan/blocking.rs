//! Where a request's plan runs: on the blocking pool, a core's worth of requests at a time.
//!
//! Patterns run in linear time, yet a sloppy one still costs: `(?:[01]{0,10}1){10}2`
//! (12 KiB compiled) took ~80 ms (release build) over one 32 KiB string of random bits, so
//! a 500 KiB request could hold an async worker for a second. Off the workers, other
//! requests go on meanwhile; the permits keep plans from taking every core.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use super::{apply_to_batch, Blocked, TrackingPlan};
use crate::queue::RecordBatch;

/// As many plans run at once as there are cores.
fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Semaphore::new(cores)
    })
}

/// [`apply_to_batch`], off the async workers.
pub async fn apply_to_batch_off_workers(
    plan: Arc<TrackingPlan>,
    source: &str,
    records: RecordBatch,
) -> (RecordBatch, Vec<Blocked>) {
    let _permit = permits()
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let source = source.to_owned();
    match tokio::task::spawn_blocking(move || apply_to_batch(&plan, &source, records)).await {
        Ok(done) => done,
        // As if it had run here.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;
    use crate::message::{MessageType, Stamp, Tag};

    #[tokio::test(flavor = "current_thread")]
    async fn the_worker_runs_other_tasks_while_a_slow_plan_runs() {
        let plan = json!({ "events": { "Bits": { "properties": {
            "bits": { "type": "string", "pattern": "(?:[01]{0,10}1){10}2" } } } } });
        let plan = Arc::new(TrackingPlan::parse(&plan.to_string(), "plans/web.json").unwrap());
        // 8 messages of 32 KiB that the pattern must scan to the end, and fails.
        let mut records = RecordBatch::with_capacity(300 * 1024);
        for i in 0..8 {
            let bits: String = (0..32 * 1024)
                .map(|j| if (i + j) % 3 == 0 { '0' } else { '1' })
                .collect();
            let message = json!({ "type": "track", "event": "Bits", "userId": "u",
                                  "properties": { "bits": bits } });
            let json = serde_json::to_vec(&message).unwrap();
            let stamp = Stamp {
                tag: Tag {
                    key: [0; 3],
                    accepted_at: 0,
                },
                user: crate::routing::user_key(&json),
            };
            records
                .push_with("web", MessageType::Track, |out| {
                    out.extend_from_slice(&json);
                    Ok::<_, std::convert::Infallible>(stamp)
                })
                .unwrap();
        }
        // This runtime's only worker counts while it is free.
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        let (kept, blocked) = apply_to_batch_off_workers(plan, "web", records).await;
        assert!(ticks.load(Ordering::Relaxed) > 0, "the worker was held");
        ticker.abort();
        // Violations are allowed (and flagged) by default.
        assert_eq!((kept.len(), blocked.len()), (8, 0));
    }
}
