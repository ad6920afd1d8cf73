//! Wires the stages together and owns start-up and graceful shutdown.

mod connections;
mod reload;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::auth::Sources;
use crate::clock::Clock;
use crate::config::{Config, DedupeBackend};
use crate::control::Control;
use crate::dedupe::Dedupe;
use crate::delivery::{Deliveries, Erasers, Privacy};
use crate::http::{self, App};
use crate::identity::Identity;
use crate::queue::{Queue, QueueWriter};
use crate::regulations::Regulations;
use connections::{ConnectionLimits, Connections};

/// How `run` was asked to start.
pub struct Options {
    /// The file the config came from, read again on reload.
    pub config_path: PathBuf,
    /// Drop the cursors (and queued data) of destinations no longer configured.
    pub purge: bool,
    /// The runtime the delivery engines run on.
    pub delivery: tokio::runtime::Handle,
    /// Wall-clock time for receive times, the dedupe window and dead letters.
    pub clock: Clock,
}

/// Runs fanout until SIGINT/SIGTERM: then stops accepting, finishes in-flight requests,
/// lets deliveries finish their current batch, and flushes the queue. SIGHUP (or
/// `POST /admin/reload`) reloads the config in between. `sources` are the config's,
/// built (keys gathered, plans compiled) by the caller, which reports their errors as
/// the config's.
pub async fn run(config: Config, sources: Sources, options: Options) -> anyhow::Result<()> {
    // First: a signal during start-up (the dedupe rebuild can take seconds) must not kill
    // the process with the default action.
    let shutdown = shutdown_signal()?;
    let mut hangup = signal(SignalKind::hangup())?;
    let (queue, writer) = open_queue(&config, options.clock).await?;
    let sources = Arc::new(ArcSwap::from_pointee(sources));
    let dedupe = open_dedupe(&config, &queue, options.clock)?;
    let identity = Arc::new(Identity::open(
        &config.identity,
        &config.server.data_dir,
        options.clock,
    )?);
    if config.destinations.is_empty() {
        tracing::warn!("no destinations configured: accepted messages are stored but go nowhere");
    }
    let bounds = config.dead_letter_bounds();
    let dead_letters = Arc::new(queue.dead_letters(&config.server.data_dir, bounds).await?);
    dead_letters.keep_pruned(bounds.retention, options.clock);
    let admin_token = admin_token(&config)?;
    crate::live::configure(config.admin.live_limits(), options.clock);
    let erasers = Erasers::default();
    let regulations = Regulations::open(
        &queue,
        &config.server.data_dir,
        options.clock,
        erasers.clone(),
    )
    .await?;
    let privacy = Privacy {
        suppression: regulations.suppression(),
        erasers,
    };
    let deliveries = Deliveries::start(
        &config.destinations,
        &queue,
        &dead_letters,
        options.delivery.clone(),
        options.clock,
        Some(identity.clone()),
        privacy,
    )
    .await?;
    // After the destinations started: a deletion a restart left pending goes to them.
    crate::regulations::start_deletions(regulations.clone(), identity.clone());
    reload::report_removed(&config, &queue, options.purge).await?;
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let app = Arc::new(App {
        sources: sources.clone(),
        dedupe,
        identity,
        suppression: regulations.suppression(),
        regulations,
        queue: queue.clone(),
        limits: config.limits.clone(),
        retry_after: config.server.retry_after_secs(),
        dead_letters,
        admin_token,
        control: reload_tx,
        clock: options.clock,
        browser: config.browser.clone(),
        trusted_proxies: config.server.trusted_proxies.clone(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = match config.admin.listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let connections = Connections::new(config.server.max_connections);
    let limits = ConnectionLimits {
        header_timeout: config.server.header_timeout,
        idle_timeout: config.server.idle_timeout,
    };
    let serve = |listener, router| {
        tokio::spawn(
            connections
                .clone()
                .serve(listener, router, limits, stop_rx.clone()),
        )
    };
    if let Some(admin) = admin_listener {
        tracing::info!("admin endpoints served on {}", admin.local_addr()?);
        servers.push(serve(
            admin,
            http::admin_router(app.clone(), &config.cors, admission(&config)),
        ));
    }
    let router = http::router(
        app.clone(),
        &config.cors,
        admission(&config),
        config.admin.listen.is_none(),
    );
    tracing::info!(
        max_connections = connections.max(),
        "connections capped (server.max_connections)"
    );
    tracing::info!("listening on {}", listener.local_addr()?);
    servers.push(serve(listener, router));
    let grace = config.server.shutdown_grace;
    let mut reloader = reload::Reloader {
        path: options.config_path,
        current: config,
        sources,
        dedupe: app.dedupe.clone(),
        queue: app.queue.clone(),
        deliveries,
    };
    // The servers and the reloader hold what they need: the last `Queue` handle must go
    // with them at shutdown, so that the writer can finish.
    drop(app);
    drop(queue);

    tokio::pin!(shutdown);
    let mut reload_rx = reload_rx;
    loop {
        // A reload holds the loop until it is done (it waits for the engines it stops);
        // a shutdown signal is taken after it.
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = reloader.reload(false).await;
            }
            Some(request) = reload_rx.recv() => match request {
                Control::Reload(request) => {
                    let outcome = reloader.reload(request.purge).await;
                    let _ = request.reply.send(outcome);
                }
                Control::Replay(request) => {
                    let outcome = reloader
                        .deliveries
                        .replay(&request.destination, request.since, request.until)
                        .await;
                    let _ = request.reply.send(outcome);
                }
            },
        }
    }
    // Reloads asked for and not started get no answer: their requests end at once
    // ("shutting down") instead of holding the graceful drain.
    reload_rx.close();
    while reload_rx.try_recv().is_ok() {}
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop_tx.send(true);
    // Live-view streams never finish on their own.
    crate::live::close_viewers();
    let drained = tokio::time::timeout(grace, async {
        for server in servers {
            let _ = server.await;
        }
    })
    .await
    .is_ok();
    reloader.into_deliveries().stop(grace).await;
    if !drained {
        tracing::warn!(
            "requests still in flight after the grace period; they were not acknowledged"
        );
    } else if let Some(writer) = writer {
        // The last `Queue` handle went with the server: the writer finishes and exits.
        tokio::task::spawn_blocking(move || writer.join()).await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The configured queue; the local log comes with its writer thread, joined at the end.
async fn open_queue(config: &Config, clock: Clock) -> anyhow::Result<(Queue, Option<QueueWriter>)> {
    let opened = Queue::open(
        &config.queue,
        &config.server.data_dir,
        config.server.segment_bytes,
        // The dead letters' share is reserved out of the budget.
        config.queue_bytes(),
        config.server.retention,
        clock,
    )
    .await?;
    // Before any destination or source makes its limiter.
    opened.0.share_limits(&config.queue, clock).await?;
    Ok(opened)
}

/// Opens the dedupe window and rebuilds it from the local log, then has the log hand it
/// each segment's keys before deleting the segment. Runs before any delivery starts.
fn open_dedupe(config: &Config, queue: &Queue, clock: Clock) -> anyhow::Result<Arc<Dedupe>> {
    let started = std::time::Instant::now();
    let dedupe = Arc::new(Dedupe::open(
        &config.dedupe,
        &config.sources,
        &config.server.data_dir,
        clock,
    )?);
    let Some(scanned) = queue.scan_local(|source, tag| dedupe.restore(source, tag))? else {
        // Instances sharing a log share their dedupe window through Redis.
        if config.dedupe.backend == DedupeBackend::Memory {
            tracing::warn!(
                "queue.backend = \"nats\" with dedupe.backend = \"memory\": each instance \
                 remembers only the messageIds it accepted itself, and the stream's \
                 duplicate window only catches repeats within queue.duplicate_window; use \
                 dedupe.backend = \"redis\" when several instances take traffic"
            );
        }
        return Ok(dedupe);
    };
    dedupe.compact_if_oversized();
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
/// How requests are admitted, from `[server]`.
fn admission(config: &Config) -> http::AdmissionConfig {
    http::AdmissionConfig {
        max_in_flight: config.server.max_in_flight,
        body_timeout: config.server.body_timeout,
        body_deadline: config.server.body_deadline,
        retry_after: config.server.retry_after_secs(),
    }
}

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
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}
