//! Wires the stages together and owns start-up and graceful shutdown.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Sources;
use crate::config::Config;
use crate::dedupe::Dedupe;
use crate::delivery::{DeadLetters, Deliveries};
use crate::http::{self, App};
use crate::queue::Queue;

/// Runs fanout until SIGINT/SIGTERM: then stops accepting, finishes in-flight requests,
/// lets deliveries finish their current batch, and flushes the queue.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let (queue, writer) = Queue::open(
        &config.server.data_dir,
        config.server.segment_bytes,
        config.server.max_queue_bytes,
    )?;
    let sources = Sources::from_config(&config.sources)?;
    let dedupe = open_dedupe(&config, &queue)?;
    if config.destinations.is_empty() {
        tracing::warn!("no destinations configured: accepted messages are stored but go nowhere");
    }
    let dead_letters = Arc::new(DeadLetters::open(&config.server.data_dir)?);
    let admin_token = admin_token(&config)?;
    let deliveries = Deliveries::start(&config.destinations, &queue, &dead_letters)?;
    let app = Arc::new(App {
        sources,
        dedupe,
        queue,
        limits: config.limits.clone(),
        retry_after: config.server.retry_after_secs,
        dead_letters,
        admin_token,
    });
    let router = http::router(app, &config);

    let shutdown = shutdown_signal()?;
    let listener = TcpListener::bind(config.server.listen).await?;
    tracing::info!("listening on {}", listener.local_addr()?);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|&s| s).await;
        })
        .into_future();
    let server = tokio::spawn(server);

    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, server).await.is_ok();
    deliveries.stop(grace).await;
    if drained {
        // The last `Queue` handle went with the server: the writer finishes and exits.
        tokio::task::spawn_blocking(move || writer.join()).await?;
    } else {
        tracing::warn!(
            "requests still in flight after the grace period; they were not acknowledged"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Opens the dedupe window and rebuilds it from the log, then has the queue hand it
/// each segment's keys before deleting the segment. Runs before any delivery starts.
fn open_dedupe(config: &Config, queue: &Queue) -> anyhow::Result<Arc<Dedupe>> {
    let started = std::time::Instant::now();
    let dedupe = Arc::new(Dedupe::open(
        &config.dedupe,
        &config.sources,
        &config.server.data_dir,
    )?);
    let scanned = queue.scan(|source, tag| dedupe.restore(source, tag))?;
    dedupe.compact()?;
    let hook = dedupe.clone();
    queue.on_reclaim(Box::new(move |records| hook.save_reclaimed(records)));
    tracing::info!(
        keys = dedupe.len(),
        scanned,
        ms = started.elapsed().as_millis() as u64,
        "dedupe window rebuilt"
    );
    Ok(dedupe)
}

/// The admin token from the variable `[admin] token_env` names, if any.
fn admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(var) = &config.admin.token_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(token) if !token.is_empty() => Ok(Some(token)),
        _ => anyhow::bail!("admin.token_env names `{var}`, which is not set"),
    }
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal sent right after "listening on" must not kill the
/// process with the default action.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
