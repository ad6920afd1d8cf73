//! Privacy regulations (`/admin/regulations`, `fanout regulations`) through the running
//! server, on both queue backends: a suppressed subject's later messages are answered
//! 200 and reach neither a destination nor the log, on every ingest path; its dead
//! letters are purged; replays skip it; `unsuppress` and removal lift it; regulations
//! survive a restart and hold on every instance of a shared log; bad bodies are refused
//! naming the field; `suppress_with_delete` reports per destination.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use common::nats::NatsCluster;
use common::receiver::{Receiver, Reply};
use common::{assert_success, client, event_batch, status_json, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

const TOKEN: &str = "regulations-admin-token";

fn settings() -> Settings {
    Settings::default()
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN)
}

fn track(user_id: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user_id, "event": event, "messageId": event})
}

async fn post_regulation(f: &Fanout, body: Value) -> (u16, Value) {
    common::regulations::post(f, TOKEN, &body).await
}

async fn regulations(f: &Fanout) -> Vec<Value> {
    common::regulations::list(f, TOKEN).await
}

/// The events the file destination `out` got, in order.
fn events(f: &Fanout) -> Vec<String> {
    f.delivered()
        .iter()
        .map(|m| m["event"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Whether any file under the data dir (the log, its keys, the stores) holds `needle`.
fn data_holds(dir: &Path, needle: &str) -> bool {
    let mut todo = vec![dir.join("data")];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    return true;
                }
            }
        }
    }
    false
}

async fn suppressed_total(f: &Fanout) -> f64 {
    f.metric("fanout_suppressed_total", &[("source", "test")])
        .await
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_suppressed_users_later_messages_reach_no_destination_nor_the_log() {
    let f = Fanout::start_with(settings());
    f.send_batch(json!([track("u1", "Before-u1"), track("u2", "Before-u2")]))
        .await;
    f.wait_delivered(2).await;

    let out = f
        .cli(&[
            "regulations",
            "add",
            "--type",
            "suppress",
            "--user-id",
            "u1",
            "--url",
            &f.url(""),
        ])
        .await;
    let created: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&created["type"], &created["userId"]),
        (&json!("suppress"), &json!("u1"))
    );
    let (status, again) = post_regulation(&f, json!({"type": "suppress", "userId": "u1"})).await;
    assert_eq!(status, 200, "already suppressed: {again}");
    assert_eq!(again["id"], created["id"]);
    let (status, by_email) =
        post_regulation(&f, json!({"type": "suppress", "email": "Gone@Example.com"})).await;
    assert_eq!(status, 201, "{by_email}");

    // Every ingest path answers as if accepted.
    f.send_batch(json!([
        track("u1", "Secret-batch"),
        track("u2", "After-u2"),
        {"type": "identify", "userId": "u3", "traits": {"email": "gone@example.com", "name": "Secret-identify"}},
        {"type": "track", "userId": "u4", "event": "Secret-context", "context": {"traits": {"email": "GONE@example.com"}}},
    ]))
    .await;
    let single = f
        .post("/v1/track")
        .json(&json!({"userId": "u1", "event": "Secret-single"}))
        .send()
        .await
        .unwrap();
    assert_success(single).await;
    let report = event_batch(
        &f,
        &json!({"batch": [{"type": "track", "userId": "u1", "event": "Secret-seed", "messageId": "seed-1"}]}),
    )
    .await;
    assert_eq!(report["success"], true, "{report}");
    let person = client()
        .post(f.url("/api/v1/event"))
        .header("Authentication", WRITE_KEY)
        .json(&json!({"personId": "u1", "event": "Secret-person"}))
        .send()
        .await
        .unwrap();
    assert_eq!(person.status(), 200);

    f.wait_metric("fanout_suppressed_total", &[("source", "test")], |n| {
        n == 6.0
    })
    .await;
    f.send_batch(json!([track("u2", "Last-u2")])).await;
    f.wait_delivered(4).await;
    f.wait_settled("out").await;
    assert_eq!(
        events(&f),
        ["Before-u1", "Before-u2", "After-u2", "Last-u2"]
    );
    assert!(
        data_holds(f.dir(), "After-u2"),
        "the inspection sees the log"
    );
    assert!(
        !data_holds(f.dir(), "Secret-"),
        "a suppressed message was stored"
    );
}

