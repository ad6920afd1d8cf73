//! Privacy regulations (Segment's regulations API): `suppress` a subject (a userId,
//! anonymousId or email) so that its new messages are answered 200 and dropped,
//! `suppress_with_delete` to also ask every destination to delete what it holds or sent
//! of it, and `unsuppress` to lift an earlier suppression. A subject is suppressed while
//! its newest regulation is a suppression; removing a regulation (`DELETE`) takes it
//! back as if it had never been made.
//!
//! Durable and shared, one seam with two stores like the dead letters: SQLite beside the
//! local log (`sqlite.rs`), a JetStream KV bucket beside the shared log (`shared.rs`),
//! watched by every instance. What is suppressed is kept in memory as a snapshot
//! (`src/suppression.rs`, a leaf) that ingest and delivery read without a lock; the deletions run in
//! `runner.rs`.

mod runner;
mod shared;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub use crate::suppression::{normal_email, Suppressed, Suppression};
pub use runner::start_deletions;
pub use sqlite::FILE_NAME;

use crate::clock::Clock;
use crate::delivery::Erasers;
use crate::queue::Queue;
use shared::SharedStore;
use sqlite::SqliteStore;

/// What a regulation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Suppress,
    SuppressWithDelete,
    Unsuppress,
}

impl Kind {
    pub const NAMES: &'static str = "suppress, suppress_with_delete or unsuppress";

    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "suppress" => Some(Kind::Suppress),
            "suppress_with_delete" => Some(Kind::SuppressWithDelete),
            "unsuppress" => Some(Kind::Unsuppress),
            _ => None,
        }
    }

    fn suppresses(self) -> bool {
        !matches!(self, Kind::Unsuppress)
    }
}

/// Whom a regulation is about: exactly one id, as Segment's API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubjectId {
    #[serde(rename = "userId")]
    UserId(String),
    #[serde(rename = "anonymousId")]
    AnonymousId(String),
    /// Compared without case (kept lowercased).
    #[serde(rename = "email")]
    Email(String),
}

impl SubjectId {
    /// The field names a request may use, in the order they are looked for.
    pub const FIELDS: [&'static str; 3] = ["userId", "anonymousId", "email"];

    pub fn new(field: &str, value: &str) -> Option<SubjectId> {
        match field {
            "userId" => Some(SubjectId::UserId(value.to_string())),
            "anonymousId" => Some(SubjectId::AnonymousId(value.to_string())),
            "email" => Some(SubjectId::Email(normal_email(value))),
            _ => None,
        }
    }
}

/// What one destination did with a deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Report {
    /// Not done yet: never tried, or tried `attempts` times and to be tried again at
    /// `next_at` after `last_error`.
    Pending {
        attempts: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_at: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
    },
    Done {
        at: String,
        detail: String,
    },
    #[serde(rename = "not supported")]
    NotSupported,
    /// Refused, or still failing after the last attempt: not tried again.
    Failed {
        message: String,
        attempts: u32,
    },
}

/// Which instance works on a deletion, until when (RFC 3339): others leave it alone
/// meanwhile, and take it over once the time is past (the instance is gone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub owner: String,
    pub until: String,
}

/// One regulation, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regulation {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(flatten)]
    pub subject: SubjectId,
    /// RFC 3339 with microseconds: the newest regulation of a subject decides.
    pub created_at: String,
    /// `suppress_with_delete`: each destination's report, from when the deletion runner
    /// first takes it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<BTreeMap<String, Report>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// A regulation as held, with the store revision it was read at.
type Held = (Regulation, u64);

enum Store {
    Local(Arc<SqliteStore>),
    Shared(Box<SharedStore>),
}

/// The regulations: the store, what it holds (in memory), and the suppression snapshot.
pub struct Regulations {
    store: Store,
    held: Mutex<BTreeMap<String, Held>>,
    suppression: Suppression,
    clock: Clock,
    /// Told of every change: the deletion runner looks again.
    changed: tokio::sync::Notify,
    /// This process, in deletion claims.
    instance: String,
    /// The running destinations a deletion goes to.
    erasers: Erasers,
}

