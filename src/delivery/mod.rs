//! Stage 7: every destination consumes the queue on its own — its own cursor, batches,
//! concurrency, rate limit, retries and dead letters — so one slow or failing
//! destination delays only itself.

mod batch;
mod context;
mod engine;
mod erasers;
mod insert;
mod lines;
mod live_view;
mod progress;
mod replay;
mod retry;
mod suppressed;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::clock::Clock;
use crate::control::{Changes, ReplayRefused};
use crate::destinations::{AnyDestination, DestinationConfig};
use crate::identity::{Fill, Identity};
use crate::metrics::DestinationGauges;
use crate::pace::RateLimiter;
use crate::queue::{Checkpoint, DeadLetters, Queue, Replay, ReplayError};
use crate::routing::Route;
use crate::suppression::Suppression;
use context::DeliveryContext;
pub use erasers::Erasers;
use progress::Progress;
use retry::RetryPolicy;

/// Batches beyond `concurrency` a destination may hold unsettled: queued for a send
/// slot, or backing off. Lets other users' messages pass a retrying batch.
const EXTRA_OUTSTANDING: usize = 4;

/// The running delivery tasks, one per configured destination, each with its own stop
/// signal so a reload can stop and start destinations one at a time.
pub struct Deliveries {
    runtime: tokio::runtime::Handle,
    clock: Clock,
    queue: Queue,
    dead_letters: Arc<DeadLetters>,
    /// Fills the messages of destinations with `enrich_identity`; `None` in tests.
    identity: Option<Arc<Identity>>,
    privacy: Privacy,
    running: BTreeMap<String, Running>,
}

/// What privacy regulations need of delivery: the suppressed subjects, whose messages
/// are skipped, and the running destinations, which deletions go to.
#[derive(Clone, Default)]
pub struct Privacy {
    pub suppression: Suppression,
    pub erasers: Erasers,
}

struct Running {
    config: DestinationConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Deliveries {
    /// Starts a task for each configured destination, on `runtime`.
    pub async fn start(
        destinations: &[DestinationConfig],
        queue: &Queue,
        dead_letters: &Arc<DeadLetters>,
        runtime: tokio::runtime::Handle,
        clock: Clock,
        identity: Option<Arc<Identity>>,
        privacy: Privacy,
    ) -> anyhow::Result<Deliveries> {
        let mut deliveries = Deliveries {
            runtime,
            clock,
            identity,
            privacy,
            queue: queue.clone(),
            dead_letters: dead_letters.clone(),
            running: BTreeMap::new(),
        };
        for config in destinations {
            deliveries.launch(config).await?;
        }
        Ok(deliveries)
    }

    /// Brings the running set in line with `destinations`: stops removed and changed
    /// destinations, then starts new and changed ones from their saved cursors. A removed
    /// destination's cursor stays, and keeps its part of the queue, until it is purged.
    ///
    /// Stopped engines are waited for without a time limit: one cut off in the middle of a
    /// local write could finish it after its successor started, and a file would get those
    /// lines twice. HTTP sends are cancelled on stop (and sent again by the successor), so
    /// only a stuck local write makes this slow. A destination that cannot start is
    /// reported in `failed`; a changed one goes back to the settings it ran with.
    pub async fn reconcile(&mut self, destinations: &[DestinationConfig]) -> Changes {
        let mut changes = Changes::default();
        let wanted = |name: &str| destinations.iter().find(|d| d.name == name);
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| wanted(name).is_none_or(|d| *d != running.config))
            .map(|(name, _)| name.clone())
            .collect();
        let stopping: Vec<Running> = stale
            .iter()
            .filter_map(|name| self.running.remove(name))
            .collect();
        for running in &stopping {
            let _ = running.stop.send(true);
            self.privacy.erasers.remove(&running.config.name);
        }
        let mut previous = BTreeMap::new();
        for running in stopping {
            let _ = running.task.await;
            let name = running.config.name.clone();
            if wanted(&name).is_some() {
                changes.changed.push(name.clone());
            } else {
                changes.removed.push(name.clone());
            }
            previous.insert(name, running.config);
        }
        for config in destinations {
            if self.running.contains_key(&config.name) {
                continue;
            }
            match self.launch(config).await {
                Ok(()) if previous.contains_key(&config.name) => {}
                Ok(()) => changes.added.push(config.name.clone()),
                Err(e) => {
                    changes.failed.push(format!("{e:#}"));
                    changes.changed.retain(|name| name != &config.name);
                    if let Some(old) = previous.get(&config.name) {
                        if let Err(e) = self.launch(old).await {
                            changes.failed.push(format!("(previous settings) {e:#}"));
                        }
                    }
                }
            }
        }
        changes
    }

