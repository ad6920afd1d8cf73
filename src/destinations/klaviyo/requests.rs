//! The requests a Klaviyo batch becomes: profile imports or import jobs, then events
//! one by one or as bulk jobs, within Klaviyo's per-request limits. Shared by sending and
//! by `fanout route` and the live view, which show them without sending.

use std::collections::HashSet;
use std::ops::Range;

use chrono::{DateTime, Utc};

use super::translate::body::{
    write_bulk_item, write_event, write_profile_import, write_profile_item, BULK_JOB_HEAD,
    BULK_JOB_TAIL, PROFILE_JOB_HEAD, PROFILE_JOB_TAIL,
};
use super::translate::{
    names, translate, KlaviyoEvent, Mapping, ProfileUpsert, Revision, Translation,
};
use super::{
    KlaviyoConfig, BULK_JOBS, BULK_MAX_BYTES, BULK_MAX_EVENTS, EVENTS, PROFILE_IMPORT,
    PROFILE_JOBS, PROFILE_JOB_AFTER, PROFILE_JOB_MAX, PROFILE_JOB_MAX_BYTES,
};
use crate::destinations::Preview;

/// What decides a Klaviyo destination's request bodies: shared by sending and by
/// `fanout route`, which shows them without sending.
pub struct KlaviyoBodies {
    /// The configured mapping with the standard and `metric_names` renames folded in.
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
            mapping: names::with_names(
                config.mapping.clone().unwrap_or_default(),
                config.ecommerce_names,
                &config.metric_names,
            ),
            revision,
            bulk: config.bulk.unwrap_or(true) && revision == Revision::Current,
        })
    }

    pub fn translate(&self, message: &[u8], now: DateTime<Utc>) -> Translation {
        translate(message, &self.mapping, self.revision, now)
    }

    /// The requests `message` becomes at `now`, as JSON (`{"path", "body"}` each), or why
    /// none: what `fanout route` and the live view show.
    pub fn preview(&self, message: &[u8], now: DateTime<Utc>) -> anyhow::Result<Preview> {
        let requests = match self.translate(message, now) {
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
    pub(super) fn event_requests(&self, events: &[&KlaviyoEvent]) -> Vec<KlaviyoRequest> {
        if self.bulk {
            bulk_jobs(events)
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
pub(super) fn profile_requests(profiles: &[&ProfileUpsert]) -> Vec<(KlaviyoRequest, Range<usize>)> {
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

/// Bulk job bodies of at most 1 000 events and 5 MB each. An event repeating an
/// earlier (profile, metric, unique_id) is left out: Klaviyo fails a whole job over a
/// repeat, and would keep only the first anyway.
pub(super) fn bulk_jobs(events: &[&KlaviyoEvent]) -> Vec<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::klaviyo::translate::Profile;

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
