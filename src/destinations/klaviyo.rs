//! `kind = "klaviyo"`: each message translated (`translate`) into Klaviyo events or a
//! profile upsert and sent to Klaviyo's API.
//!
//! - identify/group → `POST /api/profile-import`, before the batch's events (a profile
//!   should exist before events that name it);
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
//! 750/min), on top of the destination's own `rate_limit`. A batch that fails midway is
//! sent again whole: Klaviyo keeps the first event per (profile, metric, unique_id), and
//! unique_id is the messageId, so a repeat is not a second event.

use std::borrow::Cow;
use std::collections::HashSet;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};

use serde::Deserialize;

use super::{
    check_url, http, secret_from_env, AnyDestination, BatchShape, Check, Destination,
    DestinationConfig, KeyError, Kind, Outgoing, Preview, SendError, Sending,
};
use crate::pace::RateLimiter;
use crate::queue::Checkpoint;
use crate::translate::klaviyo_body::{
    write_bulk_item, write_event, write_profile_import, BULK_JOB_HEAD, BULK_JOB_TAIL,
};
use crate::translate::{translate, KlaviyoEvent, Mapping, ProfileUpsert, Revision, Translation};

pub const DEFAULT_BASE_URL: &str = "https://a.klaviyo.com";
const BULK_MAX_EVENTS: usize = 1000;
/// 5 MB, less room for the job's envelope.
const BULK_MAX_BYTES: usize = 5_000_000 - 256;

const PROFILE_IMPORT: &str = "/api/profile-import";
const BULK_JOBS: &str = "/api/event-bulk-create-jobs";
const EVENTS: &str = "/api/events";

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
        // A bulk job takes up to 1 000 events and 5 MB.
        if self.bulk != Some(false) {
            BatchShape::new(1000, 4 * 1024 * 1024, 1000)
        } else {
            BatchShape::new(100, 4 * 1024 * 1024, 200)
        }
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
        let bodies = KlaviyoBodies::new(self)?;
        let requests = match bodies.translate(message, Utc::now()) {
            Translation::Events(events) => bodies.requests(&[], &events.iter().collect::<Vec<_>>()),
            Translation::Profile(upsert) => bodies.requests(&[&upsert], &[]),
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

    /// The requests for translated profiles and events, in sending order: profiles
    /// first (a profile should exist before events that name it), then the events.
    pub fn requests(
        &self,
        profiles: &[&ProfileUpsert],
        events: &[&KlaviyoEvent],
    ) -> Vec<KlaviyoRequest> {
        let mut requests = Vec::new();
        for upsert in profiles {
            let mut body = Vec::new();
            write_profile_import(&mut body, upsert);
            requests.push(KlaviyoRequest {
                path: PROFILE_IMPORT,
                body,
            });
        }
        if self.bulk {
            for body in KlaviyoDestination::bulk_jobs(events) {
                requests.push(KlaviyoRequest {
                    path: BULK_JOBS,
                    body,
                });
            }
        } else {
            for event in events {
                let mut body = Vec::new();
                write_event(&mut body, event, self.revision);
                requests.push(KlaviyoRequest { path: EVENTS, body });
            }
        }
        requests
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
    ) -> Result<(), SendError> {
        limiter.acquire(1).await;
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(AUTHORIZATION, self.authorization.clone())
            .header("revision", self.revision_header.clone())
            .header(CONTENT_TYPE, self.content_type())
            .header(ACCEPT, self.content_type())
            .body(body);
        http::send(request).await
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
            for translation in &translations {
                match translation.as_ref() {
                    Translation::Events(more) => events.extend(more),
                    Translation::Profile(upsert) => profiles.push(upsert.as_ref()),
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
            for request in self.bodies.requests(&profiles, &events) {
                let limiter = match request.path {
                    PROFILE_IMPORT => &self.profiles_limit,
                    BULK_JOBS => &self.bulk_limit,
                    _ => &self.events_limit,
                };
                self.post(request.path, request.body, limiter).await?;
            }
            Ok(0)
        })
    }
}

/// The translation `check` prepared for a message.
fn prepared<'a>(message: &Outgoing<'a>) -> Option<&'a Translation> {
    message.prepared?.downcast_ref::<Translation>()
}
