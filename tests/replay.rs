//! Replay from the retained log (`server.retention`, `POST /admin/replay`, `fanout
//! replay`): one destination reads again from a point in time while another keeps its
//! position; `until` bounds it; what is no longer retained is refused with the oldest
//! time available; the disk budget wins over retention.

mod common;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use common::{assert_success, client, Fanout, Settings};
use serde_json::{json, Value};

const TOKEN: &str = "replay-admin-token";

/// The harness's `out`, plus a file destination `archive` in the same directory.
fn with_archive(server: &str) -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive.jsonl");
    let settings = Settings::default()
        .server(server)
        .section(&format!(
            "[[destinations]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n",
            archive.display()
        ))
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN);
    Fanout::start_in(tmp, settings)
}

fn archive(f: &Fanout) -> std::path::PathBuf {
    f.dir().join("archive.jsonl")
}

async fn send(f: &Fanout, ids: &[&str]) {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "userId": "u1", "event": "E", "messageId": id}))
        .collect();
    assert_success(
        f.post("/v1/batch")
            .json(&json!({"batch": batch}))
            .send()
            .await
            .unwrap(),
    )
    .await;
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn post_replay(f: &Fanout, query: &str) -> (u16, Value) {
    common::post_replay(f, TOKEN, query).await
}

async fn settle_both(f: &Fanout, out: usize, archived: usize) {
    f.wait_delivered(out).await;
    common::wait_file_lines(&archive(f), archived).await;
    f.wait_settled("out").await;
    f.wait_settled("archive").await;
}

#[tokio::test]
async fn one_destination_replays_since_t_while_another_keeps_its_position() {
    let f = with_archive("retention = \"1h\"");
    send(&f, &["a1", "a2", "a3"]).await;
    let t1 = common::next_second().await;
    send(&f, &["b1", "b2", "b3"]).await;
    settle_both(&f, 6, 6).await;

    let answer = f
        .cli(&[
            "replay",
            "--destination",
            "out",
            "--since",
            &rfc3339(t1),
            "--url",
            &f.url(""),
        ])
        .await;
    let answer: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(answer["messages"], 3, "{answer}");
    let out = f.wait_delivered(9).await;
    assert_eq!(
        common::receiver::ids(&out),
        ["a1", "a2", "a3", "b1", "b2", "b3", "b1", "b2", "b3"],
        "the messages since t1 again, each with its messageId"
    );
    // New traffic goes on to both, once.
    send(&f, &["c1"]).await;
    settle_both(&f, 10, 7).await;
    assert_eq!(common::receiver::ids(&f.delivered())[9], "c1");
    // Both cursors are at the log's end (settle_both): nothing more can be sent.
    assert_eq!(f.delivered().len(), 10);
    let archived = common::file_lines(&archive(&f));
    assert_eq!(
        common::receiver::ids(&archived),
        ["a1", "a2", "a3", "b1", "b2", "b3", "c1"],
        "the other destination kept its position"
    );
}

#[tokio::test]
async fn until_bounds_a_replay() {
    let f = with_archive("retention = \"1h\"");
    let t0 = common::next_second().await;
    send(&f, &["a1", "a2"]).await;
    common::next_second().await;
    send(&f, &["b1", "b2"]).await;
    settle_both(&f, 4, 4).await;

    let query = format!(
        "destination=archive&since={}&until={}",
        rfc3339(t0),
        rfc3339(t0)
    );
    let (status, body) = post_replay(&f, &query).await;
    assert_eq!((status, &body["messages"]), (200, &json!(2)), "{body}");
    common::wait_file_lines(&archive(&f), 6).await;
    // Its cursor is at the log's end: what it passed over stays passed over.
    f.wait_settled("archive").await;
    let archived = common::file_lines(&archive(&f));
    assert_eq!(
        common::receiver::ids(&archived),
        ["a1", "a2", "b1", "b2", "a1", "a2"],
        "what came after `until` is not sent again"
    );
    assert_eq!(f.delivered().len(), 4, "the other destination is untouched");
}

#[tokio::test]
async fn a_replay_of_what_is_no_longer_retained_is_refused_with_the_oldest_time() {
    // No retention, small segments: what every destination passed is deleted.
    let f = with_archive("segment_bytes = 2048\nmax_queue_bytes = 1048576");
    let t0 = common::next_second().await;
    let ids: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    for chunk in ids.chunks(10) {
        send(&f, &chunk.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
    settle_both(&f, 40, 40).await;
    let (status, body) = post_replay(&f, &format!("destination=out&since={}", rfc3339(t0))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "not_retained", "{body}");
    assert_eq!(body["error"]["field"], "since");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("oldest available"),
        "{body}"
    );
    assert_eq!(f.delivered().len(), 40, "nothing was sent again");
}

#[tokio::test]
async fn bad_replay_requests_name_the_field() {
    let f = with_archive("retention = \"1h\"");
    for (query, field) in [
        ("since=2026-01-01T00:00:00Z", "destination"),
        ("destination=out", "since"),
        ("destination=out&since=yesterday", "since"),
        ("destination=nope&since=2026-01-01T00:00:00Z", "destination"),
        (
            "destination=out&since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
        ),
    ] {
        let (status, body) = post_replay(&f, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
    let response = client()
        .post(f.url("/admin/replay?destination=out&since=2026-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the admin token is needed");
}

#[tokio::test]
async fn the_disk_budget_wins_over_retention() {
    let f = with_archive("retention = \"1h\"\nsegment_bytes = 4096\nmax_queue_bytes = 16384");
    let mut sent = 0;
    for i in 0..120 {
        let id = format!("m{i}");
        // One message at a time: each request fits; a 503 (delivery behind) is retried.
        loop {
            let body = json!({"userId": "u", "event": "E", "messageId": id,
                              "properties": {"pad": "x".repeat(200)}});
            let response = f.post("/v1/track").json(&body).send().await.unwrap();
            if response.status() == 200 {
                break;
            }
            assert_eq!(response.status(), 503);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent += 1;
    }
    settle_both(&f, sent, sent).await;
    let evicted = f
        .metric("fanout_queue_retention_evicted_segments_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(evicted > 0.0, "retained segments gave way to the budget");
    let held = f.metric("fanout_queue_held_bytes", &[]).await.unwrap();
    assert!(held <= 16384.0, "held {held}");
    assert_file_ids(&archive(&f), sent);
}

fn assert_file_ids(path: &Path, n: usize) {
    let ids = common::receiver::ids(&common::file_lines(path));
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want);
}