pub fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Regulations {
    /// Opens the store that goes with `queue` (SQLite in `data_dir`, or the KV bucket
    /// beside the shared log, then watched) and loads what it holds.
    pub async fn open(
        queue: &Queue,
        data_dir: &Path,
        clock: Clock,
        erasers: Erasers,
    ) -> anyhow::Result<Arc<Regulations>> {
        let store = match queue.shared() {
            None => Store::Local(Arc::new(SqliteStore::open(data_dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the regulations store in {}: {e}",
                    data_dir.display()
                )
            })?)),
            Some(shared) => Store::Shared(Box::new(SharedStore::open(shared).await?)),
        };
        Regulations::load(store, clock, erasers).await
    }

    async fn load(
        store: Store,
        clock: Clock,
        erasers: Erasers,
    ) -> anyhow::Result<Arc<Regulations>> {
        let regulations = Arc::new(Regulations {
            store,
            held: Mutex::new(BTreeMap::new()),
            suppression: Suppression::default(),
            clock,
            changed: tokio::sync::Notify::new(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            erasers,
        });
        if let Store::Shared(shared) = &regulations.store {
            // Watched before loading: a change made in between is not missed.
            let weak: Weak<Regulations> = Arc::downgrade(&regulations);
            shared.watch(move |(id, revision, body)| {
                let Some(regulations) = weak.upgrade() else {
                    return false;
                };
                let regulation = body.and_then(|b| parse(&id, &b));
                regulations.apply(&id, revision, regulation);
                true
            });
        }
        let loaded = match &regulations.store {
            Store::Local(store) => {
                let store = store.clone();
                let rows = blocking(move || store.load_all()).await?;
                rows.into_iter()
                    .filter_map(|(id, rev, body)| Some((parse(&id, body.as_bytes())?, rev)))
                    .collect::<Vec<_>>()
            }
            Store::Shared(store) => store
                .load_all()
                .await?
                .into_iter()
                .filter_map(|(id, rev, body)| Some((parse(&id, &body)?, rev)))
                .collect(),
        };
        let count = loaded.len();
        for (regulation, revision) in loaded {
            let id = regulation.id.clone();
            regulations.apply(&id, revision, Some(regulation));
        }
        tracing::info!(regulations = count, "regulations loaded");
        Ok(regulations)
    }

    /// Whether other instances share the store (and so claim deletions too).
    fn is_shared(&self) -> bool {
        matches!(self.store, Store::Shared(_))
    }

    /// What ingest and delivery check messages against.
    pub fn suppression(&self) -> Suppression {
        self.suppression.clone()
    }

    /// Every regulation, oldest first.
    pub fn list(&self) -> Vec<Regulation> {
        let held = self.held.lock().expect("regulations lock poisoned");
        let mut all: Vec<Regulation> = held.values().map(|(r, _)| r.clone()).collect();
        all.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        all
    }

    /// Makes a regulation; returns it and whether it is new. When the subject's newest
    /// regulation is already of this type, that one is returned (nothing changes).
    pub async fn add(&self, kind: Kind, subject: SubjectId) -> anyhow::Result<(Regulation, bool)> {
        if let Some(newest) = self.newest_of(&subject) {
            if newest.kind == kind {
                return Ok((newest, false));
            }
        }
        let now = self.clock.now();
        let regulation = Regulation {
            id: format!("reg_{}", uuid::Uuid::new_v4().simple()),
            kind,
            subject,
            created_at: stamp(now),
            destinations: (kind == Kind::SuppressWithDelete).then(|| self.pending_reports()),
            claim: None,
        };
        let body = serde_json::to_string(&regulation)?;
        let id = regulation.id.clone();
        let revision = match &self.store {
            Store::Local(store) => {
                let (store, id) = (store.clone(), id.clone());
                blocking(move || store.insert(&id, &body)).await?
            }
            Store::Shared(store) => store.insert(&id, body.into()).await?,
        };
        let revision =
            revision.ok_or_else(|| anyhow::anyhow!("regulation id {id} is taken; try again"))?;
        self.apply(&id, revision, Some(regulation.clone()));
        tracing::info!(id, kind = ?kind, "regulation added");
        Ok((regulation, true))
    }

    /// Deletes a regulation; returns it, `None` if there was none with that id.
    pub async fn remove(&self, id: &str) -> anyhow::Result<Option<Regulation>> {
        let Some((regulation, _)) = self.held(id) else {
            return Ok(None);
        };
        match &self.store {
            Store::Local(store) => {
                let (store, id) = (store.clone(), id.to_string());
                blocking(move || store.delete(&id)).await?;
            }
            Store::Shared(store) => store.delete(id).await?,
        }
        self.forget(id);
        tracing::info!(id, "regulation removed");
        Ok(Some(regulation))
    }

    /// Every running destination's report, pending.
    fn pending_reports(&self) -> BTreeMap<String, Report> {
        let pending = Report::Pending {
            attempts: 0,
            next_at: None,
            last_error: None,
        };
        self.erasers
            .names()
            .into_iter()
            .map(|name| (name, pending.clone()))
            .collect()
    }

    fn held(&self, id: &str) -> Option<Held> {
        let held = self.held.lock().expect("regulations lock poisoned");
        held.get(id).cloned()
    }

    /// Writes `regulation` over the revision it was read at: the new revision, `None`
    /// when it changed (or went) meanwhile.
    async fn save(&self, regulation: &Regulation, revision: u64) -> anyhow::Result<Option<u64>> {
        let body = serde_json::to_string(regulation)?;
        let id = regulation.id.clone();
        let saved = match &self.store {
            Store::Local(store) => {
                let (store, id) = (store.clone(), id.clone());
                blocking(move || store.update(&id, &body, revision)).await?
            }
            Store::Shared(store) => store.update(&id, body.into(), revision).await?,
        };
        if let Some(revision) = saved {
            self.apply(&id, revision, Some(regulation.clone()));
        }
        Ok(saved)
    }

    fn newest_of(&self, subject: &SubjectId) -> Option<Regulation> {
        let held = self.held.lock().expect("regulations lock poisoned");
        held.values()
            .map(|(r, _)| r)
            .filter(|r| &r.subject == subject)
            .max_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)))
            .cloned()
    }

    /// Takes a change in (ours, or one the watch saw): a value newer than the one held
    /// replaces it; `None` deletes. Then the snapshot is made again.
    fn apply(&self, id: &str, revision: u64, regulation: Option<Regulation>) {
        {
            let mut held = self.held.lock().expect("regulations lock poisoned");
            if held.get(id).is_some_and(|(_, r)| *r >= revision) {
                return;
            }
            match regulation {
                Some(regulation) => held.insert(id.to_string(), (regulation, revision)),
                None => held.remove(id),
            };
            self.suppression
                .replace(suppressed(held.values().map(|(r, _)| r)));
        }
        self.changed.notify_one();
    }

    /// Drops a regulation deleted here (the watch's delete, coming later, finds nothing).
    fn forget(&self, id: &str) {
        let mut held = self.held.lock().expect("regulations lock poisoned");
        if held.remove(id).is_some() {
            self.suppression
                .replace(suppressed(held.values().map(|(r, _)| r)));
        }
    }
}

