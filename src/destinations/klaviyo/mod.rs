//! `kind = "klaviyo"`: each message translated (`translate`) into Klaviyo events or a
//! profile upsert and sent to Klaviyo's API. The folder holds everything Klaviyo: its
//! config keys (`config`), the translation (`translate`), the requests a batch becomes
//! (`requests`), profile merging and the unchanged-profile cache (`profiles`), and the
//! calls to the API with pacing and job following (`api`).
//!
//! - identify/group → profile upserts, sent before the batch's events (a profile should
//!   exist before events that name it). Upserts of one profile within a batch are merged
//!   (later traits win). More than `PROFILE_JOB_AFTER` go as one bulk import job
//!   (`POST /api/profile-bulk-import-jobs`, ≤ 10 000 profiles / 5 MB), fewer as
//!   `POST /api/profile-import` each (Klaviyo advises against jobs for a handful). A job
//!   is followed to its end after the batch's events went; the messages whose rows
//!   Klaviyo refused are dead-lettered with its reason, the rest are delivered.
//! - an identify whose profile body equals the one last sent for that profile (within
//!   `profile_cache.ttl`) is settled without a request (skipped, `profile_unchanged`);
//! - events → `POST /api/event-bulk-create-jobs`, up to 1 000 events / 5 MB per job
//!   (`bulk = true`, current revisions), else `POST /api/events` one by one;
//! - alias and mapped-off messages are skipped; messages that cannot go (no profile
//!   identifier, a Klaviyo limit) are refused before any request and dead-lettered with
//!   the reason.
//!
//! - `[[destinations.actions]]` (consent, suppression, lists by rule: `actions`) run in
//!   addition to the above, after the batch's profiles and events (`action_calls`).
//!
//! Each message is translated once, in `check`; `send` and its retries use that.
//!
//! Klaviyo's documented per-account limits are built in, one bucket per endpoint (events
//! 350/s burst and 3 500/min steady; bulk jobs 10/s, 150/min; profile import 75/s,
//! 750/min; job status and import-error reads 10/s, 150/min), on top of the destination's
//! own `rate_limit`; each bucket also follows the `RateLimit-Remaining` / `-Reset` of its
//! endpoint's answers and a 429's `Retry-After`. A batch that fails midway is
//! sent again whole: Klaviyo keeps the first event per (profile, metric, unique_id), and
//! unique_id is the messageId, so a repeat is not a second event.

mod action_calls;
mod actions;
mod api;
mod config;
mod erase;
mod profiles;
mod requests;
pub mod translate;

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::HeaderValue;

pub use actions::{KlaviyoActionConfig, KlaviyoActionKind, KlaviyoChannel};
pub use config::{KlaviyoConfig, ProfileCacheConfig};
pub use requests::{KlaviyoBodies, KlaviyoRequest};

use super::{
    http, secret_from_env, Check, Destination, DestinationConfig, Erasing, Outgoing, Prepared,
    Preview, Refusal, RefusalKind, SendError, Sending, Subject,
};
use crate::clock::Clock;
use crate::pace::RateLimiter;
use action_calls::ActionLimits;
use actions::{plan, KlaviyoAction};
use erase::EraseLimits;
use profiles::{merge_profiles, profile_cache};
use translate::{Revision, Translation};

pub const DEFAULT_BASE_URL: &str = "https://a.klaviyo.com";
const BULK_MAX_EVENTS: usize = 1000;
/// 5 MB, less room for the job's envelope.
const BULK_MAX_BYTES: usize = 5_000_000 - 256;

const PROFILE_IMPORT: &str = "/api/profile-import";
const PROFILE_JOBS: &str = "/api/profile-bulk-import-jobs";
const BULK_JOBS: &str = "/api/event-bulk-create-jobs";
const EVENTS: &str = "/api/events";

/// Batches sending at once by default.
const KLAVIYO_CONCURRENCY: usize = 4;
/// More merged profiles than this in a batch go as a bulk import job.
const PROFILE_JOB_AFTER: usize = 5;
const PROFILE_JOB_MAX: usize = 10_000;
const PROFILE_JOB_MAX_BYTES: usize = 5_000_000 - 256;
/// How long a profile job is followed before the batch counts as failed and is sent again
/// (its rows are upserts: a second import of them is harmless).
const PROFILE_JOB_WAIT: Duration = Duration::from_secs(600);
/// Polls of a job's status start this far apart and double up to `JOB_POLL_MAX`.
const JOB_POLL_FIRST: Duration = Duration::from_millis(200);
const JOB_POLL_MAX: Duration = Duration::from_secs(5);

