//! The deletion runner: for each `suppress_with_delete` regulation, asks every
//! destination it names (`Destination::erase`, the running destination) to delete what it
//! holds or sent of the subject, and records each report as it comes, so that a restart
//! resumes with what is still pending. A failure that may pass is tried again with
//! backoff, up to `MAX_ATTEMPTS`; then, or on a refusal, the report says `failed`.
//!
//! Several instances on one shared store: an instance claims a regulation (its owner and
//! a lease, written over the revision it read) before working on it, so only one runs a
//! given deletion; a claim whose lease ran out (the instance died) is taken over.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::{stamp, Claim, Kind, Regulation, Regulations, Report, SubjectId};
use crate::destinations::{Erasure, Subject};
use crate::identity::Identity;
use crate::pace::Backoff;

/// How long a claim holds without being renewed (each report written renews it).
const LEASE: Duration = Duration::from_secs(60);
/// Attempts at one destination before its report says `failed`.
pub const MAX_ATTEMPTS: u32 = 10;
/// Between attempts: 1 s doubling to 10 minutes, jittered.
const BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(600),
    max_retry_after: Duration::from_secs(600),
};
/// A destination named in a report but not running on this instance is looked at again
/// after this long (another instance, or a reload, may run it).
const ABSENT_AGAIN: Duration = Duration::from_secs(60);
/// Looked again at least this often, whatever was told.
const IDLE: Duration = Duration::from_secs(30);

