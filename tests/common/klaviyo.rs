//! A Klaviyo-shaped receiver on loopback, built on `receiver::Receiver`: it checks the
//! `Authorization: Klaviyo-API-Key …` and `revision` headers of every request (a wrong one
//! gets Klaviyo's `401` error body), records every request, and answers as Klaviyo does on
//! success (`202` for events and bulk jobs, `201` with the profile for profile-import) or
//! what a test scripts: queued replies (`receiver.push_reply`) first, then a reply for any
//! request holding a given `unique_id` (`answer_for`).
//!
//! The recorded bodies are read back as events and profiles (`events`, `profiles`), and
//! checked with `assert_valid`: headers, and every body against the models of Klaviyo's
//! official Python SDK (`tests/klaviyo_models.py`, run with the venv `scripts/test` creates:
//! `FANOUT_KLAVIYO_PYTHON`, default `target/klaviyo-venv/bin/python`), or, for revision
//! 2023-01-24 (which that SDK no longer models), against seed 002's flat shape.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
        let (e, r) = (expect.clone(), rules.clone());
        receiver.respond_with(move |request| Some(answer(request, &e.lock().unwrap(), &r)));
        Klaviyo {
            receiver,
            expect,
            rules,
        }
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

    /// The profile attributes of the profile-imports answered with a 2xx, in order.
    pub fn profiles(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.ok() && path_of(r) == PROFILE_IMPORT)
            .map(|r| {
                r.json().map_or(Value::Null, |b| {
                    b.pointer("/data/attributes").cloned().unwrap_or_default()
                })
            })
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
            if r.method != "POST" || ![EVENTS, BULK, PROFILE_IMPORT].contains(&path) {
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
                for_sdk.push((i, path.to_string(), body));
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
) -> Reply {
    let path = path_of(request);
    if request.method != "POST" || ![EVENTS, BULK, PROFILE_IMPORT].contains(&path) {
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
        _ => {
            let attributes = request
                .json()
                .and_then(|b| b.pointer("/data/attributes").cloned())
                .unwrap_or_default();
            reply(
                201,
                &json!({"data": {"type": "profile", "id": "01PROFILE", "attributes": attributes}})
                    .to_string(),
            )
        }
    }
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

/// The `$`-keys of seed 002's profile, and those `klaviyo_body` writes besides (`$id` for the
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
    let python = std::env::var_os("FANOUT_KLAVIYO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/klaviyo-venv/bin/python")
        });
    assert!(
        python.exists(),
        "Klaviyo's Python SDK is not installed: {} is missing. Run `scripts/test` (it creates \
         target/klaviyo-venv with `pip install klaviyo-api`), or set FANOUT_KLAVIYO_PYTHON to a \
         python that can import openapi_client (PyPI klaviyo-api 25.x)",
        python.display()
    );
    python
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
        let mut child = Command::new(&python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {}: {e}", python.display(), script.display()));
        let mut stdin = child.stdin.take().expect("stdin");
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let writer = std::thread::spawn(move || {
            stdin
                .write_all(input.as_bytes())
                .expect("write to the model checker");
        });
        let output = child.wait_with_output().expect("run the model checker");
        writer.join().expect("writer");
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
