//! Config reload (SIGHUP, `POST /admin/reload`): the new file is validated in full before
//! anything changes; then write keys are swapped in one step (a request sees the old set
//! or the new one, never none), and destinations are stopped, started or restarted one at
//! a time. A config that does not load is refused and the running one stays.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Sources;
use crate::config::Config;
use crate::control::{ReloadOutcome, Reloaded};
use crate::dedupe::Dedupe;
use crate::delivery::Deliveries;
use crate::queue::Queue;

/// What a reload changes in the running process: the write keys requests see, the
/// dedupe switches, and the destinations (and their cursors in the queue).
pub struct Reloader {
    /// The file, read again at each reload.
    pub path: PathBuf,
    /// The config in effect.
    pub current: Config,
    pub sources: Arc<ArcSwap<Sources>>,
    pub dedupe: Arc<Dedupe>,
    pub queue: Queue,
    pub deliveries: Deliveries,
}

impl Reloader {
    pub fn into_deliveries(self) -> Deliveries {
        self.deliveries
    }

    /// Loads the file again and applies it. Logs the outcome either way.
    pub async fn reload(&mut self, purge: bool) -> ReloadOutcome {
        let result = self.apply(purge).await;
        match &result {
            Ok(done) if !done.destinations.failed.is_empty() => tracing::warn!(
                failed = ?done.destinations.failed,
                "config reload partly applied: write keys and the other destinations \
                 changed; these did not start"
            ),
            Ok(done) => tracing::info!(
                sources = done.sources,
                added = ?done.destinations.added,
                changed = ?done.destinations.changed,
                removed = ?done.destinations.removed,
                purged = ?done.purged,
                "config reloaded"
            ),
            Err(e) => tracing::warn!("config reload refused; the running config stays: {e}"),
        }
        result
    }

    async fn apply(&mut self, purge: bool) -> ReloadOutcome {
        let text = format!("{}", self.path.display());
        // Reading and compiling the file and its plans is blocking work: off the runtime's
        // workers (the files are bounded in size and never FIFOs, so it ends).
        let path = self.path.clone();
        let shown = text.clone();
        let (config, sources) = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            // Everything that can fail is tried before anything is swapped in.
            let sources = Sources::from_config(&config.sources, &config.dir)
                .map_err(|e| format!("{shown}: {e:#}"))?;
            Ok::<_, String>((config, sources))
        })
        .await
        .map_err(|e| format!("{text}: loading failed: {e}"))??;
        for destination in &config.destinations {
            let unchanged = self.current.destinations.iter().any(|d| d == destination);
            if !unchanged {
                destination
                    .try_build()
                    .map_err(|e| format!("{text}: {e:#}"))?;
            }
        }
        warn_of_removed(&self.current, &config);
        let restart_needed = restart_needed(&self.current, &config);
        for section in &restart_needed {
            tracing::warn!(
                "config reload: `{section}` changed; it takes effect at the next restart"
            );
        }

        self.sources.store(Arc::new(sources));
        self.dedupe.set_sources(&config.sources);
        let destinations = self.deliveries.reconcile(&config.destinations).await;
        let sources = config.sources.len();
        // Only destinations named in the file keep their cursors; one that is named but
        // failed to start keeps its cursor too.
        let (purged, unpurged) = removed_cursors(&config, &self.queue, purge)
            .await
            .map_err(|e| format!("purge failed: {e:#}"))?;
        // What the next reload compares against is what is in effect: the destinations
        // that run, and the start-only sections' running values.
        let mut applied = config;
        applied.destinations = self.deliveries.configs();
        applied.server = self.current.server.clone();
        applied.limits = self.current.limits.clone();
        applied.cors = self.current.cors.clone();
        applied.dedupe = self.current.dedupe.clone();
        applied.identity = self.current.identity.clone();
        applied.admin = self.current.admin.clone();
        applied.queue = self.current.queue.clone();
        self.current = applied;
        Ok(Reloaded {
            sources,
            destinations,
            restart_needed,
            unpurged,
            purged,
        })
    }
}

/// A reload that drops destinations is legal (their cursors keep the data) but may be a
/// file cut short by an editor or a deploy: say so where an operator looks.
fn warn_of_removed(old: &Config, new: &Config) {
    let removed: Vec<&str> = old
        .destinations
        .iter()
        .filter(|d| !new.destinations.iter().any(|n| n.name == d.name))
        .map(|d| d.name.as_str())
        .collect();
    if removed.is_empty() {
        return;
    }
    if new.destinations.is_empty() {
        tracing::warn!(
            removed = ?removed,
            "config reload removes every destination: accepted messages are stored but go \
             nowhere (their cursors keep the data until purged)"
        );
    } else {
        tracing::warn!(
            removed = ?removed,
            "config reload removes destinations; their cursors keep the data until purged"
        );
    }
}

/// The sections a reload cannot apply to a running process, by name, when they differ.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("server", old.server != new.server),
        ("limits", old.limits != new.limits),
        ("cors", old.cors != new.cors),
        ("dedupe", old.dedupe != new.dedupe),
        ("identity", old.identity != new.identity),
        ("admin", old.admin != new.admin),
        ("queue", old.queue != new.queue),
        ("browser", old.browser != new.browser),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect()
}

/// Cursors of destinations that are not configured: purged when asked, else listed.
/// Returns (purged, still held).
async fn removed_cursors(
    config: &Config,
    queue: &Queue,
    purge: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let orphans: Vec<String> = queue
        .held_for()
        .await?
        .into_iter()
        .filter(|name| !config.destinations.iter().any(|d| &d.name == name))
        .collect();
    if !purge {
        return Ok((Vec::new(), orphans));
    }
    for name in &orphans {
        queue.purge(name).await?;
        tracing::info!(destination = %name, "purged the queued data of a removed destination");
    }
    Ok((orphans, Vec::new()))
}

/// At start: purges removed destinations' cursors if asked, else says what they hold.
pub async fn report_removed(config: &Config, queue: &Queue, purge: bool) -> anyhow::Result<()> {
    let (_, held) = removed_cursors(config, queue, purge).await?;
    for name in held {
        tracing::warn!(
            destination = %name,
            lag_bytes = queue.lag_bytes(&name).unwrap_or(0),
            "destination is no longer configured; its cursor keeps its queued data until \
             purged (start with --purge, or POST /admin/reload?purge=true)"
        );
    }
    Ok(())
}