#[tokio::test]
async fn a_suppression_purges_the_subjects_dead_letters() {
    purges_dead_letters(None).await;
}

#[tokio::test]
async fn a_suppression_purges_the_subjects_dead_letters_on_the_shared_log() {
    let nats = NatsCluster::single();
    purges_dead_letters(Some(&nats)).await;
}

/// Messages a tracking plan blocks are dead letters; suppressing u1 purges its own.
async fn purges_dead_letters(nats: Option<&NatsCluster>) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("plans")).unwrap();
    let plan = json!({"events": {"Planned": {"type": "object"}}, "unplanned_events": "block"});
    std::fs::write(tmp.path().join("plans/web.json"), plan.to_string()).unwrap();
    let mut settings = settings().source("tracking_plan = \"plans/web.json\"");
    if let Some(nats) = nats {
        settings = settings.section(&nats.queue_section(""));
    }
    let f = Fanout::start_in(tmp, settings);
    f.send_batch(json!([
        track("u1", "Blocked-u1-a"),
        track("u2", "Blocked-u2"),
        track("u1", "Blocked-u1-b"),
    ]))
    .await;
    assert_eq!(
        f.wait_dead_letters("tracking_plan", 3, Duration::from_secs(10))
            .await
            .len(),
        3
    );
    let (status, answer) = post_regulation(&f, json!({"type": "suppress", "userId": "u1"})).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["dead_letters_purged"], 2);
    let left = f.dead_letters("tracking_plan").await;
    let left: Vec<&Value> = left.iter().map(|l| &l["message"]["event"]).collect();
    assert_eq!(left, [&json!("Blocked-u2")]);
}

#[tokio::test]
async fn a_replay_skips_a_suppressed_user() {
    let f = Fanout::start_with(settings().server("retention = \"1h\""));
    let since = chrono::Utc::now() - chrono::TimeDelta::seconds(2);
    f.send_batch(json!([track("u1", "One-u1"), track("u2", "One-u2")]))
        .await;
    f.wait_delivered(2).await;
    f.wait_settled("out").await;
    let (status, _) = post_regulation(&f, json!({"type": "suppress", "userId": "u1"})).await;
    assert_eq!(status, 201);
    let query = format!(
        "destination=out&since={}",
        since.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    let (status, answer) = common::post_replay(&f, TOKEN, &query).await;
    assert_eq!(status, 200, "{answer}");
    f.wait_delivered(3).await;
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "out"), ("outcome", "skipped")],
        |n| n >= 1.0,
    )
    .await;
    f.wait_settled("out").await;
    assert_eq!(events(&f), ["One-u1", "One-u2", "One-u2"]);
}

