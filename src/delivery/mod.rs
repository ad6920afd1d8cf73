//! Stage 7: one task per destination, reading the queue from its own cursor.
//!
//! Each task waits for durable data, reads a batch, hands it to its destination, and
//! saves its cursor only after the destination succeeded; on failure it retries the same
//! batch with capped exponential backoff. One destination's trouble delays only itself.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::DestinationConfig;
use crate::destinations::{Destination, FileDestination, StdoutDestination};
use crate::queue::{Checkpoint, Cursor, Queue, QueueReader};

/// Records and bytes handed to a destination at once.
const BATCH_RECORDS: usize = 1000;
const BATCH_BYTES: usize = 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The running delivery tasks.
pub struct Deliveries {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Deliveries {
    /// Starts a task for each configured destination.
    pub fn start(destinations: &[DestinationConfig], queue: &Queue) -> anyhow::Result<Deliveries> {
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();
        for config in destinations {
            let name = config.name().to_string();
            let (reader, cursor, saved) = queue.subscribe(&name)?;
            let stop = stop.subscribe();
            let task = match config {
                DestinationConfig::File(c) => {
                    let destination = FileDestination::open(c, saved).map_err(|e| {
                        anyhow::anyhow!(
                            "destination `{name}`: cannot open {}: {e}",
                            c.path.display()
                        )
                    })?;
                    tokio::spawn(run(reader, cursor, destination, stop).instrument(span(&name)))
                }
                DestinationConfig::Stdout(_) => tokio::spawn(
                    run(reader, cursor, StdoutDestination::new(), stop).instrument(span(&name)),
                ),
            };
            tasks.push(task);
        }
        Ok(Deliveries { stop, tasks })
    }

    /// Asks every task to stop after its current batch and waits up to `grace`.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        let all = join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("deliveries still running after the shutdown grace period");
        }
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

fn span(name: &str) -> tracing::Span {
    tracing::info_span!("delivery", destination = %name)
}

async fn run<D: Destination>(
    mut reader: QueueReader,
    cursor: Cursor,
    mut destination: D,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut cursor = Some(cursor);
    loop {
        if reader.lag() == 0 {
            tokio::select! {
                more = reader.wait_for_data() => if !more { return },
                _ = stop.wait_for(|&s| s) => return,
            }
        }
        if *stop.borrow() {
            return;
        }
        let (returned, read) = blocking(reader, |r| r.read_batch(BATCH_RECORDS, BATCH_BYTES)).await;
        reader = returned;
        let records = match read {
            Ok(records) if !records.is_empty() => records,
            Ok(_) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the queue");
                if !pause(&mut stop, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        let mark = loop {
            match destination.deliver(&records).await {
                Ok(mark) => break mark,
                Err(e) => {
                    tracing::warn!(error = %e, records = records.len(), "delivery failed; retrying");
                    if !pause(&mut stop, &mut backoff).await {
                        return;
                    }
                }
            }
        };
        backoff = MIN_BACKOFF;
        let checkpoint = Checkpoint {
            position: records.last().map_or(0, |r| r.end),
            sink_offset: mark,
        };
        let (returned, saved) = blocking(cursor.take().expect("cursor present"), move |c| {
            c.commit(checkpoint)
        })
        .await;
        cursor = Some(returned);
        if let Err(e) = saved {
            // The batch was delivered; it will be delivered again after a restart.
            tracing::error!(error = %e, "cannot save the cursor");
        }
    }
}

/// Sleeps for the current backoff (doubling it) unless asked to stop; false means stop.
async fn pause(stop: &mut watch::Receiver<bool>, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|&s| s) => false,
    }
}

/// Runs blocking file work on the blocking pool, lending it `value` for the duration.
async fn blocking<T: Send + 'static, R: Send + 'static>(
    mut value: T,
    work: impl FnOnce(&mut T) -> R + Send + 'static,
) -> (T, R) {
    tokio::task::spawn_blocking(move || {
        let result = work(&mut value);
        (value, result)
    })
    .await
    .expect("blocking queue task panicked")
}
