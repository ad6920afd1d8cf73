//! `GET /metrics` read with a Prometheus text-format parser after a known mix of traffic,
//! and the request logs: one line per request with its id and source, never a write key
//! or a message's values.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{basic, client, Fanout, Settings, WRITE_KEY};
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;

/// A second source, with a key distinctive enough to search the logs for.
const SHOP_KEY: &str = "wk_shop_s3cr3t_9f2c";
const WRONG_KEY: &str = "wk_wrong_7781";
const EMAIL: &str = "jane.doe@example.com";
const NAME: &str = "Jane Q. Public";

fn settings() -> Settings {
    Settings::default().section(&format!(
        "[[sources]]\nname = \"shop\"\nwrite_keys = [\"{SHOP_KEY}\"]\n"
    ))
}

fn track(id: &str) -> serde_json::Value {
    json!({"type": "track", "userId": "u1", "event": "Viewed", "messageId": id})
}

async fn scrape(f: &Fanout) -> Scrape {
    let response = client().get(f.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    let text = response.text().await.unwrap();
    for secret in [WRITE_KEY, SHOP_KEY, WRONG_KEY] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// Every sample of `metric`, keyed by the values of `labels` (in that order).
fn series(scrape: &Scrape, metric: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(|s| (key(s, labels), scalar(s)))
        .collect()
}

fn key(sample: &Sample, labels: &[&str]) -> Vec<String> {
    labels
        .iter()
        .map(|l| sample.labels.get(l).unwrap_or_default().to_string())
        .collect()
}

fn scalar(sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => {
            // Cumulative buckets, ending at +Inf: the count.
            assert!(
                buckets.windows(2).all(|w| w[0].count <= w[1].count),
                "{buckets:?}"
            );
            let last = buckets.last().expect("buckets");
            assert!(last.less_than.is_infinite());
            last.count
        }
        Value::Summary(_) => panic!("{} is a summary, not a histogram", sample.metric),
    }
}

fn labels(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn value(scrape: &Scrape, metric: &str, label_names: &[&str], values: &[&str]) -> Option<f64> {
    series(scrape, metric, label_names)
        .get(&labels(values))
        .copied()
}

#[tokio::test]
async fn counters_match_the_traffic_sent() {
    // A second destination beside the harness's file "out".
    let f = Fanout::start_with(
        settings().section("[[destinations]]\nname = \"archive\"\nkind = \"stdout\"\n"),
    );

    // Source "test": 5 track + 2 identify, then 3 of them again and 1 new.
    let mut first: Vec<_> = (1..=5).map(|i| track(&format!("m{i}"))).collect();
    for id in ["i1", "i2"] {
        first.push(json!({"type": "identify", "userId": "u1", "messageId": id}));
    }
    common::assert_success(
        f.post("/v1/batch")
            .json(&json!({ "batch": first }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let again = json!({"batch": [track("m1"), track("m2"), track("m3"), track("m6")]});
    common::assert_success(f.post("/v1/batch").json(&again).send().await.unwrap()).await;
    // Source "shop": one page.
    common::assert_success(
        f.post_as(SHOP_KEY, "/v1/page")
            .json(&json!({"anonymousId": "a1", "name": "Home", "messageId": "p1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    // Refused whole: 4 items, the last without `event`.
    let bad_batch = json!({"batch": [track("x1"), track("x2"), track("x3"),
        {"type": "track", "userId": "u1", "messageId": "x4"}]});
    let r = f.post("/v1/batch").json(&bad_batch).send().await.unwrap();
    common::expect_error(r, 400, "missing_field").await;
    let r = f
        .post("/v1/track")
        .json(&json!({"userId": "u1"}))
        .send()
        .await
        .unwrap();
    common::expect_error(r, 400, "missing_field").await;
    // Per item: two stored, one refused (no userId).
    let answer = common::event_batch(
        &f,
        &json!({"batch": [
            {"type": "track", "event": "E", "userId": "u2", "messageId": "e1"},
            {"type": "track", "event": "E", "userId": "u2", "messageId": "e2"},
            {"type": "track", "event": "E", "messageId": "e3"}]}),
    )
    .await;
    assert_eq!(
        (&answer["processed"], &answer["errors"]),
        (&json!(2), &json!(1))
    );
    // No source: counted as requests only.
    for _ in 0..2 {
        let r = f
            .post_as(WRONG_KEY, "/v1/batch")
            .json(&json!({"batch": [track("w1")]}))
            .send()
            .await
            .unwrap();
        common::expect_error(r, 401, "unauthorized").await;
    }
    let r = client().get(f.url("/no/such/path")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // 5 + 2 + 1 + 1 + 2 messages stored, delivered to both destinations.
    let stored = 11.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = scrape(&f).await;
        let settled = ["out", "archive"].iter().all(|d| {
            value(
                &s,
                "fanout_deliveries_total",
                &["destination", "outcome"],
                &[d, "ok"],
            ) == Some(stored)
                && value(&s, "fanout_queue_lag_bytes", &["destination"], &[d]) == Some(0.0)
        });
        if settled || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(f.delivered().len(), 11);

    let events = series(&s, "fanout_events_total", &["source", "type", "outcome"]);
    let expected: BTreeMap<Vec<String>, f64> = [
        (["test", "track", "accepted"], 8.0),
        (["test", "identify", "accepted"], 2.0),
        (["test", "track", "duplicate"], 3.0),
        (["shop", "page", "accepted"], 1.0),
        (["test", "unknown", "rejected"], 4.0),
        (["test", "track", "rejected"], 2.0),
    ]
    .into_iter()
    .map(|(k, v)| (labels(&k), v))
    .collect();
    assert_eq!(events, expected);

    let mut requests = series(&s, "fanout_http_requests_total", &["path", "status"]);
    requests.retain(|k, _| k[0] != "/metrics");
    let expected: BTreeMap<Vec<String>, f64> = [
        (["/v1/batch", "200"], 2.0),
        (["/v1/batch", "400"], 1.0),
        (["/v1/batch", "401"], 2.0),
        (["/v1/page", "200"], 1.0),
        (["/v1/track", "400"], 1.0),
        (["/event/batch", "200"], 1.0),
        (["unmatched", "404"], 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (labels(&k), v))
    .collect();
    assert_eq!(requests, expected);
    // One latency sample per request, by the same route template.
    let mut durations = series(&s, "fanout_http_request_duration_seconds", &["path"]);
    durations.retain(|k, _| k[0] != "/metrics");
    let mut per_path = BTreeMap::new();
    for (k, n) in &requests {
        *per_path.entry(vec![k[0].clone()]).or_insert(0.0) += n;
    }
    assert_eq!(durations, per_path);
    assert_eq!(
        series(&s, "fanout_http_request_duration_seconds_count", &["path"])
            .get(&labels(&["/v1/batch"])),
        Some(&5.0)
    );

    for d in ["out", "archive"] {
        let deliveries = series(&s, "fanout_deliveries_total", &["destination", "outcome"]);
        for (outcome, n) in [
            ("ok", stored),
            ("retried", 0.0),
            ("dead_lettered", 0.0),
            ("skipped", 0.0),
        ] {
            assert_eq!(
                deliveries.get(&labels(&[d, outcome])),
                Some(&n),
                "{d} {outcome}"
            );
        }
        let sends = value(
            &s,
            "fanout_delivery_duration_seconds",
            &["destination"],
            &[d],
        )
        .unwrap();
        assert!((1.0..=stored).contains(&sends), "{d}: {sends} sends");
        assert_eq!(
            value(&s, "fanout_queue_lag_bytes", &["destination"], &[d]),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "fanout_queue_depth_events", &["destination"], &[d]),
            Some(0.0)
        );
        assert_eq!(
            value(
                &s,
                "fanout_queue_oldest_age_seconds",
                &["destination"],
                &[d]
            ),
            Some(0.0)
        );
    }
    assert!(value(&s, "fanout_queue_held_bytes", &[], &[]).unwrap() > 0.0);
    // Every stored message carried a messageId.
    assert_eq!(value(&s, "fanout_dedupe_keys", &[], &[]), Some(stored));
    assert_eq!(
        value(&s, "fanout_dedupe_evictions_total", &[], &[]),
        Some(0.0)
    );
    for metric in [
        "fanout_http_requests_total",
        "fanout_http_request_duration_seconds",
        "fanout_events_total",
        "fanout_queue_held_bytes",
        "fanout_queue_lag_bytes",
        "fanout_queue_depth_events",
        "fanout_queue_oldest_age_seconds",
        "fanout_deliveries_total",
        "fanout_delivery_duration_seconds",
        "fanout_dedupe_keys",
        "fanout_dedupe_evictions_total",
    ] {
        assert!(s.docs.contains_key(metric), "no HELP for {metric}");
    }
}

/// Sends one accepted message with personal data, one refused whose answer quotes it,
/// one with the key in the body and one with a wrong key; returns the request ids of the
/// accepted and the refused one.
async fn send_with_personal_data(f: &Fanout) -> (String, String) {
    let ok = f
        .post_as(SHOP_KEY, "/v1/track")
        .json(&json!({"userId": "u1", "event": "Signed Up",
            "properties": {"email": EMAIL, "name": NAME}}))
        .send()
        .await
        .unwrap();
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    common::assert_success(ok).await;
    let refused = f
        .post_as(SHOP_KEY, "/v1/batch")
        .json(&json!({"batch": [{"type": EMAIL, "userId": "u1", "traits": {"name": NAME}}]}))
        .send()
        .await
        .unwrap();
    let refused_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body = common::expect_error(refused, 400, "invalid_field").await;
    assert!(
        body.to_string().contains(EMAIL),
        "the answer quotes the value, so the log check below means something: {body}"
    );
    let in_body = client()
        .post(f.url("/v1/identify"))
        .json(&json!({"writeKey": SHOP_KEY, "userId": "u1", "traits": {"email": EMAIL}}))
        .send()
        .await
        .unwrap();
    common::assert_success(in_body).await;
    let wrong = client()
        .post(f.url("/v1/track"))
        .header("authorization", basic(WRONG_KEY))
        .json(&json!({"userId": "u1", "event": "E"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    (ok_id, refused_id)
}

/// Stops the server and returns everything it logged.
async fn stop_and_read_log(f: &mut Fanout) -> Vec<String> {
    assert!(f.terminate().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = f.stderr();
        if lines.iter().any(|l| l.contains("stopped")) || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_secrets(log: &[String]) {
    for secret in [SHOP_KEY, WRONG_KEY, EMAIL, NAME] {
        let leaks: Vec<&String> = log.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} logged: {leaks:#?}");
    }
}

#[tokio::test]
async fn request_log_names_id_and_source_but_no_secrets() {
    let mut f = Fanout::start_with(settings().env("FANOUT_LOG", "debug"));
    let (ok_id, refused_id) = send_with_personal_data(&f).await;
    let log = stop_and_read_log(&mut f).await;
    assert_no_secrets(&log);
    let with_id = |id: &str| -> Vec<&String> { log.iter().filter(|l| l.contains(id)).collect() };
    let ok_lines = with_id(&ok_id);
    assert!(
        ok_lines
            .iter()
            .any(|l| l.contains("finished processing request")
                && l.contains("source=shop")
                && l.contains("status=200")
                && l.contains("latency=")),
        "{ok_lines:#?}"
    );
    let refused_lines = with_id(&refused_id);
    assert!(
        refused_lines.iter().any(|l| l.contains("WARN")
            && l.contains("request refused")
            && l.contains("source=shop")
            && l.contains("invalid_field")
            && l.contains("status=400")),
        "{refused_lines:#?}"
    );
    // One line per request at debug: the finished line, once.
    assert_eq!(
        ok_lines
            .iter()
            .filter(|l| l.contains("finished processing request"))
            .count(),
        1
    );
}

/// The log's lines read as JSON (`--log-format json`): each must parse.
fn json_lines(log: &[String]) -> Vec<serde_json::Value> {
    log.iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_the_request_span() {
    let mut f = Fanout::start_with(
        settings()
            .env("FANOUT_LOG", "debug")
            .arg("--log-format")
            .arg("json"),
    );
    let (ok_id, refused_id) = send_with_personal_data(&f).await;
    let log = stop_and_read_log(&mut f).await;
    assert_no_secrets(&log);
    let lines = json_lines(&log);
    let finished = lines
        .iter()
        .find(|l| {
            l["span"]["id"] == json!(ok_id)
                && l["fields"]["message"] == json!("finished processing request")
        })
        .expect("a line for the accepted request");
    assert_eq!(finished["span"]["source"], "shop");
    assert_eq!(finished["fields"]["status"], 200);
    let refused = lines
        .iter()
        .find(|l| l["span"]["id"] == json!(refused_id) && l["level"] == "WARN")
        .expect("a warn line for the refused request");
    assert_eq!(refused["span"]["source"], "shop");
    assert_eq!(refused["fields"]["code"], "invalid_field");
    assert_eq!(refused["fields"]["field"], "type");
}

#[tokio::test]
async fn at_the_default_level_the_warn_line_names_its_request_itself() {
    // No request span at info (it cost 4 % of a track request's CPU): the warn line
    // carries the id, route and source as its own fields.
    let mut f = Fanout::start_with(settings().arg("--log-format").arg("json"));
    let (_, refused_id) = send_with_personal_data(&f).await;
    let log = stop_and_read_log(&mut f).await;
    assert_no_secrets(&log);
    let lines = json_lines(&log);
    let refused = lines
        .iter()
        .find(|l| l["fields"]["id"] == json!(refused_id) && l["level"] == "WARN")
        .unwrap_or_else(|| panic!("a warn line for the refused request: {log:#?}"));
    assert_eq!(refused["fields"]["source"], "shop");
    assert_eq!(refused["fields"]["path"], "/v1/batch");
    assert_eq!(refused["fields"]["method"], "POST");
    assert_eq!(refused["fields"]["code"], "invalid_field");
    let unauthorized = lines
        .iter()
        .find(|l| l["fields"]["code"] == "unauthorized")
        .expect("a warn line for the wrong key");
    assert!(
        unauthorized["fields"].get("source").is_none(),
        "no source for a key that names none: {unauthorized}"
    );
}

#[tokio::test]
async fn an_unfit_request_id_is_replaced_and_never_echoed_or_logged() {
    let mut f = Fanout::start_with(settings().env("FANOUT_LOG", "debug"));
    // 100 KB ids once grew the log by 957 MB in 5 s: one copy per line of the request.
    let too_long = "r".repeat(129);
    let longest = "k".repeat(128);
    let unfit: [&[u8]; 4] = [too_long.as_bytes(), b"two words", b"tab\there", b"caf\xe9"];
    for sent in unfit {
        let answer = client()
            .post(f.url("/v1/track"))
            .header("authorization", basic(WRONG_KEY))
            .header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(sent).unwrap(),
            )
            .json(&track("unfit-id"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401);
        let echoed = answer.headers()["x-request-id"].as_bytes();
        assert_ne!(
            echoed,
            sent,
            "{:?} was echoed",
            String::from_utf8_lossy(sent)
        );
        assert_eq!(echoed.len(), 36, "a generated UUID instead");
    }
    for sent in [longest.as_str(), "req-42_OK:/=+~"] {
        let answer = f
            .post("/v1/track")
            .header("x-request-id", sent)
            .json(&track(sent))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.headers()["x-request-id"], sent, "a fit id is kept");
    }
    let log = stop_and_read_log(&mut f).await;
    assert!(
        log.iter().any(|l| l.contains(&longest)),
        "the fit id is logged"
    );
    for unfit in [too_long.as_str(), "two words", "tab\there"] {
        assert!(!log.iter().any(|l| l.contains(unfit)), "{unfit:?} logged");
    }
}

#[tokio::test]
async fn a_flood_of_refusals_writes_a_bounded_number_of_warn_lines() {
    let mut f = Fanout::start_with(settings());
    let started = Instant::now();
    for i in 0..200 {
        let answer = client()
            .post(f.url("/v1/track"))
            .header("authorization", basic(WRONG_KEY))
            .json(&track(&format!("flood-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401);
    }
    // Another reason is not held back by the flood of the first.
    let bad = f.post("/v1/track").body("{not json").send().await.unwrap();
    common::expect_error(bad, 400, "invalid_json").await;
    let elapsed = started.elapsed();
    let log = stop_and_read_log(&mut f).await;
    let refused = |code: &str| {
        log.iter()
            .filter(|l| l.contains("request refused") && l.contains(code))
            .count()
    };
    // The first line of a reason, then at most one per 10 s (which carries the count of
    // those left out).
    let bound = 2 + elapsed.as_secs() as usize / 10;
    let unauthorized = refused("unauthorized");
    assert!(
        (1..=bound).contains(&unauthorized),
        "{unauthorized} warn lines for 200 refusals in {elapsed:?}"
    );
    assert_eq!(refused("invalid_json"), 1);
}