pub struct KlaviyoDestination {
    client: reqwest::Client,
    base: String,
    authorization: HeaderValue,
    revision_header: HeaderValue,
    bodies: KlaviyoBodies,
    events_limit: RateLimiter,
    bulk_limit: RateLimiter,
    profiles_limit: RateLimiter,
    profile_jobs_limit: RateLimiter,
    /// Reads of jobs' status and import errors.
    job_reads_limit: RateLimiter,
    /// Identity hash → body hash of the profile last sent; `None` when turned off.
    profile_cache: Option<moka::sync::Cache<u64, u64>>,
    /// Translations check event times against it; `Retry-After` dates are read with it.
    clock: Clock,
    /// `[[destinations.actions]]`, compiled.
    actions: Vec<KlaviyoAction>,
    action_limits: ActionLimits,
    /// Privacy deletions' endpoints (`erase`).
    erase_limits: EraseLimits,
}

impl KlaviyoDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &KlaviyoConfig,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let var = own.api_key_env.as_str();
        let key = secret_from_env(&config.name, "api_key_env", var)?;
        let mut authorization =
            HeaderValue::from_str(&format!("Klaviyo-API-Key {key}")).map_err(|_| {
                anyhow::anyhow!(
                    "destination `{}`: {var} is not a valid API key",
                    config.name
                )
            })?;
        authorization.set_sensitive(true);
        let revision_text = own.revision.as_deref().unwrap_or(Revision::DEFAULT_HEADER);
        // Klaviyo limits each account: destinations with one key share their buckets
        // (across the cluster on the shared log), named by a hash, never by the key.
        let account = format!("k.{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()));
        let limit = |endpoint: &str, per_minute: f64, burst: u32| {
            RateLimiter::named(&format!("{account}.{endpoint}"), per_minute / 60.0, burst)
        };
        Ok(KlaviyoDestination {
            client: http::client(config.timeout())?,
            base: own
                .base_url
                .as_deref()
                .unwrap_or(DEFAULT_BASE_URL)
                .trim_end_matches('/')
                .to_string(),
            authorization,
            revision_header: HeaderValue::from_str(revision_text)?,
            bodies: KlaviyoBodies::new(own)?,
            events_limit: limit("events", 3500.0, 350),
            bulk_limit: limit("bulk", 150.0, 10),
            profiles_limit: limit("profiles", 750.0, 75),
            profile_jobs_limit: limit("profile_jobs", 150.0, 10),
            job_reads_limit: job_reads_limiter(&account),
            profile_cache: profile_cache(&own.profile_cache.clone().unwrap_or_default()),
            clock,
            actions: own.actions.iter().map(KlaviyoAction::compile).collect(),
            action_limits: ActionLimits::new(&account),
            erase_limits: EraseLimits::new(&account),
        })
    }
}

impl Destination for KlaviyoDestination {
    fn check(&self, message: &[u8]) -> Check {
        let now = self.clock.now();
        let translation = self.bodies.translate(message, now);
        match plan(&self.actions, message, now) {
            Err(reason) => return refuse(reason),
            // The actions still need the message sent, whatever its own translation is.
            Ok(items) if !items.is_empty() => {
                let translation = match translation {
                    Translation::Reject { reason } => return refuse(reason),
                    Translation::Profile(upsert) if self.unchanged(&upsert) => Translation::Skip {
                        reason: "profile_unchanged",
                    },
                    other => other,
                };
                return Check::Send(Some(Prepared::Klaviyo(translation)));
            }
            Ok(_) => {}
        }
        match translation {
            Translation::Profile(upsert) if self.unchanged(&upsert) => {
                Check::Skip("profile_unchanged")
            }
            sendable @ (Translation::Events(_) | Translation::Profile(_)) => {
                Check::Send(Some(Prepared::Klaviyo(sendable)))
            }
            Translation::Skip { reason } => Check::Skip(reason),
            Translation::Reject { reason } => refuse(reason),
        }
    }