    /// Delivers to `name` again what the retained log holds from the first message
    /// accepted at or after `since` (to `until`, when given); other destinations are not
    /// touched. Returns how many messages go again.
    ///
    /// On the local log the destination's engine is stopped, its cursor moved back, and
    /// it is started again (messages accepted after `until` and before where it stood are
    /// passed over while it runs). On the shared log the messages are put on the
    /// destination's replay subject, as dead-letter replays are.
    pub async fn replay(
        &mut self,
        name: &str,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Result<u64, ReplayRefused> {
        let Some(config) = self.running.get(name).map(|r| r.config.clone()) else {
            return Err(ReplayRefused::UnknownDestination(name.to_string()));
        };
        let rewind = match self.queue.replay(name, since, until).await? {
            Replay::Sent(messages) => return Ok(messages),
            Replay::Rewind(rewind) => rewind,
        };
        let running = self.running.remove(name).expect("looked up above");
        let _ = running.stop.send(true);
        let _ = running.task.await;
        // Again, from where the stopped engine saved its cursor.
        let moved = rewind.apply().await;
        // Whatever happened, the destination runs again.
        if let Err(e) = self.launch(&config).await {
            return Err(ReplayRefused::Failed(e));
        }
        let messages = moved?;
        tracing::info!(
            destination = name,
            %since,
            until = ?until,
            messages,
            "replaying from the retained log"
        );
        Ok(messages)
    }

    /// The settings of every running destination.
    pub fn configs(&self) -> Vec<DestinationConfig> {
        self.running.values().map(|r| r.config.clone()).collect()
    }

    /// Starts one destination's engine from its saved cursor.
    async fn launch(&mut self, config: &DestinationConfig) -> anyhow::Result<()> {
        let clock = self.clock;
        self.launch_with(config, |saved| config.build(saved, clock))
            .await
    }

    /// `launch`, with the destination made by `build` from the saved checkpoint (the
    /// engine's tests hand it a fake one).
    async fn launch_with(
        &mut self,
        config: &DestinationConfig,
        build: impl FnOnce(Option<Checkpoint>) -> anyhow::Result<AnyDestination>,
    ) -> anyhow::Result<()> {
        let (stop, stop_rx) = watch::channel(false);
        let subscription = self.queue.subscribe(&config.name).await?;
        crate::metrics::install();
        let gauges = DestinationGauges::register(&config.name, self.clock);
        let destination = build(subscription.saved())?;
        let insert = match &config.insert_function {
            Some(sandbox) => Some(sandbox.start(None).map_err(|e| {
                anyhow::anyhow!("destination `{}`: insert_function: {e}", config.name)
            })?),
            None => None,
        };
        let feed = subscription.start(|| destination.mark(), destination.sink_id());
        let progress = Progress::new(feed, gauges);
        let sequential = destination.sequential();
        let concurrency = if sequential { 1 } else { config.concurrency() };
        let limiter = config.http.rate_limit.as_ref().map(|r| {
            (
                RateLimiter::named(&format!("d.{}", config.name), r.rate, r.burst()),
                r.per,
            )
        });
        let context = Arc::new(DeliveryContext {
            name: config.name.clone(),
            route: Route::new(&config.name, config.kind(), &config.route),
            identity: self
                .identity
                .clone()
                .filter(|_| config.enrich_identity)
                .map(|store| {
                    let route = &config.route;
                    let paths = route.drop_fields.iter().chain(&route.hash_fields);
                    let renamed = route.rename.iter().flat_map(|(from, to)| [from, to]);
                    (
                        store,
                        Fill::except(paths.chain(renamed).map(String::as_str)),
                    )
                }),
            destination,
            suppression: self.privacy.suppression.clone(),
            insert,
            policy: RetryPolicy::new(config.retry()),
            limiter,
            sends: Semaphore::new(concurrency),
            gate: Mutex::new(None),
            stop: stop_rx,
            clock: self.clock,
        });
        let max_outstanding = if sequential {
            1
        } else {
            concurrency + EXTRA_OUTSTANDING
        };
        self.privacy.erasers.insert(context.clone());
        let engine = engine::Engine::new(
            context,
            self.dead_letters.clone(),
            engine::Shape {
                limits: config.batch_limits(),
                ordering: config.ordering() && !sequential,
                max_outstanding,
            },
            progress,
        );
        let span = tracing::info_span!("delivery", destination = %config.name);
        let task = self.runtime.spawn(engine.run().instrument(span));
        self.running.insert(
            config.name.clone(),
            Running {
                config: config.clone(),
                stop,
                task,
            },
        );
        Ok(())
    }

    /// Asks every task to stop after the sends under way and waits up to `grace`.
    pub async fn stop(self, grace: Duration) {
        stop_all(self.running.into_values(), grace).await;
    }
}

/// Signals each engine to stop, then waits up to `grace` for all of them; an engine
/// still running then is aborted (what it had not saved is delivered again later).
async fn stop_all(engines: impl IntoIterator<Item = Running>, grace: Duration) {
    let mut tasks = Vec::new();
    for running in engines {
        let _ = running.stop.send(true);
        tasks.push((running.config.name, running.task));
    }
    let deadline = tokio::time::Instant::now()
        .checked_add(grace)
        .unwrap_or_else(far_future);
    for (name, mut task) in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!(destination = %name, "delivery still running after the grace period; cut off");
            task.abort();
        }
    }
}

impl From<ReplayError> for ReplayRefused {
    fn from(e: ReplayError) -> ReplayRefused {
        match e {
            ReplayError::NotRetained(oldest) => ReplayRefused::NotRetained { oldest },
            ReplayError::Failed(e) => ReplayRefused::Failed(e),
        }
    }
}

/// A deadline no shutdown reaches (`Instant` + a huge grace would overflow).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests;
