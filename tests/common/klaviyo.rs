//! A Klaviyo-shaped receiver on loopback, built on `receiver::Receiver`: it checks the
//! `Authorization: Klaviyo-API-Key …` and `revision` headers of every request (a wrong one
//! gets Klaviyo's `401` error body), records every request, and answers as Klaviyo does on
//! success (`202` for events and bulk jobs, `201` with the profile for profile-import) or
//! what a test scripts: queued replies (`receiver.push_reply`) first, then a reply for any
//! request holding a given `unique_id` (`answer_for`).
//!
//! Privacy deletions: `POST /api/data-privacy-deletion-jobs` takes exactly one of email,
//! phone number or profile id (else `400`) and removes the matching profiles from the
//! store; `GET /api/profiles?filter=equals(external_id,"…")` finds a stored profile by
//! its external_id (its id is `01P-<external_id>`).
//!
//! Profile bulk import jobs are taken (`202` with a job id), report `processing` on their
//! first status read and `complete` after, with an import error for every profile whose
//! email contains `refuse` (such a profile sent to `/api/profile-import` gets a `400`).
//! Every profile that went in is applied to a store of profiles (`profile_state`), later
//! values winning, as Klaviyo keeps them. Each endpoint enforces Klaviyo's documented
//! limits (a burst per second and a steady rate per minute, fixed windows): past them a
//! `429` with `Retry-After`; every other answer carries `RateLimit-Limit / -Remaining /
//! -Reset` for the tighter window (`too_many` counts the 429s).
//!
//! The recorded bodies are read back as events and profiles (`events`, `profiles`), and
//! checked with `assert_valid`: headers, and every body against the models of Klaviyo's
//! official Python SDK (`tests/klaviyo_models.py`, run with the venv `scripts/test` creates:
//! `FANOUT_KLAVIYO_PYTHON`, default `target/klaviyo-venv/bin/python`), or, for revision
//! 2023-01-24 (which that SDK no longer models), against seed 002's flat shape.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::receiver::{ReceivedRequest, Receiver, Reply};

/// The private key the receiver expects unless told otherwise.
pub const API_KEY: &str = "pk_test_0123456789abcdef";
/// The environment variable the test configs name in `api_key_env`.
pub const KEY_ENV: &str = "KLAVIYO_KEY";
/// The current revision (the destination's default).
pub const CURRENT: &str = "2026-10-15";
/// Seed 002's revision, with flat bodies.
pub const FLAT: &str = "2023-01-24";

pub const EVENTS: &str = "/api/events";
pub const BULK: &str = "/api/event-bulk-create-jobs";
pub const PROFILE_IMPORT: &str = "/api/profile-import";
pub const PROFILE_JOBS: &str = "/api/profile-bulk-import-jobs";
pub const SUBSCRIBE: &str = "/api/profile-subscription-bulk-create-jobs";
pub const UNSUBSCRIBE: &str = "/api/profile-subscription-bulk-delete-jobs";
pub const SUPPRESS: &str = "/api/profile-suppression-bulk-create-jobs";
pub const UNSUPPRESS: &str = "/api/profile-suppression-bulk-delete-jobs";
pub const DELETION_JOBS: &str = "/api/data-privacy-deletion-jobs";
pub const PROFILES: &str = "/api/profiles";
/// The rate buckets of `POST` and `DELETE /api/lists/{id}/relationships/profiles`.
pub const LIST_ADD: &str = "list add";
pub const LIST_REMOVE: &str = "list remove";

