//! `kind = "klaviyo"`: each message translated (`translate`) into Klaviyo events or a
//! profile upsert and sent to Klaviyo's API.
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
//! Each message is translated once, in `check`; `send` and its retries use that.
//!
//! Klaviyo's documented per-account limits are built in, one bucket per endpoint (events
//! 350/s burst and 3 500/min steady; bulk jobs 10/s, 150/min; profile import 75/s,
//! 750/min), on top of the destination's own `rate_limit`; each bucket also follows the
//! `RateLimit-Remaining` / `-Reset` of its endpoint's answers and a 429's `Retry-After`. A batch that fails midway is
//! sent again whole: Klaviyo keeps the first event per (profile, metric, unique_id), and
//! unique_id is the messageId, so a repeat is not a second event.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};

use serde::Deserialize;

use super::{
    check_url, http, secret_from_env, AnyDestination, BatchShape, Check, Destination,
    DestinationConfig, KeyError, Kind, Outgoing, Preview, Refusal, SendError, Sending,
};
use crate::pace::RateLimiter;
use crate::queue::Checkpoint;
use crate::translate::klaviyo_body::{
    write_bulk_item, write_event, write_profile_import, write_profile_item, BULK_JOB_HEAD,
    BULK_JOB_TAIL, PROFILE_JOB_HEAD, PROFILE_JOB_TAIL,
};
use crate::translate::{
    translate, KlaviyoEvent, Mapping, Profile, ProfileUpsert, Revision, Translation,
};

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

/// `kind = "klaviyo"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlaviyoConfig {
    /// Environment variable with the private API key.
    pub api_key_env: String,
    /// API base URL (default `https://a.klaviyo.com`).
    pub base_url: Option<String>,
    /// The `revision` header; `2023-01-24` sends seed 002's flat bodies.
    pub revision: Option<String>,
    /// Events through bulk jobs (up to 1 000 per request); default true.
    pub bulk: Option<bool>,
    /// How Segment messages become events and profiles (`translate::Mapping`).
    pub mapping: Option<Mapping>,
    /// What was last sent for each profile, to skip identifies that change nothing.
    pub profile_cache: Option<ProfileCacheConfig>,
}

/// `profile_cache = { ttl = "1h", max_entries = 1000000 }`; `ttl = "0s"` turns it off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileCacheConfig {
    #[serde(default = "default_profile_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default = "default_profile_entries")]
    pub max_entries: u64,
}

impl Default for ProfileCacheConfig {
    fn default() -> Self {
        ProfileCacheConfig {
            ttl: default_profile_ttl(),
            max_entries: default_profile_entries(),
        }
    }
}

fn default_profile_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_profile_entries() -> u64 {
    1_000_000
}

impl Kind for KlaviyoConfig {
    const NAME: &'static str = "klaviyo";
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        if let Some(url) = &self.base_url {
            check_url("base_url", url)?;
        }
        if let Some(revision) = &self.revision {
            Revision::from_header(revision)
                .map_err(|e| KeyError::new("revision", e.to_string()))?;
        }
        Ok(())
    }

    fn batch_shape(&self) -> BatchShape {
        // A bulk job takes up to 1 000 events and 5 MB. Four batches at once: while one
        // waits for its profile job to finish, other users' messages keep going.
        let shape = if self.bulk != Some(false) {
            BatchShape::new(1000, 4 * 1024 * 1024, 1000)
        } else {
            BatchShape::new(100, 4 * 1024 * 1024, 200)
        };
        shape.with_concurrency(KLAVIYO_CONCURRENCY)
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(KlaviyoDestination::new(config, self)?))
    }

    /// The requests it would send, from the real translation.
    fn preview(&self, message: &[u8]) -> anyhow::Result<Preview> {
        KlaviyoBodies::new(self)?.preview(message)
    }
}

/// What decides a Klaviyo destination's request bodies: shared by sending and by
/// `fanout route`, which shows them without sending.
pub struct KlaviyoBodies {
    pub mapping: Mapping,
    pub revision: Revision,
    /// Events through bulk jobs (only the JSON:API revisions have them).
    pub bulk: bool,
}