    fn live_payload(&self, message: &[u8]) -> Option<serde_json::Value> {
        match self.bodies.preview(message, self.clock.now()) {
            Ok(Preview::Send(requests)) => Some(requests),
            _ => None,
        }
    }

    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move {
            // Translated in `check`; a message that did not pass it (none should) is
            // translated now.
            let translations: Vec<Cow<'_, Translation>> = batch
                .iter()
                .map(|m| match prepared(m) {
                    Some(done) => Cow::Borrowed(done),
                    None => Cow::Owned(self.bodies.translate(m.json, self.clock.now())),
                })
                .collect();
            let now = self.clock.now();
            let mut refused = Vec::new();
            let mut action_items = Vec::new();
            for (index, message) in batch.iter().enumerate() {
                match plan(&self.actions, message.json, now) {
                    Ok(items) => action_items.extend(items.into_iter().map(|i| (index, i))),
                    // `check` refused it already; none should get here.
                    Err(detail) => refused.push(Refusal {
                        index,
                        kind: RefusalKind::Refused,
                        status: None,
                        detail,
                        answer: None,
                    }),
                }
            }
            let mut events = Vec::new();
            let mut profiles = Vec::new();
            for (index, translation) in translations.iter().enumerate() {
                match translation.as_ref() {
                    Translation::Events(more) => events.extend(more),
                    Translation::Profile(upsert) => profiles.push((index, upsert.as_ref())),
                    Translation::Skip { .. } => {}
                    Translation::Reject { reason } => {
                        return Err(SendError::Rejected {
                            status: 422,
                            detail: reason.clone(),
                            answer: None,
                        })
                    }
                }
            }
            let merged = merge_profiles(&profiles);
            let jobs = self.send_profiles(&merged).await?;
            for request in self.bodies.event_requests(&events) {
                let limiter = match request.path {
                    BULK_JOBS => &self.bulk_limit,
                    _ => &self.events_limit,
                };
                self.post(request.path, request.body, limiter).await?;
            }
            let mut refused_profiles = HashMap::new();
            for job in &jobs {
                for (row, reason, error) in self.follow(job).await? {
                    refused_profiles.insert(job.profiles.start + row, (reason, error));
                }
            }
            refused.extend(self.send_actions(action_items).await?);
            for (at, profile) in merged.iter().enumerate() {
                match refused_profiles.get(&at) {
                    Some((reason, error)) => {
                        refused.extend(profile.messages.iter().map(|&index| Refusal {
                            index,
                            kind: RefusalKind::Refused,
                            status: Some(400),
                            detail: reason.clone(),
                            answer: Some(error.clone()),
                        }))
                    }
                    None => self.remember(profile),
                }
            }
            if refused.is_empty() {
                Ok(0)
            } else {
                Err(SendError::PartlyRejected { refused })
            }
        })
    }

    fn erase<'a>(&'a self, subject: &'a Subject) -> Erasing<'a> {
        Box::pin(self.erase_subject(subject))
    }
}

/// Reads of bulk-import jobs (status, import errors), at Klaviyo's documented limit for
/// them: 10/s burst, 150/min steady.
fn job_reads_limiter(account: &str) -> RateLimiter {
    RateLimiter::named(&format!("{account}.job_reads"), 150.0 / 60.0, 10)
}

/// A message that cannot go: dead-lettered with the reason's code (before its `:`).
fn refuse(reason: String) -> Check {
    Check::Refuse {
        code: reason
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        detail: reason,
    }
}

/// The translation `check` prepared for a message.
fn prepared<'a>(message: &Outgoing<'a>) -> Option<&'a Translation> {
    match message.prepared? {
        Prepared::Klaviyo(translation) => Some(translation),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn job_reads_are_paced_at_10_a_second_and_150_a_minute() {
        let limiter = job_reads_limiter("k.test");
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            limiter.acquire(1).await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a burst of 10 goes at once"
        );
        // Then 150 a minute: one every 0.4 s, so 140 more take 56 s (virtual time).
        limiter.acquire(1).await;
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        for _ in 0..139 {
            limiter.acquire(1).await;
        }
        assert!(
            start.elapsed() >= Duration::from_secs(56),
            "{:?}",
            start.elapsed()
        );
    }
}