/// The rate bucket of a consent or list request (`None` for other requests): the job
/// endpoints' paths, `LIST_ADD` / `LIST_REMOVE` for list relationships of any list.
pub fn action_endpoint(method: &str, path: &str) -> Option<&'static str> {
    let list = path
        .strip_prefix("/api/lists/")
        .and_then(|rest| rest.strip_suffix("/relationships/profiles"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'));
    match (method, path) {
        ("POST", SUBSCRIBE) => Some(SUBSCRIBE),
        ("POST", UNSUBSCRIBE) => Some(UNSUBSCRIBE),
        ("POST", SUPPRESS) => Some(SUPPRESS),
        ("POST", UNSUPPRESS) => Some(UNSUPPRESS),
        ("POST", _) if list => Some(LIST_ADD),
        ("DELETE", _) if list => Some(LIST_REMOVE),
        _ => None,
    }
}

/// The profile rows of a consent job (`data.attributes.profiles.data[]`) or a list
/// relationships call (`data[]`).
pub fn action_rows(r: &ReceivedRequest) -> Vec<Value> {
    let Some(body) = r.json() else {
        return Vec::new();
    };
    let rows = body
        .pointer("/data/attributes/profiles/data")
        .or_else(|| body.get("data").filter(|d| d.is_array()));
    rows.and_then(Value::as_array).cloned().unwrap_or_default()
}

/// Per endpoint: (burst per second, steady per minute), Klaviyo's documented limits.
fn limits_of(path: &str) -> (u32, u32) {
    match path {
        EVENTS => (350, 3500),
        BULK | PROFILE_JOBS | LIST_ADD | LIST_REMOVE => (10, 150),
        PROFILE_IMPORT => (75, 750),
        SUBSCRIBE | UNSUBSCRIBE | SUPPRESS | UNSUPPRESS => (75, 700),
        DELETION_JOBS => (3, 60),
        PROFILES => (75, 750),
        _ => (350, 3500), // reads of jobs
    }
}

/// What the receiver keeps between requests: jobs, the profiles as Klaviyo would hold
/// them, and each endpoint's rate windows.
#[derive(Default)]
struct State {
    jobs: HashMap<String, Job>,
    next_job: u64,
    /// By external_id (else email): the profile's attributes.
    profiles: HashMap<String, serde_json::Map<String, Value>>,
    /// Per endpoint: (second, count in it, minute, count in it).
    windows: HashMap<String, (u64, u32, u64, u32)>,
    too_many: u64,
    /// Jobs report `processing` until this long after they were taken.
    job_time: Duration,
}

struct Job {
    total: usize,
    /// (row, detail) of the refused profiles.
    refused: Vec<(usize, String)>,
    reads: u32,
    taken: Instant,
}

/// Klaviyo's JSON:API media type (revision 2023-01-24 used `application/json`).
pub const JSON_API: &str = "application/vnd.api+json";

/// A Klaviyo error body: `{"errors":[{status, code, title, detail, source.pointer}]}`.
pub fn error_body(status: u16, code: &str, title: &str, detail: &str, pointer: &str) -> String {
    json!({"errors": [{
        "id": "0f1e2d3c-4b5a-6978-8a9b-acbdcedf0011",
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
        "source": {"pointer": pointer},
    }]})
    .to_string()
}

/// A reply with Klaviyo's content type.
pub fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), JSON_API.into())],
        body: body.as_bytes().to_vec(),
        delay: None,
    }
}

/// What the receiver expects of every request.
struct Expect {
    api_key: String,
    revision: String,
}

/// The Klaviyo stand-in. Dropping it stops it.
pub struct Klaviyo {
    pub receiver: Receiver,
    expect: Arc<Mutex<Expect>>,
    rules: Arc<Mutex<Vec<(String, Reply)>>>,
    state: Arc<Mutex<State>>,
}

/// One event as sent, whichever body carried it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Index of the request in `requests()`.
    pub request: usize,
    pub path: String,
    pub metric: String,
    /// The profile's attributes (current revisions) or the flat `$`-keyed profile.
    pub profile: Value,
    pub properties: Value,
    pub time: Option<String>,
    pub value: Option<Value>,
    pub value_currency: Option<String>,
    pub unique_id: Option<String>,
}