/// One request to Klaviyo: the API path and the JSON body.
pub struct KlaviyoRequest {
    pub path: &'static str,
    pub body: Vec<u8>,
}

impl KlaviyoBodies {
    pub fn new(config: &KlaviyoConfig) -> anyhow::Result<KlaviyoBodies> {
        let revision = Revision::from_header(
            config
                .revision
                .as_deref()
                .unwrap_or(Revision::DEFAULT_HEADER),
        )?;
        Ok(KlaviyoBodies {
            mapping: config.mapping.clone().unwrap_or_default(),
            revision,
            bulk: config.bulk.unwrap_or(true) && revision == Revision::Current,
        })
    }

    pub fn translate(&self, message: &[u8], now: DateTime<Utc>) -> Translation {
        translate(message, &self.mapping, self.revision, now)
    }

    /// The requests `message` becomes, as JSON (`{"path", "body"}` each), or why none:
    /// what `fanout route` and the live view show.
    pub fn preview(&self, message: &[u8]) -> anyhow::Result<Preview> {
        let requests = match self.translate(message, Utc::now()) {
            Translation::Events(events) => self.requests(&[], &events.iter().collect::<Vec<_>>()),
            Translation::Profile(upsert) => self.requests(&[upsert.as_ref()], &[]),
            Translation::Skip { reason } => return Ok(Preview::Skip(reason)),
            Translation::Reject { reason } => return Ok(Preview::Refuse(reason)),
        };
        let requests = requests
            .into_iter()
            .map(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body)?;
                Ok(serde_json::json!({ "path": r.path, "body": body }))
            })
            .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
        Ok(Preview::Send(serde_json::Value::Array(requests)))
    }

    /// The requests for translated profiles and events, in sending order: profiles
    /// first (a profile should exist before events that name it), then the events.
    pub fn requests(
        &self,
        profiles: &[&ProfileUpsert],
        events: &[&KlaviyoEvent],
    ) -> Vec<KlaviyoRequest> {
        let mut requests: Vec<KlaviyoRequest> = profile_requests(profiles)
            .into_iter()
            .map(|(request, _)| request)
            .collect();
        requests.extend(self.event_requests(events));
        requests
    }

    /// Events as bulk jobs, or one request each.
    fn event_requests(&self, events: &[&KlaviyoEvent]) -> Vec<KlaviyoRequest> {
        if self.bulk {
            KlaviyoDestination::bulk_jobs(events)
                .into_iter()
                .map(|body| KlaviyoRequest {
                    path: BULK_JOBS,
                    body,
                })
                .collect()
        } else {
            events
                .iter()
                .map(|event| {
                    let mut body = Vec::new();
                    write_event(&mut body, event, self.revision);
                    KlaviyoRequest { path: EVENTS, body }
                })
                .collect()
        }
    }
}

/// Profile upserts as requests, each with the range of `profiles` it carries: one import
/// each for a handful, else bulk jobs of at most 10 000 profiles and 5 MB.
fn profile_requests(profiles: &[&ProfileUpsert]) -> Vec<(KlaviyoRequest, Range<usize>)> {
    let mut requests = Vec::new();
    if profiles.len() <= PROFILE_JOB_AFTER {
        for (i, upsert) in profiles.iter().enumerate() {
            let mut body = Vec::new();
            write_profile_import(&mut body, upsert);
            requests.push((
                KlaviyoRequest {
                    path: PROFILE_IMPORT,
                    body,
                },
                i..i + 1,
            ));
        }
        return requests;
    }
    let mut start = 0;
    let mut body = Vec::new();
    let close = |body: &mut Vec<u8>, range: Range<usize>, requests: &mut Vec<_>| {
        body.extend_from_slice(PROFILE_JOB_TAIL.as_bytes());
        let body = std::mem::take(body);
        requests.push((
            KlaviyoRequest {
                path: PROFILE_JOBS,
                body,
            },
            range,
        ));
    };
    for (i, upsert) in profiles.iter().enumerate() {
        let mut item = Vec::new();
        write_profile_item(&mut item, upsert);
        let full = i - start == PROFILE_JOB_MAX
            || body.len() + item.len() + PROFILE_JOB_TAIL.len() + 1 > PROFILE_JOB_MAX_BYTES;
        if i > start && full {
            close(&mut body, start..i, &mut requests);
            start = i;
        }
        if i == start {
            body.extend_from_slice(PROFILE_JOB_HEAD.as_bytes());
        } else {
            body.push(b',');
        }
        body.extend_from_slice(&item);
    }
    close(&mut body, start..profiles.len(), &mut requests);
    requests
}

