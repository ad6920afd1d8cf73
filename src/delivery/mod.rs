//! Stage 7: every destination consumes the queue on its own — its own cursor, batches,
//! concurrency, rate limit, retries and dead letters — so one slow or failing
//! destination delays only itself.

mod batch;
pub mod dead_letters;
mod engine;
mod lines;
mod rate_limit;
mod retry;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use dead_letters::DeadLetters;
pub use engine::ordering_key;
pub use rate_limit::RateLimiter;

use crate::config::DestinationConfig;
use crate::destinations::{AnyDestination, Destination};
use crate::queue::{Checkpoint, Queue};
use batch::DeliveryContext;
use retry::RetryPolicy;

/// Batches beyond `concurrency` a destination may hold unsettled: queued for a send
/// slot, or backing off. Lets other users' messages pass a retrying batch.
const EXTRA_OUTSTANDING: usize = 4;

/// The running delivery tasks.
pub struct Deliveries {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Deliveries {
    /// Starts a task for each configured destination.
    pub fn start(
        destinations: &[DestinationConfig],
        queue: &Queue,
        dead_letters: &Arc<DeadLetters>,
    ) -> anyhow::Result<Deliveries> {
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        for config in destinations {
            let (reader, cursor, saved) = queue.subscribe(&config.name)?;
            let destination = AnyDestination::build(config, saved)?;
            // A new destination, or a mark that measures another output (the path or the
            // kind changed): start from what is there now, and save that at once.
            let saved = match saved {
                Some(saved) if saved.sink_id == destination.sink_id() => saved,
                _ => {
                    let first = Checkpoint {
                        position: saved.map_or_else(|| reader.position(), |s| s.position),
                        sink_offset: destination.mark(),
                        sink_id: destination.sink_id(),
                    };
                    cursor.commit(first)?;
                    first
                }
            };
            let sequential = destination.sequential();
            let concurrency = if sequential { 1 } else { config.concurrency() };
            let limiter = config
                .rate_limit
                .as_ref()
                .map(|r| (RateLimiter::new(r.rate, r.burst()), r.per));
            let context = Arc::new(DeliveryContext {
                name: config.name.clone(),
                destination,
                policy: RetryPolicy::new(config.retry()),
                limiter,
                sends: Semaphore::new(concurrency),
                gate: Mutex::new(None),
                stop: stop.subscribe(),
            });
            let max_outstanding = if sequential {
                1
            } else {
                concurrency + EXTRA_OUTSTANDING
            };
            let engine = engine::Engine::new(
                context,
                dead_letters.clone(),
                engine::Shape {
                    limits: config.batch_limits(),
                    ordering: config.ordering() && !sequential,
                    max_outstanding,
                },
                reader,
                cursor,
                saved,
            );
            let span = tracing::info_span!("delivery", destination = %config.name);
            tasks.push(tokio::spawn(engine.run().instrument(span)));
        }
        Ok(Deliveries { stop, tasks })
    }

    /// Asks every task to stop after the sends under way and waits up to `grace`.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("deliveries still running after the shutdown grace period");
        }
    }
}
