//! Delivery to HTTP destinations (webhook, Segment relay) against a real downstream
//! receiver on loopback: retries and backoff, Retry-After, final 4xx answers and poison
//! isolation, dead letters and their replay (CLI and admin API), per-user ordering, rate
//! limits, a destination that is down or dead, kill -9 mid-delivery, the disk budget, and a
//! chain of two fanouts fed by the official Python client.
//!
//! The tests run on a multi-threaded runtime so the receiver keeps answering while a test
//! blocks (starting fanout, running its CLI).
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::clients::run_python;
use common::receiver::{ids, ReceivedRequest, Receiver, Reply};
use common::{assert_success, basic, client, status_json, Fanout, Settings};
use serde_json::{json, Value};

/// Fast retries, so a test sees several attempts within a second or two.
const FAST_RETRY: &str = r#"{ initial_backoff = "100ms", max_backoff = "1s" }"#;

/// One `[[destinations]]` entry, written as TOML (values are raw TOML).
struct Dest {
    keys: Vec<(String, String)>,
}

impl Dest {
    fn new(name: &str, kind: &str, url: &str) -> Dest {
        Dest {
            keys: vec![
                ("name".into(), toml_string(name)),
                ("kind".into(), toml_string(kind)),
                ("url".into(), toml_string(url)),
                ("ordering".into(), "true".into()),
                ("retry".into(), FAST_RETRY.into()),
            ],
        }
    }

    /// A webhook with fast retries and per-user ordering.
    fn webhook(name: &str, url: &str) -> Dest {
        Dest::new(name, "webhook", url)
    }

    /// A Segment relay with fast retries and per-user ordering.
    fn segment(name: &str, url: &str) -> Dest {
        Dest::new(name, "segment", url)
    }

    /// Sets (or replaces) `key = value`.
    fn with(mut self, key: &str, value: &str) -> Dest {
        self.keys.retain(|(k, _)| k != key);
        self.keys.push((key.into(), value.into()));
        self
    }

    fn toml(&self) -> String {
        let mut text = String::from("[[destinations]]\n");
        for (key, value) in &self.keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{s}\"")
}

/// The harness settings (which always include the file destination `out`) plus `dests`.
fn with_dests(dests: &[Dest]) -> Settings {
    dests
        .iter()
        .fold(Settings::default(), |s, d| s.section(&d.toml()))
}

fn track(id: &str, user: &str) -> Value {
    json!({"type": "track", "userId": user, "event": "Delivered", "messageId": id, "properties": {"id": id}})
}

/// `n` track messages `{tag}-{i}` spread over `users` users (`{tag}-user-{i % users}`).
fn messages(tag: &str, n: usize, users: usize) -> Vec<Value> {
    (0..n)
        .map(|i| track(&format!("{tag}-{i}"), &format!("{tag}-user-{}", i % users)))
        .collect()
}

/// Posts `messages` to `/v1/batch` in requests of at most 500, asserting each 200.
async fn send(f: &Fanout, messages: &[Value]) {
    for chunk in messages.chunks(500) {
        let body = json!({"batch": chunk});
        assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
    }
}

fn id_set(messages: &[Value]) -> HashSet<String> {
    ids(messages).into_iter().collect()
}

/// Fails unless each id in `got` appears exactly once.
fn assert_each_once(got: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in got {
        *counts.entry(id).or_default() += 1;
    }
    let mut repeated: Vec<_> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
    repeated.sort();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
}

/// Fails unless, for every user, the first deliveries of its messages follow the order
/// in which they were sent.
fn assert_per_user_order(sent: &[Value], delivered: &[Value]) {
    let mut seen = HashSet::new();
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for m in delivered {
        let id = m["messageId"].as_str().unwrap().to_string();
        if seen.insert(id.clone()) {
            got.entry(user_of(m)).or_default().push(id);
        }
    }
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for m in sent {
        let id = m["messageId"].as_str().unwrap().to_string();
        want.entry(user_of(m)).or_default().push(id);
    }
    for (user, order) in &want {
        assert_eq!(
            got.get(user).unwrap_or(&Vec::new()),
            order,
            "order of user {user}"
        );
    }
}