/// One profile as the batch sends it: the upserts of the messages in `messages` merged,
/// later traits winning, and each message's own (identity, body) hashes for the cache.
struct Merged {
    upsert: ProfileUpsert,
    messages: Vec<usize>,
    hashes: Vec<(u64, u64)>,
}

/// Which profile an upsert is for: its identifiers.
fn identity(profile: &Profile) -> u64 {
    let mut key = Vec::new();
    for id in [
        &profile.external_id,
        &profile.email,
        &profile.phone_number,
        &profile.anonymous_id,
    ] {
        key.extend_from_slice(id.as_deref().unwrap_or_default().as_bytes());
        key.push(0);
    }
    xxhash_rust::xxh3::xxh3_64(&key)
}

/// (identity, body) hashes of an upsert, for the unchanged-profile cache.
fn profile_hashes(upsert: &ProfileUpsert) -> (u64, u64) {
    let mut body = Vec::new();
    write_profile_import(&mut body, upsert);
    (identity(&upsert.profile), xxhash_rust::xxh3::xxh3_64(&body))
}

/// Merges the batch's upserts per profile (same identifiers), in order, later values
/// winning field by field; custom properties are merged key by key.
fn merge_profiles(profiles: &[(usize, &ProfileUpsert)]) -> Vec<Merged> {
    let mut merged: Vec<Merged> = Vec::new();
    let mut by_identity: HashMap<u64, usize> = HashMap::new();
    for &(message, upsert) in profiles {
        let hashes = profile_hashes(upsert);
        match by_identity.get(&hashes.0) {
            Some(&at) => {
                let into = &mut merged[at];
                merge_profile(&mut into.upsert.profile, &upsert.profile);
                into.messages.push(message);
                into.hashes.push(hashes);
            }
            None => {
                by_identity.insert(hashes.0, merged.len());
                merged.push(Merged {
                    upsert: upsert.clone(),
                    messages: vec![message],
                    hashes: vec![hashes],
                });
            }
        }
    }
    merged
}

fn merge_profile(into: &mut Profile, later: &Profile) {
    let take = |into: &mut Option<String>, later: &Option<String>| {
        if later.is_some() {
            into.clone_from(later);
        }
    };
    take(&mut into.first_name, &later.first_name);
    take(&mut into.last_name, &later.last_name);
    take(&mut into.organization, &later.organization);
    take(&mut into.title, &later.title);
    take(&mut into.image, &later.image);
    match (&mut into.location, &later.location) {
        (Some(into), Some(later)) => {
            take(&mut into.address1, &later.address1);
            take(&mut into.city, &later.city);
            take(&mut into.region, &later.region);
            take(&mut into.zip, &later.zip);
            take(&mut into.country, &later.country);
        }
        (into @ None, Some(later)) => *into = Some(later.clone()),
        _ => {}
    }
    for (key, value) in &later.properties {
        into.properties.insert(key.clone(), value.clone());
    }
}

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
}

/// A profile import job that Klaviyo took: its id, and which merged profiles it carries.
struct ProfileJob {
    id: String,
    profiles: Range<usize>,
}