#[tokio::test]
async fn unsuppress_and_removal_lift_a_suppression_and_a_restart_keeps_the_rest() {
    let mut f = Fanout::start_with(settings());
    post_regulation(&f, json!({"type": "suppress", "userId": "u1"})).await;
    let (_, u2) = post_regulation(&f, json!({"type": "suppress", "anonymousId": "a2"})).await;
    let (_, u3) = post_regulation(&f, json!({"type": "suppress", "userId": "u3"})).await;
    f.send_batch(json!([
        track("u1", "Dropped-u1"),
        {"type": "page", "anonymousId": "a2", "name": "Dropped-a2"},
        track("u3", "Dropped-u3"),
    ]))
    .await;
    f.wait_metric("fanout_suppressed_total", &[("source", "test")], |n| {
        n == 3.0
    })
    .await;

    let (status, lifted) = post_regulation(&f, json!({"type": "unsuppress", "userId": "u1"})).await;
    assert_eq!(status, 201, "{lifted}");
    let id = u2["id"].as_str().unwrap();
    let removed = f
        .cli(&["regulations", "remove", id, "--url", &f.url("")])
        .await;
    assert!(removed.contains(id), "{removed}");
    let listed = f.cli(&["regulations", "list", "--url", &f.url("")]).await;
    let types: Vec<String> = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| {
            format!(
                "{} {}",
                r["type"].as_str().unwrap(),
                r["userId"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(types, ["suppress u1", "suppress u3", "unsuppress u1"]);

    f.terminate();
    f.restart();
    assert_eq!(regulations(&f).await.len(), 3, "kept across the restart");
    f.send_batch(json!([
        track("u1", "Kept-u1"),
        {"type": "track", "anonymousId": "a2", "event": "Kept-a2"},
        track("u3", "Dropped-u3-again"),
    ]))
    .await;
    f.wait_delivered(2).await;
    f.wait_metric("fanout_suppressed_total", &[("source", "test")], |n| {
        n == 1.0
    })
    .await;
    f.wait_settled("out").await;
    assert_eq!(events(&f), ["Kept-u1", "Kept-a2"]);
    assert_eq!(u3["type"], "suppress");
}

#[tokio::test]
async fn bad_regulation_requests_are_refused_naming_the_field() {
    let f = Fanout::start_with(settings());
    for (body, field) in [
        (json!({"userId": "u1"}), "type"),
        (json!({"type": "forget", "userId": "u1"}), "type"),
        (json!({"type": "suppress"}), "userId"),
        (
            json!({"type": "suppress", "userId": "u1", "anonymousId": "a1"}),
            "anonymousId",
        ),
        (json!({"type": "suppress", "email": 7}), "email"),
        (
            json!({"type": "suppress", "userId": "u1", "reason": "x"}),
            "reason",
        ),
    ] {
        let (status, answer) = post_regulation(&f, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
    }
    let (status, _) = status_json(
        client()
            .post(f.url("/admin/regulations"))
            .bearer_auth("wrong")
            .json(&json!({"type": "suppress", "userId": "u1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    let missing = client()
        .delete(f.url("/admin/regulations/reg_nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let (status, answer) = status_json(missing).await;
    assert_eq!((status, &answer["error"]["field"]), (404, &json!("id")));
    assert!(regulations(&f).await.is_empty());
}

/// Polls the listing until `done` holds for it (or 20 s pass: then panics).
async fn wait_regulations(f: &Fanout, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = regulations(f).await;
        if done(&listed) {
            return listed;
        }
        assert!(Instant::now() < deadline, "regulations stayed {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_deletion_reports_each_destination() {
    let f = Fanout::start_with(settings());
    let (status, made) =
        post_regulation(&f, json!({"type": "suppress_with_delete", "userId": "u1"})).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["destinations"]["out"]["status"], "pending");
    let listed = wait_regulations(&f, |all| {
        all.first()
            .is_some_and(|r| r["destinations"]["out"]["status"] != "pending")
    })
    .await;
    assert_eq!(
        listed[0]["destinations"]["out"],
        json!({"status": "not supported"})
    );
    assert!(listed[0].get("claim").is_none(), "{listed:?}");
}

#[tokio::test]
async fn a_regulation_made_on_one_instance_holds_on_another() {
    let nats = NatsCluster::single();
    let shared = || settings().section(&nats.queue_section(""));
    let a = Fanout::start_with(shared());
    let b = Fanout::start_with(shared());
    let (status, made) = post_regulation(&a, json!({"type": "suppress", "userId": "u1"})).await;
    assert_eq!(status, 201, "{made}");
    wait_regulations(&b, |all| all.len() == 1).await;
    b.send_batch(json!([track("u1", "Secret-b")])).await;
    assert_eq!(suppressed_total(&b).await, 1.0);

    // Lifted on b, it is lifted on a.
    let (status, _) = post_regulation(&b, json!({"type": "unsuppress", "userId": "u1"})).await;
    assert_eq!(status, 201);
    wait_regulations(&a, |all| all.len() == 2).await;
    a.send_batch(json!([track("u1", "Kept-a")])).await;
    assert_eq!(suppressed_total(&a).await, 0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events(&a).iter().chain(&events(&b)).any(|e| e == "Kept-a") {
        assert!(Instant::now() < deadline, "Kept-a was not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!events(&a)
        .iter()
        .chain(&events(&b))
        .any(|e| e == "Secret-b"));
}

/// The harness's `out` file, and a webhook `hook` posting to `receiver`.
fn with_hook(receiver: &Receiver) -> Settings {
    settings().section(&format!(
        "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        receiver.url("/hook")
    ))
}

/// The delete messages the receiver accepted.
fn deletes(receiver: &Receiver) -> Vec<Value> {
    receiver
        .messages()
        .into_iter()
        .filter(|m| m["type"] == "delete")
        .collect()
}

#[tokio::test]
async fn a_webhook_gets_the_delete_message_and_the_report_says_done() {
    let receiver = Receiver::start().await;
    // The first attempt fails as a 503 would: tried again.
    receiver.push_reply(Reply::status(503));
    let f = Fanout::start_with(with_hook(&receiver));
    let (status, made) =
        post_regulation(&f, json!({"type": "suppress_with_delete", "userId": "u1"})).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["destinations"]["hook"]["status"], "pending");
    let listed =
        wait_regulations(&f, |all| all[0]["destinations"]["hook"]["status"] == "done").await;
    let report = &listed[0]["destinations"];
    assert_eq!(report["out"], json!({"status": "not supported"}));
    assert!(report["hook"]["at"].is_string(), "{report}");
    let sent = deletes(&receiver);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["userId"], "u1");
    assert_eq!(
        receiver.requests().len(),
        2,
        "the 503, then the delete accepted"
    );
}

#[tokio::test]
async fn a_pending_deletion_resumes_after_a_restart() {
    let receiver = Receiver::start().await;
    receiver.stop().await;
    let mut f = Fanout::start_with(with_hook(&receiver));
    let (status, _) = post_regulation(
        &f,
        json!({"type": "suppress_with_delete", "anonymousId": "a1"}),
    )
    .await;
    assert_eq!(status, 201);
    let listed = wait_regulations(&f, |all| {
        all[0]["destinations"]["hook"]["attempts"].as_u64() >= Some(1)
    })
    .await;
    let hook = &listed[0]["destinations"]["hook"];
    assert_eq!(hook["status"], "pending", "{hook}");
    assert!(hook["last_error"].is_string(), "{hook}");

    f.terminate();
    receiver.restart().await;
    f.restart();
    wait_regulations(&f, |all| all[0]["destinations"]["hook"]["status"] == "done").await;
    let sent = deletes(&receiver);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["anonymousId"], "a1");
}

#[tokio::test]
async fn one_instance_of_a_shared_log_runs_a_deletion() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let shared = || with_hook(&receiver).section(&nats.queue_section(""));
    let a = Fanout::start_with(shared());
    let b = Fanout::start_with(shared());
    let (status, made) =
        post_regulation(&a, json!({"type": "suppress_with_delete", "userId": "u1"})).await;
    assert_eq!(status, 201, "{made}");
    for f in [&a, &b] {
        let listed = wait_regulations(f, |all| {
            all.first()
                .is_some_and(|r| r["destinations"]["hook"]["status"] == "done")
        })
        .await;
        assert!(listed[0].get("claim").is_none(), "{listed:?}");
    }
    let sent = deletes(&receiver);
    assert_eq!(sent.len(), 1, "both instances ran it: {sent:?}");
    assert_eq!(sent[0]["userId"], "u1");
}