/// Runs the deletions of `regulations` until the process ends: at start (what a
/// restart left pending), when a regulation changes, and when a retry is due.
pub fn start_deletions(regulations: Arc<Regulations>, identity: Arc<Identity>) {
    tokio::spawn(async move {
        loop {
            let wait = run_due(&regulations, &identity).await;
            tokio::select! {
                _ = regulations.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn after(now: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    now + TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX)
}

/// When a pending report is due: now if never tried.
fn due_at(report: &Report) -> Option<Option<DateTime<Utc>>> {
    match report {
        Report::Pending { next_at, .. } => Some(next_at.as_deref().and_then(parse_time)),
        _ => None,
    }
}

/// Runs what is due; returns how long until something may be due again.
async fn run_due(regulations: &Regulations, identity: &Identity) -> Duration {
    let now = regulations.clock.now();
    let mut next = after(now, IDLE);
    let mut due = Vec::new();
    for (regulation, revision) in regulations.held.lock().expect("poisoned").values() {
        let Some(reports) = &regulation.destinations else {
            continue;
        };
        if regulation.kind != Kind::SuppressWithDelete {
            continue;
        }
        // A local store has one server: a claim there is a dead process's.
        let claimed_until = regulation
            .claim
            .as_ref()
            .filter(|c| regulations.is_shared() && c.owner != regulations.instance)
            .and_then(|c| parse_time(&c.until))
            .filter(|until| *until > now);
        if let Some(until) = claimed_until {
            next = next.min(until);
            continue;
        }
        let mut is_due = false;
        for at in reports.values().filter_map(due_at) {
            match at {
                Some(at) if at > now => next = next.min(at),
                _ => is_due = true,
            }
        }
        if is_due {
            due.push((regulation.clone(), *revision));
        }
    }
    for (regulation, revision) in due {
        if let Err(e) = run_one(regulations, identity, regulation, revision).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot record a deletion's progress; trying again");
            next = next.min(after(regulations.clock.now(), Duration::from_secs(1)));
        }
    }
    (next - regulations.clock.now())
        .to_std()
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(100))
}

/// Claims one regulation and sends its due deletions, recording each report. Stops
/// quietly when the regulation changed under it (removed, or claimed elsewhere).
async fn run_one(
    regulations: &Regulations,
    identity: &Identity,
    mut regulation: Regulation,
    mut revision: u64,
) -> anyhow::Result<()> {
    let claim = |now| {
        Some(Claim {
            owner: regulations.instance.clone(),
            until: stamp(after(now, LEASE)),
        })
    };
    regulation.claim = claim(regulations.clock.now());
    let Some(claimed) = regulations.save(&regulation, revision).await? else {
        return Ok(());
    };
    revision = claimed;
    let subject = subject_of(&regulation.subject, identity).await;
    let names: Vec<String> = regulation
        .destinations
        .iter()
        .flatten()
        .filter(|(_, report)| {
            due_at(report).is_some_and(|at| at.is_none_or(|at| at <= regulations.clock.now()))
        })
        .map(|(name, _)| name.clone())
        .collect();
    for name in names {
        let erased = regulations.erasers.erase(&name, &subject).await;
        let now = regulations.clock.now();
        let reports = regulation.destinations.get_or_insert_default();
        let attempts = match reports.get(&name) {
            Some(Report::Pending { attempts, .. }) => *attempts,
            _ => 0,
        };
        let report = outcome(&regulation.id, &name, erased, attempts, now);
        reports.insert(name, report);
        regulation.claim = claim(now);
        let Some(saved) = regulations.save(&regulation, revision).await? else {
            return Ok(());
        };
        revision = saved;
    }
    regulation.claim = None;
    regulations.save(&regulation, revision).await?;
    Ok(())
}

/// The report after one attempt (`attempts` made before it).
fn outcome(
    id: &str,
    destination: &str,
    erased: Option<Result<Erasure, crate::destinations::EraseError>>,
    attempts: u32,
    now: DateTime<Utc>,
) -> Report {
    match erased {
        None => Report::Pending {
            attempts,
            next_at: Some(stamp(after(now, ABSENT_AGAIN))),
            last_error: Some("the destination does not run on this instance".into()),
        },
        Some(Ok(Erasure::Done { detail })) => {
            tracing::info!(id, destination, detail, "deletion done");
            Report::Done {
                at: stamp(now),
                detail,
            }
        }
        Some(Ok(Erasure::NotSupported)) => Report::NotSupported,
        Some(Err(e)) if e.retry && attempts + 1 < MAX_ATTEMPTS => {
            let wait = BACKOFF
                .delay(attempts + 1, None)
                .max(Duration::from_millis(500));
            tracing::warn!(id, destination, error = %e.message, attempts = attempts + 1, "deletion failed; will retry");
            Report::Pending {
                attempts: attempts + 1,
                next_at: Some(stamp(after(now, wait))),
                last_error: Some(e.message),
            }
        }
        Some(Err(e)) => {
            tracing::error!(id, destination, error = %e.message, "deletion failed");
            Report::Failed {
                message: e.message,
                attempts: attempts + 1,
            }
        }
    }
}

/// The deletion's subject, with the email and phone the identity store knows of it.
async fn subject_of(id: &SubjectId, identity: &Identity) -> Subject {
    let mut subject = Subject::default();
    let known = match id {
        SubjectId::UserId(user_id) => {
            subject.user_id = Some(user_id.clone());
            identity.known_user(user_id).await
        }
        SubjectId::AnonymousId(anonymous_id) => {
            subject.anonymous_id = Some(anonymous_id.clone());
            identity.lookup(&[anonymous_id]).await.pop().flatten()
        }
        SubjectId::Email(email) => {
            subject.email = Some(email.clone());
            None
        }
    };
    if let Some(known) = known {
        subject.email = subject.email.or(known.email);
        subject.phone = known.phone;
    }
    subject
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::EraseError;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).unwrap()
    }

    #[test]
    fn a_retryable_failure_stays_pending_until_the_last_attempt() {
        let retry = || Some(Err(EraseError::retry("503")));
        let report = outcome("r", "d", retry(), 0, at());
        let Report::Pending {
            attempts,
            next_at,
            last_error,
        } = report
        else {
            panic!("{report:?}");
        };
        assert_eq!((attempts, last_error.as_deref()), (1, Some("503")));
        assert!(parse_time(&next_at.unwrap()).unwrap() > at());
        assert_eq!(
            outcome("r", "d", retry(), MAX_ATTEMPTS - 1, at()),
            Report::Failed {
                message: "503".into(),
                attempts: MAX_ATTEMPTS
            }
        );
        assert_eq!(
            outcome("r", "d", Some(Err(EraseError::failed("400"))), 0, at()),
            Report::Failed {
                message: "400".into(),
                attempts: 1
            }
        );
    }

    #[tokio::test]
    async fn a_users_email_and_phone_come_from_the_identity_store() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::identity::IdentityConfig::default();
        let identity = Identity::open(&config, dir.path(), crate::clock::Clock::system()).unwrap();
        let identify = br#"{"type":"identify","anonymousId":"a1","userId":"u1","traits":{"email":"x@example.com","phone":"+15550100"}}"#;
        identity
            .learn([(crate::message::MessageType::Identify, &identify[..])].into_iter())
            .await;
        let by_user = subject_of(&SubjectId::UserId("u1".into()), &identity).await;
        let expected = Subject {
            user_id: Some("u1".into()),
            anonymous_id: None,
            email: Some("x@example.com".into()),
            phone: Some("+15550100".into()),
        };
        assert_eq!(by_user, expected);
        let by_anonymous = subject_of(&SubjectId::AnonymousId("a1".into()), &identity).await;
        assert_eq!(by_anonymous.email.as_deref(), Some("x@example.com"));
        assert_eq!(
            by_anonymous.user_id, None,
            "the deletion stays about the anonymousId"
        );
        let unknown = subject_of(&SubjectId::UserId("u2".into()), &identity).await;
        assert_eq!(unknown.email, None);
    }

    #[test]
    fn done_and_not_supported_are_final() {
        let done = outcome(
            "r",
            "d",
            Some(Ok(Erasure::Done {
                detail: "sent".into(),
            })),
            3,
            at(),
        );
        assert_eq!(
            done,
            Report::Done {
                at: stamp(at()),
                detail: "sent".into()
            }
        );
        assert_eq!(due_at(&done), None);
        let unsupported = outcome("r", "d", Some(Ok(Erasure::NotSupported)), 0, at());
        assert_eq!(unsupported, Report::NotSupported);
        let absent = outcome("r", "d", None, 2, at());
        assert!(matches!(absent, Report::Pending { attempts: 2, .. }));
    }
}