impl KlaviyoDestination {
    pub fn new(config: &DestinationConfig, own: &KlaviyoConfig) -> anyhow::Result<Self> {
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
            events_limit: RateLimiter::new(3500.0 / 60.0, 350),
            bulk_limit: RateLimiter::new(150.0 / 60.0, 10),
            profiles_limit: RateLimiter::new(750.0 / 60.0, 75),
            profile_jobs_limit: RateLimiter::new(150.0 / 60.0, 10),
            job_reads_limit: RateLimiter::new(3500.0 / 60.0, 350),
            profile_cache: profile_cache(&own.profile_cache.clone().unwrap_or_default()),
        })
    }

    fn content_type(&self) -> &'static str {
        match self.bodies.revision {
            Revision::V2023_01_24 => "application/json",
            Revision::Current => "application/vnd.api+json",
        }
    }

    async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        limiter: &RateLimiter,
    ) -> Result<http::Answer, SendError> {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, self.content_type())
            .body(body);
        self.call(request, limiter).await
    }

    async fn get(&self, path: &str, limiter: &RateLimiter) -> Result<http::Answer, SendError> {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.call(self.client.get(url), limiter).await
    }

    /// One request, paced by `limiter`, which learns from the answer's `RateLimit-*`
    /// headers and from a 429's `Retry-After` how much of the endpoint's window is left.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        limiter: &RateLimiter,
    ) -> Result<http::Answer, SendError> {
        limiter.acquire(1).await;
        let request = request
            .header(AUTHORIZATION, self.authorization.clone())
            .header("revision", self.revision_header.clone())
            .header(ACCEPT, self.content_type());
        let result = http::send_for_answer(request).await;
        match &result {
            Ok(answer) => {
                if let Some((remaining, reset)) = rate_limit_left(&answer.headers) {
                    limiter.observe(remaining, reset);
                }
            }
            Err(SendError::Retryable {
                status: Some(429),
                retry_after,
                ..
            }) => limiter.observe(0, retry_after.unwrap_or(Duration::from_secs(1))),
            Err(_) => {}
        }
        result
    }

    /// Sends the merged profiles: imports one by one, or jobs, which come back to be
    /// followed once the events went.
    async fn send_profiles(&self, merged: &[Merged]) -> Result<Vec<ProfileJob>, SendError> {
        let upserts: Vec<&ProfileUpsert> = merged.iter().map(|m| &m.upsert).collect();
        let mut jobs = Vec::new();
        for (request, profiles) in profile_requests(&upserts) {
            if request.path == PROFILE_IMPORT {
                self.post(request.path, request.body, &self.profiles_limit)
                    .await?;
                continue;
            }
            let answer = self
                .post(request.path, request.body, &self.profile_jobs_limit)
                .await?;
            let id = serde_json::from_str::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.pointer("/data/id")?.as_str().map(str::to_string))
                .ok_or_else(|| SendError::Retryable {
                    status: None,
                    retry_after: None,
                    detail: "a profile import job was taken without an id".into(),
                    answer: None,
                })?;
            jobs.push(ProfileJob { id, profiles });
        }
        Ok(jobs)
    }

    /// Waits for a profile job to finish; returns the rows (indices into the job's
    /// profiles) Klaviyo refused, with its reason and the error it gave.
    async fn follow(&self, job: &ProfileJob) -> Result<Vec<(usize, String, String)>, SendError> {
        let path = format!("{PROFILE_JOBS}/{}", job.id);
        let started = tokio::time::Instant::now();
        let mut pause = JOB_POLL_FIRST;
        let failed = loop {
            let answer = self.get(&path, &self.job_reads_limit).await?;
            let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            let attributes = &status["data"]["attributes"];
            match attributes["status"].as_str().unwrap_or_default() {
                "complete" => break attributes["failed_count"].as_u64().unwrap_or(0),
                "cancelled" | "failed" => {
                    return Err(SendError::Retryable {
                        status: None,
                        retry_after: None,
                        detail: format!("profile import job ended {}", attributes["status"]),
                        answer: Some(answer.body),
                    })
                }
                _ => {}
            }
            if started.elapsed() > PROFILE_JOB_WAIT {
                return Err(SendError::Retryable {
                    status: None,
                    retry_after: None,
                    detail: format!("profile import job {} did not finish in time", job.id),
                    answer: None,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(JOB_POLL_MAX);
        };
        let mut refused = Vec::new();
        if failed == 0 {
            return Ok(refused);
        }
        let mut next = Some(format!("{path}/import-errors"));
        while let Some(page) = next.take() {
            let answer = self.get(&page, &self.job_reads_limit).await?;
            let errors: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            for error in errors["data"].as_array().into_iter().flatten() {
                let attributes = &error["attributes"];
                let row = attributes["source"]["pointer"]
                    .as_str()
                    .and_then(row_of_pointer)
                    .filter(|&row| row < job.profiles.len());
                if let Some(row) = row {
                    let reason = format!(
                        "{}: {}",
                        attributes["code"].as_str().unwrap_or("import_error"),
                        attributes["detail"].as_str().unwrap_or_default()
                    );
                    refused.push((row, reason, error.to_string()));
                }
            }
            next = errors["links"]["next"].as_str().map(str::to_string);
        }
        Ok(refused)
    }

    /// Bulk job bodies of at most 1 000 events and 5 MB each. An event repeating an
    /// earlier (profile, metric, unique_id) is left out: Klaviyo fails a whole job over a
    /// repeat, and would keep only the first anyway.
    fn bulk_jobs(events: &[&KlaviyoEvent]) -> Vec<Vec<u8>> {
        let mut jobs = Vec::new();
        let mut items: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        let mut seen = HashSet::new();
        let mut flush = |items: &mut Vec<Vec<u8>>, bytes: &mut usize| {
            if items.is_empty() {
                return;
            }
            let mut body = Vec::with_capacity(*bytes + items.len() + 128);
            body.extend_from_slice(BULK_JOB_HEAD.as_bytes());
            body.extend_from_slice(&items.join(&b','));
            body.extend_from_slice(BULK_JOB_TAIL.as_bytes());
            jobs.push(body);
            items.clear();
            *bytes = 0;
        };
        for event in events {
            let p = &event.profile;
            let who = (
                p.external_id.as_deref(),
                p.email.as_deref(),
                p.phone_number.as_deref(),
                p.anonymous_id.as_deref(),
            );
            if !seen.insert((who, event.metric.as_str(), event.unique_id.as_str())) {
                continue;
            }
            let mut item = Vec::new();
            write_bulk_item(&mut item, event);
            if items.len() == BULK_MAX_EVENTS || bytes + item.len() + 1 > BULK_MAX_BYTES {
                flush(&mut items, &mut bytes);
            }
            bytes += item.len() + 1;
            items.push(item);
        }
        flush(&mut items, &mut bytes);
        jobs
    }
}

impl Destination for KlaviyoDestination {
    fn check(&self, message: &[u8]) -> Check {
        match self.bodies.translate(message, Utc::now()) {
            Translation::Profile(upsert) if self.unchanged(&upsert) => {
                Check::Skip("profile_unchanged")
            }
            sendable @ (Translation::Events(_) | Translation::Profile(_)) => {
                Check::Send(Some(Box::new(sendable)))
            }
            Translation::Skip { reason } => Check::Skip(reason),
            Translation::Reject { reason } => Check::Refuse {
                code: reason
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                detail: reason,
            },
        }
    }

    fn live_payload(&self, message: &[u8]) -> Option<serde_json::Value> {
        match self.bodies.preview(message) {
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
                    None => Cow::Owned(self.bodies.translate(m.json, Utc::now())),
                })
                .collect();
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
            let mut refused = Vec::new();
            for (at, profile) in merged.iter().enumerate() {
                match refused_profiles.get(&at) {
                    Some((reason, error)) => {
                        refused.extend(profile.messages.iter().map(|&index| Refusal {
                            index,
                            status: 400,
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
}

impl KlaviyoDestination {
    /// Whether this upsert's profile body is the one last sent for that profile.
    fn unchanged(&self, upsert: &ProfileUpsert) -> bool {
        let Some(cache) = &self.profile_cache else {
            return false;
        };
        let (who, body) = profile_hashes(upsert);
        cache.get(&who) == Some(body)
    }

    /// A profile went: each of its messages' bodies is now what Klaviyo has (the last
    /// one last, later traits having won the merge).
    fn remember(&self, profile: &Merged) {
        if let Some(cache) = &self.profile_cache {
            for &(who, body) in &profile.hashes {
                cache.insert(who, body);
            }
        }
    }
}

fn profile_cache(config: &ProfileCacheConfig) -> Option<moka::sync::Cache<u64, u64>> {
    (!config.ttl.is_zero()).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(config.ttl)
            .build()
    })
}

/// The row of a job's profile in an import error's `source.pointer`
/// (`/data/attributes/profiles/data/<row>/…`).
fn row_of_pointer(pointer: &str) -> Option<usize> {
    let rest = pointer.strip_prefix("/data/attributes/profiles/data/")?;
    rest.split('/').next()?.parse().ok()
}

/// `RateLimit-Remaining` and `RateLimit-Reset` (the first, tightest window's figures).
fn rate_limit_left(headers: &reqwest::header::HeaderMap) -> Option<(u32, Duration)> {
    let first = |name: &str| -> Option<u64> {
        let value = headers.get(name)?.to_str().ok()?;
        value.split([',', ';']).next()?.trim().parse().ok()
    };
    let remaining = u32::try_from(first("ratelimit-remaining")?).ok()?;
    let reset = Duration::from_secs(first("ratelimit-reset").unwrap_or(1));
    Some((remaining, reset))
}

/// The translation `check` prepared for a message.
fn prepared<'a>(message: &Outgoing<'a>) -> Option<&'a Translation> {
    message.prepared?.downcast_ref::<Translation>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_are_read_for_the_tightest_window() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("RateLimit-Remaining", "7, 7;w=1, 140;w=60".parse().unwrap());
        headers.insert("RateLimit-Reset", "1".parse().unwrap());
        assert_eq!(rate_limit_left(&headers), Some((7, Duration::from_secs(1))));
        headers.insert("RateLimit-Remaining", "0".parse().unwrap());
        headers.insert("RateLimit-Reset", "42".parse().unwrap());
        assert_eq!(
            rate_limit_left(&headers),
            Some((0, Duration::from_secs(42)))
        );
        assert_eq!(rate_limit_left(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn import_error_pointers_name_their_row() {
        assert_eq!(
            row_of_pointer("/data/attributes/profiles/data/12/attributes/email"),
            Some(12)
        );
        assert_eq!(row_of_pointer("/data/attributes/email"), None);
    }

    #[test]
    fn upserts_of_one_profile_merge_later_traits_winning() {
        let upsert = |external: &str, plan: &str, first: Option<&str>| ProfileUpsert {
            profile: Profile {
                external_id: Some(external.to_string()),
                first_name: first.map(str::to_string),
                properties: serde_json::json!({"plan": plan})
                    .as_object()
                    .unwrap()
                    .clone(),
                ..Profile::default()
            },
        };
        let (a1, b1, a2) = (
            upsert("a", "free", Some("Ann")),
            upsert("b", "pro", None),
            upsert("a", "max", None),
        );
        let merged = merge_profiles(&[(0, &a1), (1, &b1), (2, &a2)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].messages, vec![0, 2]);
        let a = &merged[0].upsert.profile;
        assert_eq!(a.properties["plan"], "max");
        assert_eq!(
            a.first_name.as_deref(),
            Some("Ann"),
            "a missing trait keeps the earlier"
        );
        assert_eq!(merged[1].messages, vec![1]);
    }

    #[test]
    fn a_handful_of_profiles_go_one_by_one_more_as_jobs() {
        let upserts: Vec<ProfileUpsert> = (0..12)
            .map(|i| ProfileUpsert {
                profile: Profile {
                    email: Some(format!("u{i}@example.com")),
                    ..Profile::default()
                },
            })
            .collect();
        let refs: Vec<&ProfileUpsert> = upserts.iter().collect();
        let few = profile_requests(&refs[..PROFILE_JOB_AFTER]);
        assert!(few.iter().all(|(r, _)| r.path == PROFILE_IMPORT));
        let many = profile_requests(&refs);
        assert_eq!(many.len(), 1);
        assert_eq!(many[0].0.path, PROFILE_JOBS);
        assert_eq!(many[0].1, 0..12);
        let body: serde_json::Value = serde_json::from_slice(&many[0].0.body).unwrap();
        assert_eq!(body["data"]["type"], "profile-bulk-import-job");
        assert_eq!(
            body["data"]["attributes"]["profiles"]["data"][11]["attributes"]["email"],
            "u11@example.com"
        );
    }
}