impl Klaviyo {
    /// Starts on a free port, expecting `API_KEY` and `revision`.
    pub async fn start(revision: &str) -> Klaviyo {
        let receiver = Receiver::start().await;
        let expect = Arc::new(Mutex::new(Expect {
            api_key: API_KEY.to_string(),
            revision: revision.to_string(),
        }));
        let rules: Arc<Mutex<Vec<(String, Reply)>>> = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(State::default()));
        let (e, r, st) = (expect.clone(), rules.clone(), state.clone());
        receiver.respond_with(move |request| {
            let expect = e.lock().unwrap();
            let mut state = st.lock().unwrap();
            Some(answer(request, &expect, &r, &mut state))
        });
        Klaviyo {
            receiver,
            expect,
            rules,
            state,
        }
    }

    /// The profile Klaviyo would hold for `id` (an external_id, else an email).
    pub fn profile_state(&self, id: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.profiles.get(id).cloned().map(Value::Object)
    }

    /// Stores a profile as if it had been imported (`attributes` as in a profile-import).
    pub fn add_profile(&self, attributes: Value) {
        self.state.lock().unwrap().apply(&attributes);
    }

    /// Profile jobs take at least `time` to complete from now on.
    pub fn slow_jobs(&self, time: Duration) {
        self.state.lock().unwrap().job_time = time;
    }

    /// Whether every profile job taken so far reported `complete`.
    pub fn jobs_complete(&self) -> bool {
        let state = self.state.lock().unwrap();
        state
            .jobs
            .values()
            .all(|j| j.reads > 1 && j.taken.elapsed() >= state.job_time)
    }

    /// How many requests were answered 429.
    pub fn too_many(&self) -> u64 {
        self.state.lock().unwrap().too_many
    }

    /// The `base_url` for fanout's config.
    pub fn base_url(&self) -> String {
        self.receiver.url("")
    }

    pub fn revision(&self) -> String {
        self.expect.lock().unwrap().revision.clone()
    }

    /// From now on accept `key` (and refuse every other).
    pub fn expect_api_key(&self, key: &str) {
        self.expect.lock().unwrap().api_key = key.to_string();
    }

    /// Answers `reply` to every request (with the right headers) holding an event whose
    /// `unique_id` is `unique_id`.
    pub fn answer_for(&self, unique_id: &str, reply: Reply) {
        self.rules
            .lock()
            .unwrap()
            .push((unique_id.to_string(), reply));
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.receiver.requests()
    }

    /// The events of the requests answered with a 2xx, in arrival order (repeats kept).
    pub fn events(&self) -> Vec<Event> {
        self.requests()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ok())
            .flat_map(|(i, r)| events_of(i, r))
            .collect()
    }

    /// The profile attributes of the profile-imports and profile jobs answered with a
    /// 2xx, in order.
    pub fn profiles(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.ok())
            .flat_map(|r| profiles_of(r).into_iter().map(|(_, p)| p))
            .collect()
    }

    /// The unique_ids of `events()`.
    pub fn unique_ids(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| e.unique_id)
            .collect()
    }

    /// Waits until every id in `wanted` arrived as an event's unique_id in a 2xx-answered
    /// request (or the timeout passes); returns the ids still missing.
    pub async fn wait_for_unique_ids(
        &self,
        wanted: &HashSet<String>,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: HashSet<String> = self.unique_ids().into_iter().collect();
            let mut missing: Vec<String> = wanted.difference(&got).cloned().collect();
            if missing.is_empty() || Instant::now() > deadline {
                missing.sort();
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `done(self)` holds; fails after `timeout` with `what` and a summary of
    /// the requests so far.
    pub async fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Klaviyo) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {timeout:?}, still waiting for {what}; requests so far:\n{}",
                self.summary()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line per request: path, answer, unique_ids, header problems.
    pub fn summary(&self) -> String {
        let expect = self.expect.lock().unwrap();
        self.requests()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let ids: Vec<String> = events_of(i, r)
                    .into_iter()
                    .map(|e| e.unique_id.unwrap_or_default())
                    .collect();
                let problems = header_problems(r, &expect.revision, &expect.api_key);
                format!(
                    "  #{i} {} {} -> {} ids={ids:?}{}",
                    r.method,
                    r.path,
                    r.status,
                    if problems.is_empty() {
                        String::new()
                    } else {
                        format!(" header problems: {problems:?}")
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails unless every request so far went to a known path with the expected headers
    /// and a body Klaviyo's models accept (seed 002's shape for revision 2023-01-24).
    pub async fn assert_valid(&self) {
        let requests = self.requests();
        assert!(!requests.is_empty(), "no request reached the receiver");
        let (revision, api_key) = {
            let e = self.expect.lock().unwrap();
            (e.revision.clone(), e.api_key.clone())
        };
        let flat = revision == FLAT;
        let mut problems = Vec::new();
        let mut for_sdk = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let path = path_of(r);
            if r.method == "GET" && (path.starts_with(PROFILE_JOBS) || path == PROFILES) {
                // A read has no body, so no content-type.
                let problems_here = header_problems(r, &revision, &api_key);
                for p in problems_here
                    .into_iter()
                    .filter(|p| !p.starts_with("content-type"))
                {
                    problems.push(format!("#{i} {path}: {p}"));
                }
                continue;
            }
            let action = action_endpoint(&r.method, path);
            if action.is_none()
                && (r.method != "POST"
                    || ![EVENTS, BULK, PROFILE_IMPORT, PROFILE_JOBS, DELETION_JOBS].contains(&path))
            {
                problems.push(format!(
                    "#{i}: {} {} is no Klaviyo endpoint",
                    r.method, r.path
                ));
                continue;
            }
            for p in header_problems(r, &revision, &api_key) {
                problems.push(format!("#{i} {path}: {p}"));
            }
            let Some(body) = r.json() else {
                problems.push(format!(
                    "#{i} {path}: body is not JSON: {}",
                    String::from_utf8_lossy(&r.body)
                ));
                continue;
            };
            if flat && path == BULK {
                problems.push(format!("#{i}: a bulk job with revision {FLAT}"));
            } else if flat && path == EVENTS {
                for p in flat_shape_problems(&body) {
                    problems.push(format!("#{i} {path} (seed 002 shape): {p}: {body}"));
                }
            } else {
                // List calls are checked as `<METHOD> /api/lists/{id}/relationships/profiles`.
                let model_path = match action {
                    Some(LIST_ADD | LIST_REMOVE) => {
                        format!("{} /api/lists/{{id}}/relationships/profiles", r.method)
                    }
                    _ => path.to_string(),
                };
                for_sdk.push((i, model_path, body));
            }
        }
        let lines: Vec<Value> = for_sdk
            .iter()
            .map(|(_, path, body)| json!({"path": path, "body": body}))
            .collect();
        let verdicts = validate_with_sdk(lines).await;
        for ((i, path, body), verdict) in for_sdk.iter().zip(&verdicts) {
            if let Err(e) = verdict {
                problems.push(format!(
                    "#{i} {path} (Klaviyo SDK model): {e}\n    body: {body}"
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "{} problem(s) with the requests sent to Klaviyo:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
}

/// The path without a trailing `/` (Klaviyo's docs write `/api/events/`).
pub fn path_of(r: &ReceivedRequest) -> &str {
    let path = r.path.trim_end_matches('/');
    if path.is_empty() {
        "/"
    } else {
        path
    }
}

/// The events in one request's body (none for other paths or bodies of another shape).
pub fn events_of(index: usize, r: &ReceivedRequest) -> Vec<Event> {
    let Some(body) = r.json() else {
        return Vec::new();
    };
    let path = path_of(r).to_string();
    let event = |attributes: &Value, profile: Value| {
        let metric = attributes
            .pointer("/metric/data/attributes/name")
            .or_else(|| attributes.pointer("/metric/name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Event {
            request: index,
            path: path.clone(),
            metric,
            profile,
            properties: attributes["properties"].clone(),
            time: attributes["time"].as_str().map(str::to_string),
            value: attributes.get("value").cloned(),
            value_currency: attributes["value_currency"].as_str().map(str::to_string),
            unique_id: attributes["unique_id"].as_str().map(str::to_string),
        }
    };
    match path.as_str() {
        EVENTS => {
            let attributes = &body["data"]["attributes"];
            let profile = attributes
                .pointer("/profile/data/attributes")
                .unwrap_or(&attributes["profile"])
                .clone();
            vec![event(attributes, profile)]
        }
        BULK => {
            let items = body
                .pointer("/data/attributes/events-bulk-create/data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            items
                .iter()
                .flat_map(|item| {
                    let profile = item
                        .pointer("/attributes/profile/data/attributes")
                        .cloned()
                        .unwrap_or_default();
                    let events = item
                        .pointer("/attributes/events/data")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    events
                        .iter()
                        .map(|e| event(&e["attributes"], profile.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Klaviyo's answer to one request, unless a queued reply came first.
fn answer(
    request: &ReceivedRequest,
    expect: &Expect,
    rules: &Mutex<Vec<(String, Reply)>>,
    state: &mut State,
) -> Reply {
    let path = path_of(request);
    let job_read = request.method == "GET" && path.starts_with(&format!("{PROFILE_JOBS}/"));
    let action = action_endpoint(&request.method, path);
    let known = request.method == "POST"
        && [EVENTS, BULK, PROFILE_IMPORT, PROFILE_JOBS, DELETION_JOBS].contains(&path)
        || request.method == "GET" && path == PROFILES;
    if !known && !job_read && action.is_none() {
        return reply(
            404,
            &error_body(404, "not_found", "Not found.", "Not found.", ""),
        );
    }
    let authorization = request.header("authorization").unwrap_or_default();
    if authorization != format!("Klaviyo-API-Key {}", expect.api_key) {
        return reply(
            401,
            &error_body(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                "Missing or invalid private key.",
                "",
            ),
        );
    }
    if request.header("revision") != Some(expect.revision.as_str()) {
        return reply(
            401,
            &error_body(
                401,
                "invalid_revision",
                "Invalid revision.",
                &format!(
                    "expected the revision header {:?}, got {:?}",
                    expect.revision,
                    request.header("revision")
                ),
                "",
            ),
        );
    }
    let endpoint = match action {
        _ if job_read => "job reads",
        Some(action) => action,
        None => path,
    };
    let limits = match state.take(endpoint, request.at) {
        Ok(limits) => limits,
        Err(retry_after) => {
            state.too_many += 1;
            let mut r = reply(
                429,
                &error_body(
                    429,
                    "throttled",
                    "Request was throttled.",
                    "Request was throttled.",
                    "",
                ),
            );
            r.headers
                .push(("Retry-After".into(), retry_after.to_string()));
            return r;
        }
    };
    let mut r = answer_within_limits(request, path, rules, state);
    r.headers.extend(limits);
    r
}

impl State {
    /// Counts a request against `endpoint`'s windows: its `RateLimit-*` headers, or how
    /// many seconds to wait (`Retry-After`) when a window is full.
    fn take(&mut self, endpoint: &str, at: Instant) -> Result<Vec<(String, String)>, u64> {
        let (burst, steady) = limits_of(endpoint);
        let now = at.duration_since(*EPOCH).as_millis() as u64;
        let (second, minute) = (now / 1000, now / 60_000);
        let w = self
            .windows
            .entry(endpoint.to_string())
            .or_insert((second, 0, minute, 0));
        if w.0 != second {
            *w = (second, 0, w.2, w.3);
        }
        if w.2 != minute {
            *w = (w.0, w.1, minute, 0);
        }
        if w.3 >= steady {
            return Err(60 - (now / 1000) % 60);
        }
        if w.1 >= burst {
            return Err(1);
        }
        w.1 += 1;
        w.3 += 1;
        // The tighter window's figures.
        let (limit, left, reset) = if burst - w.1 <= steady - w.3 {
            (burst, burst - w.1, 1)
        } else {
            (steady, steady - w.3, 60 - (now / 1000) % 60)
        };
        Ok(vec![
            ("RateLimit-Limit".into(), limit.to_string()),
            ("RateLimit-Remaining".into(), left.to_string()),
            ("RateLimit-Reset".into(), reset.to_string()),
        ])
    }

    /// Applies a profile's attributes as Klaviyo keeps them (later non-null values win,
    /// custom properties key by key).
    fn apply(&mut self, attributes: &Value) {
        let Some(key) = attributes["external_id"]
            .as_str()
            .or_else(|| attributes["email"].as_str())
        else {
            return;
        };
        let profile = self.profiles.entry(key.to_string()).or_default();
        for (k, v) in attributes.as_object().into_iter().flatten() {
            match (k.as_str(), v) {
                (_, Value::Null) => {}
                ("properties", Value::Object(props)) => {
                    let into = profile.entry("properties").or_insert_with(|| json!({}));
                    for (pk, pv) in props {
                        into[pk] = pv.clone();
                    }
                }
                _ => {
                    profile.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Whether this profile is one the receiver refuses (its email says so).
fn refused(attributes: &Value) -> bool {
    attributes["email"]
        .as_str()
        .is_some_and(|e| e.contains("refuse"))
}

/// The profiles a request carries, with their row: one for a profile-import, the job's
/// list for a bulk import job.
pub fn profiles_of(r: &ReceivedRequest) -> Vec<(usize, Value)> {
    let Some(body) = r.json() else {
        return Vec::new();
    };
    match path_of(r) {
        PROFILE_IMPORT if r.method == "POST" => {
            vec![(
                0,
                body.pointer("/data/attributes")
                    .cloned()
                    .unwrap_or_default(),
            )]
        }
        PROFILE_JOBS if r.method == "POST" => body
            .pointer("/data/attributes/profiles/data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| (i, p["attributes"].clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn answer_within_limits(
    request: &ReceivedRequest,
    path: &str,
    rules: &Mutex<Vec<(String, Reply)>>,
    state: &mut State,
) -> Reply {
    if request.method == "GET" && path == PROFILES {
        return profiles_read(request, state);
    }
    if request.method == "GET" {
        return job_read(path, state);
    }
    if path == DELETION_JOBS {
        return deletion(request, state);
    }
    if action_endpoint(&request.method, path).is_some() {
        return action_answer(request);
    }
    let ids: HashSet<String> = events_of(0, request)
        .into_iter()
        .filter_map(|e| e.unique_id)
        .collect();
    if let Some((_, r)) = rules
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _)| ids.contains(id))
    {
        return r.clone();
    }
    match path {
        EVENTS => Reply {
            status: 202,
            headers: Vec::new(),
            body: Vec::new(),
            delay: None,
        },
        BULK => reply(
            202,
            &json!({"data": {
                "type": "event-bulk-create-job",
                "id": format!("job-{}", request.at.elapsed().as_nanos()),
                "attributes": {"status": "queued"},
            }})
            .to_string(),
        ),
        PROFILE_JOBS => {
            let profiles = profiles_of(request);
            let mut refusals = Vec::new();
            for (row, attributes) in &profiles {
                if refused(attributes) {
                    refusals.push((*row, "The email address is not valid.".to_string()));
                } else {
                    state.apply(attributes);
                }
            }
            state.next_job += 1;
            let id = format!("job{}", state.next_job);
            state.jobs.insert(
                id.clone(),
                Job {
                    total: profiles.len(),
                    refused: refusals,
                    reads: 0,
                    taken: request.at,
                },
            );
            reply(
                202,
                &json!({"data": {"type": "profile-bulk-import-job", "id": id,
                    "attributes": {"status": "queued", "total_count": profiles.len(),
                                   "completed_count": 0, "failed_count": 0,
                                   "created_at": "2026-11-29T00:00:00+00:00"}}})
                .to_string(),
            )
        }
        _ => {
            let attributes = request
                .json()
                .and_then(|b| b.pointer("/data/attributes").cloned())
                .unwrap_or_default();
            if refused(&attributes) {
                return reply(
                    400,
                    &error_body(
                        400,
                        "invalid",
                        "Invalid input.",
                        "The email address is not valid.",
                        "/data/attributes/email",
                    ),
                );
            }
            state.apply(&attributes);
            // An id per profile, so list calls show whose id they carry.
            let id = ["external_id", "email", "phone_number"]
                .iter()
                .find_map(|k| attributes[*k].as_str())
                .map_or("01PROFILE".to_string(), |who| format!("01P-{who}"));
            reply(
                201,
                &json!({"data": {"type": "profile", "id": id, "attributes": attributes}})
                    .to_string(),
            )
        }
    }
}

/// A consent job or list call: `404` for a list whose id starts with `Missing` (no such
/// list), `400` naming every row whose email contains `refuse` (Klaviyo refuses the whole
/// call), else `202` (jobs) or `204` (list relationships).
fn action_answer(request: &ReceivedRequest) -> Reply {
    if request.path.starts_with("/api/lists/Missing") {
        return reply(
            404,
            &error_body(
                404,
                "not_found",
                "Not found.",
                "A list with id Missing… does not exist.",
                "",
            ),
        );
    }
    let list = request.json().is_some_and(|b| b["data"].is_array());
    let errors: Vec<Value> = action_rows(request)
        .iter()
        .enumerate()
        .filter(|(_, row)| refused(&row["attributes"]))
        .map(|(i, _)| {
            json!({"id": format!("e{i}"), "status": 400, "code": "invalid",
                "title": "Invalid input.", "detail": "The email address is not valid.",
                "source": {"pointer": format!("/data/attributes/profiles/data/{i}/attributes/email")}})
        })
        .collect();
    if !errors.is_empty() {
        return reply(400, &json!({ "errors": errors }).to_string());
    }
    Reply {
        status: if list { 204 } else { 202 },
        headers: Vec::new(),
        body: Vec::new(),
        delay: None,
    }
}

/// `GET /api/profiles?filter=equals(external_id,"…")`: the stored profiles with that
/// external_id (any other filter is a `400`, as this receiver knows no other).
fn profiles_read(request: &ReceivedRequest, state: &State) -> Reply {
    let query = request.query.as_deref().unwrap_or_default();
    let filter = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "filter")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let Some(wanted) = filter
        .strip_prefix("equals(external_id,\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .map(|quoted| quoted.replace("\\\"", "\"").replace("\\\\", "\\"))
    else {
        return reply(
            400,
            &error_body(
                400,
                "invalid",
                "Invalid input.",
                &format!("unsupported filter {filter:?}"),
                "",
            ),
        );
    };
    let data: Vec<Value> = state
        .profiles
        .values()
        .filter(|p| p.get("external_id").and_then(Value::as_str) == Some(wanted.as_str()))
        .map(|p| json!({"type": "profile", "id": format!("01P-{wanted}"), "attributes": p}))
        .collect();
    reply(
        200,
        &json!({"data": data, "links": {"self": request.path, "next": null}}).to_string(),
    )
}

/// `POST /api/data-privacy-deletion-jobs`: `202` and the matching profiles gone, or `400`
/// unless exactly one of email, phone number and id is given.
fn deletion(request: &ReceivedRequest, state: &mut State) -> Reply {
    let profile = request
        .json()
        .and_then(|b| b.pointer("/data/attributes/profile/data").cloned())
        .unwrap_or_default();
    let given: Vec<(&str, String)> = [
        ("email", profile.pointer("/attributes/email")),
        ("phone_number", profile.pointer("/attributes/phone_number")),
        ("id", profile.get("id")),
    ]
    .into_iter()
    .filter_map(|(key, v)| Some((key, v?.as_str()?.to_string())))
    .collect();
    let [(key, value)] = given.as_slice() else {
        return reply(
            400,
            &error_body(
                400,
                "invalid",
                "Invalid input.",
                "Exactly one of email, phone_number or id must be provided.",
                "/data/attributes/profile/data",
            ),
        );
    };
    state.profiles.retain(|external_or_email, p| {
        let matches = match *key {
            "id" => value.strip_prefix("01P-") == Some(external_or_email.as_str()),
            field => p.get(field).and_then(Value::as_str) == Some(value.as_str()),
        };
        !matches
    });
    Reply {
        status: 202,
        headers: Vec::new(),
        body: Vec::new(),
        delay: None,
    }
}

/// `GET /api/profile-bulk-import-jobs/{id}` (processing at the first read, complete
/// after) and `…/{id}/import-errors`.
fn job_read(path: &str, state: &mut State) -> Reply {
    let rest = path
        .trim_start_matches(PROFILE_JOBS)
        .trim_start_matches('/');
    let (id, errors) = match rest.split_once('/') {
        Some((id, "import-errors")) => (id, true),
        Some(_) => {
            return reply(
                404,
                &error_body(404, "not_found", "Not found.", "Not found.", ""),
            )
        }
        None => (rest, false),
    };
    let job_time = state.job_time;
    let Some(job) = state.jobs.get_mut(id) else {
        return reply(
            404,
            &error_body(404, "not_found", "Not found.", "No such job.", ""),
        );
    };
    if errors {
        let data: Vec<Value> = job
            .refused
            .iter()
            .map(|(row, detail)| {
                json!({"type": "import-error", "id": format!("{id}-{row}"), "attributes": {
                    "code": "invalid", "title": "Invalid input.", "detail": detail,
                    "source": {"pointer": format!("/data/attributes/profiles/data/{row}/attributes/email")},
                    "original_payload": {}}})
            })
            .collect();
        return reply(
            200,
            &json!({"data": data, "links": {"self": path, "next": null}}).to_string(),
        );
    }
    job.reads += 1;
    let done = job.reads > 1 && job.taken.elapsed() >= job_time;
    let failed = if done { job.refused.len() } else { 0 };
    reply(
        200,
        &json!({"data": {"type": "profile-bulk-import-job", "id": id, "attributes": {
            "status": if done { "complete" } else { "processing" },
            "total_count": job.total,
            "completed_count": if done { job.total - failed } else { 0 },
            "failed_count": failed,
            "created_at": "2026-11-29T00:00:00+00:00"}}})
        .to_string(),
    )
}

/// What is wrong with a request's headers for `revision` and `api_key`.
pub fn header_problems(r: &ReceivedRequest, revision: &str, api_key: &str) -> Vec<String> {
    let media = if revision == FLAT {
        "application/json"
    } else {
        JSON_API
    };
    let mut problems = Vec::new();
    let mut expect = |name: &str, want: &str| {
        let got = r.header(name);
        if got != Some(want) {
            problems.push(format!("{name}: {got:?}, expected {want:?}"));
        }
    };
    expect("authorization", &format!("Klaviyo-API-Key {api_key}"));
    expect("revision", revision);
    expect("content-type", media);
    expect("accept", media);
    problems
}

/// The `$`-keys of seed 002's profile, and those `translate::body` writes besides (`$id` for the
/// external id, `$organization`, `$title`, `$address1`).
const FLAT_PROFILE_KEYS: &[&str] = &[
    "$email",
    "$phone_number",
    "$id",
    "$first_name",
    "$last_name",
    "$organization",
    "$title",
    "$image",
    "$address1",
    "$city",
    "$region",
    "$country",
    "$zip",
    "$consent",
];

/// What in a `POST /api/events` body departs from seed 002 (revision 2023-01-24).
pub fn flat_shape_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(top) = body.as_object() else {
        return vec!["body is not an object".into()];
    };
    if top.len() != 1 || !top.contains_key("data") {
        problems.push(format!(
            "top-level keys {:?}, expected only data",
            keys(top)
        ));
    }
    let data = &body["data"];
    if data["type"] != "event" {
        problems.push(format!("data.type is {}, expected \"event\"", data["type"]));
    }
    if let Some(d) = data.as_object() {
        if d.keys().any(|k| k != "type" && k != "attributes") {
            problems.push(format!("data has keys {:?}", keys(d)));
        }
    }
    let Some(attributes) = data["attributes"].as_object() else {
        problems.push("data.attributes is not an object".into());
        return problems;
    };
    for key in attributes.keys() {
        if ![
            "profile",
            "metric",
            "properties",
            "time",
            "value",
            "unique_id",
        ]
        .contains(&key.as_str())
        {
            problems.push(format!("attribute {key:?} is not in seed 002"));
        }
    }
    match attributes.get("profile").and_then(Value::as_object) {
        None => problems.push("profile (required) is missing or not an object".into()),
        Some(profile) => {
            if !["$email", "$phone_number", "$id"]
                .iter()
                .any(|k| profile.get(*k).is_some_and(Value::is_string))
            {
                problems.push(format!(
                    "profile has no identifier ($email, $phone_number, $id): {:?}",
                    keys(profile)
                ));
            }
            for (key, value) in profile {
                if key.starts_with('$') && !FLAT_PROFILE_KEYS.contains(&key.as_str()) {
                    problems.push(format!("profile key {key:?} is no special field"));
                }
                let ok = if key == "$consent" {
                    value
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string))
                } else {
                    !key.starts_with('$') || value.is_string()
                };
                if !ok {
                    problems.push(format!("profile {key:?} has the wrong type: {value}"));
                }
            }
        }
    }
    match attributes.get("metric").and_then(Value::as_object) {
        None => problems.push("metric (required) is missing or not an object".into()),
        Some(metric) => {
            match metric.get("name").and_then(Value::as_str) {
                Some(name) if !name.is_empty() && name.chars().count() < 128 => {}
                other => problems.push(format!("metric.name {other:?}: 1..127 characters")),
            }
            if metric.get("service").is_some_and(|s| !s.is_string()) {
                problems.push("metric.service is not a string".into());
            }
            if metric.keys().any(|k| k != "name" && k != "service") {
                problems.push(format!("metric has keys {:?}", keys(metric)));
            }
        }
    }
    if !attributes.get("properties").is_some_and(Value::is_object) {
        problems.push("properties (required) is missing or not an object".into());
    }
    if let Some(time) = attributes.get("time") {
        match time.as_str().map(chrono::DateTime::parse_from_rfc3339) {
            Some(Ok(t)) => {
                if t.timestamp_subsec_nanos() != 0 {
                    problems.push(format!("time {time} is not whole seconds"));
                }
                if chrono::Datelike::year(&t) < 2000 {
                    problems.push(format!("time {time} is not after 2000"));
                }
            }
            _ => problems.push(format!("time {time} is not an RFC 3339 date-time")),
        }
    }
    if attributes.get("value").is_some_and(|v| !v.is_number()) {
        problems.push("value is not a number".into());
    }
    if attributes.get("unique_id").is_some_and(|v| !v.is_string()) {
        problems.push("unique_id is not a string".into());
    }
    problems
}

fn keys(object: &serde_json::Map<String, Value>) -> Vec<&str> {
    object.keys().map(String::as_str).collect()
}

/// The Python of the venv holding Klaviyo's SDK; fails (never skips) when it is missing.
pub fn sdk_python() -> PathBuf {
    super::venv_python(
        "FANOUT_KLAVIYO_PYTHON",
        "klaviyo-venv",
        "Klaviyo's Python SDK (PyPI klaviyo-api 25.x, `import openapi_client`) is",
    )
}

/// Runs `tests/klaviyo_models.py` once over `lines` (`{"path", "body"}` each); one verdict
/// per line, in order.
pub async fn validate_with_sdk(lines: Vec<Value>) -> Vec<Result<(), String>> {
    if lines.is_empty() {
        return Vec::new();
    }
    let python = sdk_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/klaviyo_models.py");
    tokio::task::spawn_blocking(move || {
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let output = super::run_python(&python, &script, input);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} {}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            python.display(),
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let verdicts: Vec<Result<(), String>> = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("model checker printed {l:?}: {e}"));
                if v["ok"] == true {
                    Ok(())
                } else {
                    Err(v["error"].as_str().unwrap_or("no error text").to_string())
                }
            })
            .collect();
        assert_eq!(
            verdicts.len(),
            lines.len(),
            "the model checker answered {} lines for {} bodies:\n{stdout}",
            verdicts.len(),
            lines.len()
        );
        verdicts
    })
    .await
    .expect("model checker task")
}