fn user_of(m: &Value) -> String {
    m["userId"]
        .as_str()
        .or_else(|| m["anonymousId"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Polls the dead-letter list until it is empty; fails after `timeout`.
async fn wait_no_dead_letters(f: &Fanout, dest: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = f.dead_letters(dest).await;
        if rows.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters still listed after {timeout:?}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the file destination `out` holds at least `n` messages, at most `timeout`.
async fn wait_file(f: &Fanout, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = f.delivered();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rfc3339(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_everything_arrives_once_in_user_order() {
    let r = Receiver::start().await;
    r.push_reply(Reply::json(500, r#"{"error":"down"}"#));
    r.push_reply(Reply::json(500, r#"{"error":"down"}"#));
    let f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));

    let sent = messages("r", 30, 3);
    for part in sent.chunks(10) {
        send(&f, part).await;
    }
    let got = r.wait_for_messages(30, Duration::from_secs(20)).await;
    assert_eq!(id_set(&got), id_set(&sent), "every message arrives");
    // Every message settled: no stray repeat can come after this.
    f.wait_settled("hook").await;
    let got = r.messages();
    assert_each_once(&ids(&got));
    assert_per_user_order(&sent, &got);

    let requests = r.requests();
    assert!(requests.len() >= 3, "{} requests", requests.len());
    assert_eq!(
        [requests[0].status, requests[1].status],
        [500, 500],
        "the scripted failures came first"
    );
    let delivered = id_set(&got);
    for failed in &requests[..2] {
        assert!(
            !failed.message_ids().is_empty(),
            "a failed attempt had messages"
        );
        for id in failed.message_ids() {
            assert!(delivered.contains(&id), "{id} was retried after a 500");
        }
    }
}

/// Sends one track `id`, waits until it is delivered, and checks that the first attempt
/// was answered `status`; returns every request the receiver saw.
async fn delivered_after_one_failure(
    r: &Receiver,
    f: &Fanout,
    id: &str,
    status: u16,
) -> Vec<ReceivedRequest> {
    send(f, &[track(id, "u1")]).await;
    let got = r.wait_for_messages(1, Duration::from_secs(15)).await;
    assert_eq!(ids(&got), [id]);
    let requests = r.requests();
    assert_eq!(requests[0].status, status);
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seconds_on_429_delays_the_next_attempt() {
    let r = Receiver::start().await;
    r.push_reply(Reply::json(429, r#"{"error":"slow down"}"#).header("Retry-After", "2"));
    let f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));

    let requests = delivered_after_one_failure(&r, &f, "ra-1", 429).await;
    assert!(requests[1].ok());
    let waited = requests[1].at - requests[0].answered_at.unwrap();
    assert!(
        waited >= Duration::from_secs(2),
        "next attempt {waited:?} after the 429"
    );
    assert!(
        waited < Duration::from_secs(8),
        "next attempt {waited:?} after the 429"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_http_date_delays_the_next_attempt() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));
    // An HTTP-date has whole seconds: the retry is due at that second, 3-4 s from now.
    let (now, wall) = (Instant::now(), chrono::Utc::now());
    let date = wall + chrono::Duration::seconds(4);
    let header = date.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let truncated = chrono::DateTime::parse_from_rfc2822(&header.replace("GMT", "+0000")).unwrap();
    let due = now + (truncated.to_utc() - wall).to_std().unwrap();
    r.push_reply(Reply::json(503, r#"{"error":"maintenance"}"#).header("Retry-After", &header));

    let requests = delivered_after_one_failure(&r, &f, "rd-1", 503).await;
    // 50 ms for the two clocks (wall and monotonic) to disagree.
    assert!(
        requests[1].at + Duration::from_millis(50) >= due,
        "next attempt {:?} before Retry-After: {header}",
        due - requests[1].at
    );
    let waited = requests[1].at - requests[0].answered_at.unwrap();
    assert!(
        waited < Duration::from_secs(9),
        "next attempt {waited:?} after Retry-After: {header}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_408_and_misconfiguration_401_403_404_are_retried_not_dead_lettered() {
    let r = Receiver::start().await;
    // The first answer comes after the destination's timeout.
    r.push_reply(Reply::status(200).delay(Duration::from_secs(4)));
    r.push_reply(Reply::status(408));
    r.push_reply(Reply::json(401, r#"{"error":"unauthorized"}"#));
    r.push_reply(Reply::json(403, r#"{"error":"forbidden"}"#));
    r.push_reply(Reply::json(404, r#"{"error":"no such hook"}"#));
    let hook = Dest::webhook("hook", &r.url("/hook")).with("timeout", "\"1s\"");
    let f = Fanout::start_with(with_dests(&[hook]));

    send(&f, &[track("rt-1", "u1")]).await;
    // The late answer to the first attempt may never be recorded (its connection is gone).
    let requests = r
        .wait_until(Duration::from_secs(20), |q| {
            q.len() >= 6 && q[5].status != 0
        })
        .await;
    let statuses: Vec<u16> = requests.iter().skip(1).take(5).map(|r| r.status).collect();
    assert_eq!(statuses, [408, 401, 403, 404, 200], "{requests:#?}");
    assert!(
        requests[1].at - requests[0].at < Duration::from_secs(3),
        "the timed-out attempt was retried before its late answer"
    );
    for request in &requests {
        assert_eq!(request.message_ids(), ["rt-1"]);
    }
    assert!(f.dead_letters("hook").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_message_rejected_with_400_is_dead_lettered_at_once() {
    let r = Receiver::start().await;
    let answer = r#"{"error":"bad field x"}"#;
    r.push_reply(Reply::json(400, answer));
    let f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));

    send(&f, &[track("bad-1", "u1")]).await;
    let rows = f
        .wait_dead_letters("hook", 1, Duration::from_secs(15))
        .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row["destination"], "hook", "{row}");
    assert_eq!(row["source"], "test", "{row}");
    assert_eq!(row["reason"], "rejected", "{row}");
    assert_eq!(row["status"], 400, "{row}");
    assert_eq!(row["response"], answer, "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    assert_eq!(row["replay"], false, "{row}");
    assert!(!row["id"].is_null(), "{row}");
    assert_eq!(row["message"]["messageId"], "bad-1", "{row}");
    assert_eq!(row["message"]["userId"], "u1", "{row}");
    assert_eq!(row["message"]["event"], "Delivered", "{row}");
    assert!(
        rfc3339(&row["first_attempt_at"]) <= rfc3339(&row["dead_at"]),
        "{row}"
    );

    // Settled (dead-lettered): no retry can follow.
    f.wait_settled("hook").await;
    let attempts = r.requests_with("bad-1");
    assert_eq!(attempts.len(), 1, "one attempt only: {attempts:#?}");
    assert_eq!(attempts[0].status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_isolated_by_splitting_and_the_rest_delivered() {
    let r = Receiver::start().await;
    r.respond_with(|request| {
        request
            .contains_message("poison")
            .then(|| Reply::json(400, r#"{"error":"poison inside"}"#))
    });
    // A long linger so the 20 messages of one request form one batch.
    let hook = Dest::webhook("hook", &r.url("/hook"))
        .with("batch", r#"{ max_events = 100, linger = "500ms" }"#);
    let f = Fanout::start_with(with_dests(&[hook]));

    let mut sent = messages("p", 19, 4);
    sent.insert(7, track("poison", "p-user-3"));
    send(&f, &sent).await;

    let good: HashSet<String> = id_set(&sent)
        .into_iter()
        .filter(|id| id != "poison")
        .collect();
    let missing = r.wait_for_ids(&good, Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "not delivered: {missing:?}");
    let rows = f
        .wait_dead_letters("hook", 1, Duration::from_secs(15))
        .await;
    f.wait_settled("hook").await;

    let got = r.message_ids();
    assert_each_once(&got);
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), good);
    assert_eq!(rows.len(), 1, "only the poison is dead-lettered: {rows:#?}");
    assert_eq!(rows[0]["message"]["messageId"], "poison");
    assert_eq!(rows[0]["reason"], "rejected");
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["response"], r#"{"error":"poison inside"}"#);

    let tries = r.requests_with("poison");
    assert!(
        tries.iter().any(|t| t.messages().len() > 1),
        "the poison came in a batch with others first"
    );
    assert!(
        tries.iter().any(|t| t.message_ids() == ["poison"]),
        "and was finally tried alone"
    );
    assert!(tries.iter().all(|t| t.status == 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_5s_then_back_loses_nothing() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));
    let before = messages("up", 10, 3);
    send(&f, &before).await;
    let missing = r
        .wait_for_ids(&id_set(&before), Duration::from_secs(10))
        .await;
    assert!(missing.is_empty(), "not delivered: {missing:?}");

    r.stop().await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", r.port())).is_err(),
        "a stopped receiver refuses connections"
    );
    let down = Instant::now();
    let mut during = Vec::new();
    for round in 0..10 {
        // The same users as before, so their order is kept across the outage.
        let part: Vec<Value> = (0..10)
            .map(|i| track(&format!("down{round}-{i}"), &format!("up-user-{}", i % 3)))
            .collect();
        send(&f, &part).await;
        during.extend(part);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The file destination is not held up by the webhook.
    let in_file = wait_file(&f, before.len() + during.len(), Duration::from_secs(5)).await;
    assert_eq!(in_file.len(), before.len() + during.len());
    let remaining = Duration::from_secs(5).saturating_sub(down.elapsed());
    tokio::time::sleep(remaining).await;
    r.restart().await;

    let all: HashSet<String> = id_set(&before).union(&id_set(&during)).cloned().collect();
    let missing = r.wait_for_ids(&all, Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "lost: {missing:?}");
    let sent: Vec<Value> = before.iter().chain(&during).cloned().collect();
    assert_per_user_order(&sent, &r.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_destination_does_not_hold_up_the_others() {
    let r = Receiver::start().await;
    let dead = format!("http://127.0.0.1:{}/hook", dead_port());
    let f = Fanout::start_with(with_dests(&[
        Dest::webhook("dead", &dead),
        Dest::webhook("live", &r.url("/hook")),
    ]));

    let first = messages("a", 20, 3);
    send(&f, &first).await;
    // Again once the dead destination has failed twice (20 messages an attempt).
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "dead"), ("outcome", "retried")],
        |n| n >= 2.0 * 20.0,
    )
    .await;
    let second = messages("b", 30, 3);
    let sent_at = Instant::now();
    send(&f, &second).await;

    let all: HashSet<String> = id_set(&first).union(&id_set(&second)).cloned().collect();
    let missing = r.wait_for_ids(&all, Duration::from_secs(3)).await;
    assert!(
        missing.is_empty(),
        "live destination still missing after {:?}: {missing:?}",
        sent_at.elapsed()
    );
    let in_file = wait_file(&f, 50, Duration::from_secs(3)).await;
    assert_eq!(id_set(&in_file), all, "the file destination has everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_spreads_500_messages_over_nine_seconds() {
    let r = Receiver::start().await;
    let hook = Dest::webhook("hook", &r.url("/hook"))
        .with("rate_limit", "{ rate = 50, burst = 50 }")
        .with("batch", r#"{ max_events = 10, linger = "50ms" }"#);
    let f = Fanout::start_with(with_dests(&[hook]));

    let sent = messages("rl", 500, 5);
    send(&f, &sent).await;
    let got = r.wait_for_messages(500, Duration::from_secs(30)).await;
    assert_eq!(id_set(&got), id_set(&sent), "all arrive");

    let ok: Vec<_> = r.requests().into_iter().filter(|q| q.ok()).collect();
    let spread = ok.last().unwrap().at - ok.first().unwrap().at;
    // 50 at once, the other 450 at 50/s: 9 s. Less one batch (10 messages, 0.2 s) for a
    // limiter that lets a batch through once the bucket is no longer in debt.
    assert!(
        spread >= Duration::from_millis(8800),
        "500 messages at 50/s (burst 50) took only {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_then_restart_delivers_every_message() {
    let r = Receiver::start().await;
    r.set_delay(Duration::from_millis(50));
    let hook = Dest::webhook("hook", &r.url("/hook")).with("batch", "{ max_events = 20 }");
    let mut f = Fanout::start_with(with_dests(&[hook]));

    let sent = messages("k", 2000, 7);
    send(&f, &sent).await;
    let partial = r.wait_for_messages(300, Duration::from_secs(20)).await;
    assert!(id_set(&partial).len() >= 300, "delivery started");
    f.kill9();
    let before_restart = id_set(&r.messages()).len();
    assert!(before_restart < 2000, "killed during delivery");
    f.restart();

    let missing = r
        .wait_for_ids(&id_set(&sent), Duration::from_secs(40))
        .await;
    assert!(missing.is_empty(), "{} lost: {missing:?}", missing.len());
    assert_per_user_order(&sent, &r.messages());
}

/// A fanout whose webhook `hook` (to `r`) has dead-lettered message `x` with a 400 and
/// delivered the two messages sent with it; `admin_token` enables the admin API.
async fn dead_lettered(r: &Receiver, admin_token: Option<&str>) -> Fanout {
    r.respond_with(|request| {
        request
            .contains_message("x")
            .then(|| Reply::json(400, r#"{"error":"no x"}"#))
    });
    let mut settings = with_dests(&[Dest::webhook("hook", &r.url("/hook"))]);
    if let Some(token) = admin_token {
        settings = settings
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"")
            .env("FANOUT_ADMIN_TOKEN", token);
    }
    let f = Fanout::start_with(settings);
    send(
        &f,
        &[track("ok-1", "u1"), track("x", "u2"), track("ok-2", "u3")],
    )
    .await;
    let rows = f
        .wait_dead_letters("hook", 1, Duration::from_secs(15))
        .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["message"]["messageId"], "x");
    let good: HashSet<String> = ["ok-1".to_string(), "ok-2".to_string()].into();
    assert!(r
        .wait_for_ids(&good, Duration::from_secs(10))
        .await
        .is_empty());
    assert!(!r.message_ids().contains(&"x".to_string()));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_with_the_cli_are_delivered() {
    let r = Receiver::start().await;
    let f = dead_lettered(&r, None).await;

    r.clear_responder();
    let out = f
        .cli(&["dead-letters", "replay", "--destination", "hook"])
        .await;
    let answer: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(answer, json!({"replayed": 1}));

    let missing = r
        .wait_for_ids(&["x".to_string()].into(), Duration::from_secs(10))
        .await;
    assert!(missing.is_empty(), "the replayed message arrives");
    wait_no_dead_letters(&f, "hook", Duration::from_secs(10)).await;
    let x = r.requests_with("x");
    assert_eq!(x.last().unwrap().status, 200);
    assert_eq!(r.message_ids().iter().filter(|id| *id == "x").count(), 1);
}

/// Sends an admin request with `authorization` and reads the JSON answer.
async fn admin(request: reqwest::RequestBuilder, authorization: &str) -> (u16, Value) {
    status_json(
        request
            .header("authorization", authorization)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_through_the_admin_api_are_delivered() {
    let token = "admin-secret-1";
    let r = Receiver::start().await;
    let f = dead_lettered(&r, Some(token)).await;
    let list_url = f.url("/admin/dead-letters?destination=hook");
    let replay_url = f.url("/admin/dead-letters/replay?destination=hook");
    let tries_of_x = r.requests_with("x").len();

    for auth in [None, Some("Bearer wrong-token"), Some("Bearer ")] {
        let mut get = client().get(&list_url);
        let mut post = client().post(&replay_url);
        if let Some(auth) = auth {
            get = get.header("authorization", auth);
            post = post.header("authorization", auth);
        }
        let (status, body) = status_json(get.send().await.unwrap()).await;
        assert_eq!(status, 401, "list with {auth:?}: {body}");
        let (status, body) = status_json(post.send().await.unwrap()).await;
        assert_eq!(status, 401, "replay with {auth:?}: {body}");
    }
    let bearer = format!("Bearer {token}");
    // A write key is not the admin token.
    let (status, _) = admin(client().get(&list_url), &basic(common::WRITE_KEY)).await;
    assert_eq!(status, 401);

    let (status, body) = admin(client().get(&list_url), &bearer).await;
    assert_eq!(status, 200, "{body}");
    let rows = body["dead_letters"].as_array().expect("dead_letters array");
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["message"]["messageId"], "x");
    assert_eq!(rows[0]["reason"], "rejected");
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[0]["response"], r#"{"error":"no x"}"#);
    let rows = f.dead_letters("hook").await;
    assert_eq!(rows.len(), 1, "the CLI sees the same row: {rows:#?}");
    assert_eq!(rows[0]["id"], body["dead_letters"][0]["id"]);
    assert_eq!(
        rows[0]["replay"], false,
        "the refused replays marked nothing"
    );
    assert_eq!(r.requests_with("x").len(), tries_of_x);

    r.clear_responder();
    let (status, body) = admin(client().post(&replay_url), &bearer).await;
    assert_eq!((status, body), (200, json!({"replayed": 1})));

    let missing = r
        .wait_for_ids(&["x".to_string()].into(), Duration::from_secs(10))
        .await;
    assert!(missing.is_empty(), "the replayed message arrives");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = admin(client().get(&list_url), &bearer).await;
        assert_eq!(status, 200, "{body}");
        if body["dead_letters"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_404_without_an_admin_token() {
    let f = Fanout::start();
    for request in [
        client().get(f.url("/admin/dead-letters?destination=out")),
        client().post(f.url("/admin/dead-letters/replay?destination=out")),
    ] {
        let response = request
            .header("authorization", "Bearer anything")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_after_max_attempts_are_dead_lettered() {
    let r = Receiver::start().await;
    // The answer echoes a value of the message, as receivers do: it is kept with the
    // dead letter and never logged.
    let answer = r#"{"error":"always down for jane@example.com"}"#;
    r.set_default(Reply::json(500, answer));
    let hook = Dest::webhook("hook", &r.url("/hook")).with(
        "retry",
        r#"{ initial_backoff = "100ms", max_backoff = "200ms", max_attempts = 3 }"#,
    );
    let f = Fanout::start_with(with_dests(&[hook]));

    send(&f, &[track("ex-1", "u1")]).await;
    let rows = f
        .wait_dead_letters("hook", 1, Duration::from_secs(15))
        .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row["reason"], "retries_exhausted", "{row}");
    assert_eq!(row["attempts"], 3, "{row}");
    assert_eq!(row["status"], 500, "{row}");
    assert_eq!(row["response"], answer, "{row}");
    assert_eq!(row["message"]["messageId"], "ex-1", "{row}");
    let log = f.stderr();
    assert!(
        log.iter()
            .any(|l| l.contains("will retry") && l.contains("HTTP 500")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("giving up")), "{log:#?}");
    assert!(
        log.iter().all(|l| !l.contains("jane@example.com")),
        "{log:#?}"
    );
    assert!(
        rfc3339(&row["first_attempt_at"]) <= rfc3339(&row["dead_at"]),
        "{row}"
    );
    f.wait_settled("hook").await;
    assert_eq!(r.requests_with("ex-1").len(), 3, "three attempts in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_user_holds_back_only_its_own_later_messages() {
    let r = Receiver::start().await;
    let stuck = |request: &common::receiver::ReceivedRequest| {
        request
            .messages()
            .iter()
            .any(|m| m["userId"] == "stuck")
            .then(|| Reply::json(500, r#"{"error":"not now"}"#))
    };
    r.respond_with(stuck);
    let hook = Dest::webhook("hook", &r.url("/hook"))
        .with("ordering", "true")
        .with("concurrency", "2")
        .with(
            "retry",
            r#"{ initial_backoff = "100ms", max_backoff = "300ms" }"#,
        );
    let f = Fanout::start_with(with_dests(&[hook]));

    send(&f, &[track("s-1", "stuck")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.requests_with("s-1").len() < 2 {
        assert!(Instant::now() < deadline, "s-1 is being retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = vec![
        track("f-1", "free"),
        track("s-2", "stuck"),
        track("f-2", "free"),
        track("g-1", "other"),
    ];
    send(&f, &later).await;
    let others: HashSet<String> = ["f-1", "f-2", "g-1"].map(String::from).into();
    let missing = r.wait_for_ids(&others, Duration::from_secs(5)).await;
    assert!(
        missing.is_empty(),
        "held back behind another user: {missing:?}"
    );
    assert!(
        r.requests_with("s-2").is_empty(),
        "s-2 was sent while s-1 still failed"
    );

    r.clear_responder();
    let all: HashSet<String> = ["s-1", "s-2"].map(String::from).into();
    let missing = r.wait_for_ids(&all, Duration::from_secs(10)).await;
    assert!(missing.is_empty(), "{missing:?}");
    let got = r.message_ids();
    let s1 = got.iter().position(|id| id == "s-1").unwrap();
    let s2 = got.iter().position(|id| id == "s-2").unwrap();
    assert!(s1 < s2, "the stuck user's order is kept: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_through_a_relay_chain_of_two_fanouts() {
    let b = Fanout::start();
    let relay = Dest::segment("relay", &format!("http://{}", b.addr))
        .with("write_key_env", "\"RELAY_WRITE_KEY\"");
    let a = Fanout::start_with(with_dests(&[relay]).env("RELAY_WRITE_KEY", common::WRITE_KEY));

    run_python(&a, &["--count", "3"]).await;
    let in_a = a.wait_delivered(21).await;
    assert_eq!(in_a.len(), 21, "A's own file destination");
    let in_b = b.wait_delivered(21).await;
    a.wait_settled("relay").await;
    b.wait_settled("out").await;
    let in_b_all = b.delivered();
    assert_eq!(in_b.len(), 21);
    assert_eq!(in_b_all.len(), 21, "nothing arrives at B twice");
    assert_each_once(&ids(&in_b_all));
    assert_eq!(id_set(&in_b_all), id_set(&in_a), "B holds what A accepted");
    for m in &in_b_all {
        assert_eq!(
            m["context"]["library"]["name"], "analytics-python",
            "the client's fields survive the relay: {m}"
        );
    }
    for round in 0..3 {
        assert!(
            id_set(&in_b_all).contains(&format!("fixed-msg-id-{round}")),
            "the client's own messageIds are kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sends_headers_signature_and_one_message_per_request() {
    use hmac::{Hmac, Mac};
    let secret = "hook-signing-secret";
    let arrays = Receiver::start().await;
    let singles = Receiver::start().await;
    let signed = Dest::webhook("signed", &arrays.url("/hook"))
        .with("headers", r#"{ "X-Team" = "data", "X-Other" = "two" }"#)
        .with("signing_secret_env", "\"HOOK_SECRET\"")
        .with("payload", "\"array\"");
    let single = Dest::webhook("single", &singles.url("/one")).with("payload", "\"message\"");
    let f = Fanout::start_with(with_dests(&[signed, single]).env("HOOK_SECRET", secret));

    let sent = messages("w", 5, 2);
    send(&f, &sent).await;
    let got = arrays.wait_for_messages(5, Duration::from_secs(10)).await;
    assert_eq!(id_set(&got), id_set(&sent));
    let one = singles.wait_for_messages(5, Duration::from_secs(10)).await;
    assert_eq!(id_set(&one), id_set(&sent));

    for request in arrays.requests() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/hook");
        assert_eq!(request.header("x-team"), Some("data"));
        assert_eq!(request.header("x-other"), Some("two"));
        assert!(request.json().is_some_and(|b| b.is_array()), "a JSON array");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&request.raw_body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            request.header("x-fanout-signature"),
            Some(format!("sha256={hex}").as_str()),
            "signature of {}",
            String::from_utf8_lossy(&request.raw_body)
        );
    }
    let requests = singles.requests();
    assert_eq!(requests.len(), 5, "one request per message");
    for request in &requests {
        assert_eq!(request.path, "/one");
        let body = request.json().expect("JSON body");
        assert!(body.is_object(), "one message object: {body}");
        assert!(body["messageId"].is_string(), "{body}");
        assert_eq!(body["type"], "track", "{body}");
        assert_eq!(request.header("x-fanout-signature"), None);
        assert_eq!(request.header("x-team"), None);
    }
    assert_per_user_order(&sent, &one);
    for m in got.iter().chain(&one) {
        assert!(m["receivedAt"].is_string(), "stored fields are sent: {m}");
        assert!(m["timestamp"].is_string(), "{m}");
        assert_eq!(m["properties"]["id"], m["messageId"], "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_relay_posts_basic_auth_gzip_batches_within_segment_limits() {
    let key = "relay-key-123";
    let zipped = Receiver::start().await;
    let plain = Receiver::start().await;
    // Batches as large as Segment allows by count: by size they must be cut at 500 KB.
    let big = r#"{ max_events = 2500, linger = "1s" }"#;
    let gz = Dest::segment("relay-gz", &zipped.url(""))
        .with("write_key_env", "\"RELAY_WRITE_KEY\"")
        .with("gzip", "true")
        .with("batch", big);
    let raw = Dest::segment("relay-plain", &plain.url(""))
        .with("write_key_env", "\"RELAY_WRITE_KEY\"")
        .with("gzip", "false")
        .with("batch", big);
    let f = Fanout::start_with(with_dests(&[gz, raw]).env("RELAY_WRITE_KEY", key));

    // ~300 bytes each as stored: 2 500 of them would exceed 500 KB.
    let pad = "p".repeat(100);
    let sent: Vec<Value> = (0..3000)
        .map(|i| {
            let mut m = track(&format!("sg-{i}"), &format!("user-{}", i % 9));
            m["properties"]["pad"] = json!(pad);
            m
        })
        .collect();
    send(&f, &sent).await;
    for r in [&zipped, &plain] {
        let missing = r
            .wait_for_ids(&id_set(&sent), Duration::from_secs(30))
            .await;
        assert!(missing.is_empty(), "{} missing", missing.len());
    }
    f.wait_settled("relay-gz").await;
    f.wait_settled("relay-plain").await;

    for (r, gzipped) in [(&zipped, true), (&plain, false)] {
        let requests = r.requests();
        assert!(
            requests.len() >= 2,
            "3 000 messages never go in one request"
        );
        for request in &requests {
            assert_eq!(request.method, "POST");
            assert_eq!(request.path, "/v1/batch");
            assert_eq!(request.header("authorization"), Some(basic(key).as_str()));
            if gzipped {
                assert_eq!(request.header("content-encoding"), Some("gzip"));
                assert_eq!(&request.raw_body[..2], [0x1f, 0x8b], "gzip bytes");
            } else {
                assert_eq!(request.header("content-encoding"), None);
            }
            let body = request.json().expect("JSON body");
            let batch = body["batch"].as_array().expect("{\"batch\":[...]}");
            assert!(
                batch.len() <= 2500,
                "{} messages in one request",
                batch.len()
            );
            assert!(
                request.body.len() <= 500 * 1024,
                "{} bytes ({} messages, gzip {gzipped}) in one request",
                request.body.len(),
                batch.len()
            );
        }
        let got = r.messages();
        assert_each_once(&ids(&got));
        assert_per_user_order(&sent, &got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_budget_answers_503_until_the_queue_drains() {
    let r = Receiver::start().await;
    r.stop().await;
    let settings = with_dests(&[Dest::webhook("hook", &r.url("/hook"))])
        .server("max_queue_bytes = 200000\nsegment_bytes = 65536");
    let f = Fanout::start_with(settings);

    let pad = "d".repeat(200);
    let batch_of = |round: usize| -> Vec<Value> {
        (0..20)
            .map(|i| {
                let mut m = track(&format!("q{round}-{i}"), &format!("user-{}", i % 5));
                m["properties"]["pad"] = json!(pad);
                m
            })
            .collect()
    };
    let mut accepted: HashSet<String> = HashSet::new();
    let mut refused: HashSet<String> = HashSet::new();
    let mut round = 0;
    let full = loop {
        assert!(round < 500, "no 503 after {round} requests of ~6 KB");
        let batch = batch_of(round);
        round += 1;
        let response = f
            .post("/v1/batch")
            .json(&json!({"batch": batch}))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => accepted.extend(ids(&batch)),
            503 => {
                refused.extend(ids(&batch));
                break response;
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    };
    let retry_after = full
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        retry_after.as_deref().is_some_and(|v| !v.is_empty()),
        "503 with Retry-After"
    );
    let (_, body) = status_json(full).await;
    assert_eq!(body["success"], false, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(!accepted.is_empty(), "the first request fits the budget");
    // A load balancer sees it too, for as long as it lasts.
    let ready = || async {
        let response = client().get(f.url("/ready")).send().await.unwrap();
        status_json(response).await
    };
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_queue_bytes")),
        "{body}"
    );

    r.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let batch = batch_of(round);
        round += 1;
        let response = f
            .post("/v1/batch")
            .json(&json!({"batch": batch}))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => {
                accepted.extend(ids(&batch));
                break;
            }
            503 => refused.extend(ids(&batch)),
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            Instant::now() < deadline,
            "ingest still refuses after the destination came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let missing = r.wait_for_ids(&accepted, Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "{} accepted but lost", missing.len());
    assert_eq!(ready().await.0, 200, "ready again once the queue drained");
    let in_file = wait_file(&f, accepted.len(), Duration::from_secs(10)).await;
    assert_eq!(
        id_set(&in_file),
        accepted,
        "the file holds what was accepted"
    );
    let got = id_set(&r.messages());
    assert!(
        got.is_disjoint(&refused),
        "a message answered 503 was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_holds_back_batches_already_queued_for_a_send_slot() {
    let r = Receiver::start().await;
    r.push_reply(
        Reply::json(429, "{}")
            .header("Retry-After", "3")
            .delay(Duration::from_millis(300)),
    );
    let hook = Dest::webhook("hook", &r.url("/hook"))
        .with("concurrency", "1")
        .with("batch", r#"{ max_events = 1, linger = "0ms" }"#);
    let f = Fanout::start_with(with_dests(&[hook]));
    // Five users: the other four batches are queued for the one slot during the 429.
    let sent: Vec<Value> = (0..5)
        .map(|i| track(&format!("q{i}"), &format!("u{i}")))
        .collect();
    send(&f, &sent).await;
    r.wait_for_messages(5, Duration::from_secs(20)).await;
    let requests = r.requests();
    assert_eq!(requests[0].status, 429);
    let answered = requests[0].answered_at.unwrap();
    let early: Vec<_> = requests[1..]
        .iter()
        .filter(|q| q.at < answered + Duration::from_secs(3))
        .map(|q| (q.at - answered, q.message_ids()))
        .collect();
    assert!(
        early.is_empty(),
        "sent inside the Retry-After window: {early:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_a_long_failing_backlog_does_not_hold_back_others() {
    let r = Receiver::start().await;
    r.respond_with(|q| {
        q.messages()
            .iter()
            .any(|m| m["userId"] == "stuck")
            .then(|| Reply::json(500, "{}"))
    });
    let hook = Dest::webhook("hook", &r.url("/hook"))
        .with("batch", r#"{ max_events = 5, linger = "0ms" }"#);
    let f = Fanout::start_with(with_dests(&[hook]));
    // Far more than the read-ahead holds (5 × (1 + 4 + 1) messages).
    let stuck: Vec<Value> = (0..200).map(|i| track(&format!("s{i}"), "stuck")).collect();
    send(&f, &stuck).await;
    // The stuck user's first batch has failed: its backlog now waits behind it.
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "hook"), ("outcome", "retried")],
        |n| n >= 1.0,
    )
    .await;
    send(&f, &[track("free-1", "free")]).await;
    let missing = r
        .wait_for_ids(&["free-1".to_string()].into(), Duration::from_secs(5))
        .await;
    assert!(missing.is_empty(), "another user's message is held back");
    assert!(
        r.messages().iter().all(|m| m["userId"] != "stuck"),
        "the failing user's messages were never answered 2xx"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_hanging_receiver_and_the_message_stays_owed() {
    let r = Receiver::start().await;
    r.push_reply(Reply::status(200).delay(Duration::from_secs(15)));
    let mut f = Fanout::start_with(with_dests(&[Dest::webhook("hook", &r.url("/hook"))]));
    send(&f, &[track("h1", "u1")]).await;
    r.wait_until(Duration::from_secs(10), |q| !q.is_empty())
        .await;
    let started = Instant::now();
    let (exit, mut f) = tokio::task::spawn_blocking(move || (f.terminate(), f))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    f.restart();
    let missing = r
        .wait_for_ids(&["h1".to_string()].into(), Duration::from_secs(10))
        .await;
    assert!(
        missing.is_empty(),
        "the interrupted message is sent after the restart"
    );
}