/// The subjects whose newest regulation suppresses them.
fn suppressed<'r>(regulations: impl Iterator<Item = &'r Regulation>) -> Suppressed {
    let mut newest: HashMap<&SubjectId, &Regulation> = HashMap::new();
    for regulation in regulations {
        let slot = newest.entry(&regulation.subject).or_insert(regulation);
        if (&regulation.created_at, &regulation.id) > (&slot.created_at, &slot.id) {
            *slot = regulation;
        }
    }
    let mut out = Suppressed::default();
    for (subject, regulation) in newest {
        if !regulation.kind.suppresses() {
            continue;
        }
        let (set, id) = match subject {
            SubjectId::UserId(id) => (&mut out.user_ids, id),
            SubjectId::AnonymousId(id) => (&mut out.anonymous_ids, id),
            SubjectId::Email(email) => (&mut out.emails, email),
        };
        set.insert(id.clone());
    }
    out
}

fn parse(id: &str, body: &[u8]) -> Option<Regulation> {
    match serde_json::from_slice(body) {
        Ok(regulation) => Some(regulation),
        Err(e) => {
            tracing::warn!(id, error = %e, "a stored regulation is not one fanout wrote; left out");
            None
        }
    }
}

/// Runs a SQLite call on a blocking thread.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| anyhow::anyhow!("regulations task failed: {e}"))??)
}

#[cfg(test)]
mod tests;
