//! What the operator endpoints (`POST /admin/reload`, `POST /admin/replay`) ask of the
//! server's control loop, which owns the destinations' engines, and the answers: the one
//! vocabulary `http`, `server` and `delivery` share, so that the HTTP surface needs nothing
//! of the delivery engine.

use chrono::{DateTime, Utc};

/// What the operator endpoints ask of the server's control loop, which owns the
/// destinations' engines.
pub enum Control {
    Reload(ReloadRequest),
    Replay(ReplayRequest),
}

/// A reload asked for over HTTP; the server answers on `reply`.
pub struct ReloadRequest {
    pub purge: bool,
    pub reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

/// What a reload did, or why it was refused.
pub type ReloadOutcome = Result<Reloaded, String>;

#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    pub sources: usize,
    #[serde(flatten)]
    pub destinations: Changes,
    /// Sections that changed but only take effect at a restart.
    pub restart_needed: Vec<&'static str>,
    /// Destinations no longer configured whose cursors still hold queued data.
    pub unpurged: Vec<String>,
    pub purged: Vec<String>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Destinations that could not start, with why.
    pub failed: Vec<String>,
}

/// A replay from the retained log asked for over HTTP; the server answers on `reply`
/// with how many messages go again.
pub struct ReplayRequest {
    pub destination: String,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub reply: tokio::sync::oneshot::Sender<Result<u64, ReplayRefused>>,
}

/// Why a replay did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayRefused {
    #[error("no running destination `{0}`")]
    UnknownDestination(String),
    /// The log no longer holds messages accepted that early; it holds from `oldest` on
    /// (or nothing at all).
    #[error("not retained")]
    NotRetained { oldest: Option<DateTime<Utc>> },
    #[error("{0:#}")]
    Failed(anyhow::Error),
}
