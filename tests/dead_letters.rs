//! `[dead_letters]` bounds through the running server, on both backends (the local SQLite
//! store and the stream beside a real nats-server's shared log): a flood of messages a
//! tracking plan blocks keeps the store within `max_bytes`, the newest letters kept and
//! the dropped ones counted in `/metrics`; letters past `retention` go; the admin listing
//! is paged with a cursor, and `fanout dead-letters list` follows the pages.

mod common;

use std::time::Instant;

use common::nats::NatsCluster;
use common::{assert_success, client, Fanout, Settings};
use serde_json::{json, Value};

const TOKEN: &str = "dead-letters-admin-token";

/// fanout whose `test` source blocks every event but `Planned`, with `[dead_letters]`
/// set to `bounds` (left out when empty); on the shared log of `nats` when given.
fn blocking(nats: Option<&NatsCluster>, bounds: &str) -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("plans")).unwrap();
    let plan = json!({"events": {"Planned": {"type": "object"}}, "unplanned_events": "block"});
    std::fs::write(tmp.path().join("plans/web.json"), plan.to_string()).unwrap();
    let mut settings = Settings::default()
        .source("tracking_plan = \"plans/web.json\"")
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN);
    if !bounds.is_empty() {
        settings = settings.section(&format!("[dead_letters]\n{bounds}\n"));
    }
    if let Some(nats) = nats {
        settings = settings.section(&nats.queue_section(""));
    }
    Fanout::start_in(tmp, settings)
}

/// `batches` batches of 100 blocked events padded with `pad` bytes; returns their
/// messageIds (`f<batch>-<n>`) in the order sent.
async fn flood(f: &Fanout, batches: usize, pad: usize) -> Vec<String> {
    let pad = "x".repeat(pad);
    let mut sent = Vec::new();
    for b in 0..batches {
        let batch: Vec<Value> = (0..100)
            .map(|n| {
                sent.push(format!("f{b:02}-{n:03}"));
                json!({"type": "track", "userId": "u1", "event": "Flood",
                       "messageId": format!("f{b:02}-{n:03}"), "properties": {"pad": pad}})
            })
            .collect();
        assert_success(
            f.post("/v1/batch")
                .json(&json!({ "batch": batch }))
                .send()
                .await
                .unwrap(),
        )
        .await;
    }
    sent
}

fn message_ids(letters: &[Value]) -> Vec<String> {
    letters
        .iter()
        .map(|l| l["message"]["messageId"].as_str().unwrap().to_string())
        .collect()
}

/// After a flood of `sent`: some letters are kept, and they are the newest, in order;
/// every other one is counted as dropped for `max_bytes`. Returns the letters.
async fn assert_newest_kept(f: &Fanout, sent: &[String]) -> Vec<Value> {
    let letters = f.dead_letters("tracking_plan").await;
    assert!(letters.len() > 20, "only {} kept", letters.len());
    let ids = message_ids(&letters);
    assert_eq!(ids, sent[sent.len() - ids.len()..]);
    let dropped = f
        .metric(
            "fanout_dead_letters_dropped_total",
            &[("destination", "tracking_plan"), ("reason", "max_bytes")],
        )
        .await;
    assert_eq!(dropped, Some((sent.len() - ids.len()) as f64));
    letters
}

#[tokio::test]
async fn a_flood_of_blocked_messages_keeps_the_newest_letters_within_max_bytes() {
    const MAX_BYTES: usize = 64 * 1024;
    let f = blocking(None, &format!("max_bytes = {MAX_BYTES}"));
    let started = Instant::now();
    // 4 000 letters of ~1.2 KB: about 75 times the cap.
    let sent = flood(&f, 40, 900).await;
    let took = started.elapsed();

    let letters = assert_newest_kept(&f, &sent).await;
    let held: usize = letters
        .iter()
        .map(|l| l["message"].to_string().len() + l["response"].as_str().unwrap().len() + 128)
        .sum();
    assert!(held <= MAX_BYTES, "{held} bytes of letters kept");
    // The file holds the cap and a batch, not the 5 MB sent (SQLite reuses freed pages).
    let file = std::fs::metadata(f.dir().join("data/dead-letters.sqlite"))
        .unwrap()
        .len();
    assert!(file < 8 * MAX_BYTES as u64, "{file} bytes on disk");
    let logged = f
        .stderr()
        .iter()
        .filter(|l| l.contains("dead_letters.max_bytes"))
        .count();
    assert!(logged >= 1, "the drops are logged");
    assert!(
        logged as u64 <= 1 + took.as_secs() / 10,
        "{logged} lines in {took:?}: at most one every 10 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_blocked_messages_keeps_the_shared_letters_within_max_bytes() {
    const MAX_BYTES: u64 = 128 * 1024;
    let nats = NatsCluster::single();
    let f = blocking(Some(&nats), &format!("max_bytes = {MAX_BYTES}"));
    // 3 000 letters of ~1.3 KB: about 30 times the cap.
    let sent = flood(&f, 30, 900).await;

    let held = stream_bytes(&nats, "fanout_dead_letters");
    assert!(held <= MAX_BYTES, "the stream holds {held} bytes");
    assert_newest_kept(&f, &sent).await;
}

/// The bytes a stream holds, from the server's monitoring endpoint.
fn stream_bytes(nats: &NatsCluster, stream: &str) -> u64 {
    let jsz = nats.nodes[0]
        .monitor("/jsz?streams=true")
        .expect("monitoring");
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|d| d["name"] == stream)
        .and_then(|d| d["state"]["bytes"].as_u64())
        .unwrap_or_else(|| panic!("no stream {stream} in {jsz}"))
}

/// Letters older than the retention go, counted as such.
async fn assert_expire(f: &Fanout) {
    flood(f, 1, 0).await;
    f.wait_metric(
        "fanout_dead_letters_dropped_total",
        &[("destination", "tracking_plan"), ("reason", "retention")],
        |dropped| dropped == 100.0,
    )
    .await;
    assert!(f.dead_letters("tracking_plan").await.is_empty());
}

#[tokio::test]
async fn letters_past_their_retention_are_dropped_and_counted() {
    assert_expire(&blocking(None, "retention = \"2s\"")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_letters_past_their_retention_are_dropped_and_counted() {
    let nats = NatsCluster::single();
    assert_expire(&blocking(Some(&nats), "retention = \"2s\"")).await;
}

/// `GET /admin/dead-letters` with `query`: status and body.
async fn admin_list(f: &Fanout, query: &str) -> (u16, Value) {
    let response = client()
        .get(f.url(&format!("/admin/dead-letters?{query}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    common::status_json(response).await
}

/// More than 1 000 letters: a larger `limit` is refused naming it; walking `next` with
/// the default page and a smaller one sees each letter once, in order; so does the CLI.
async fn assert_paged(f: &Fanout) {
    let sent = flood(f, 11, 0).await;
    let (status, body) = admin_list(f, "limit=100000").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "limit", "{body}");

    for (limit, expected_pages) in [("", 2), ("&limit=300", 4)] {
        let (mut seen, mut after, mut pages) = (Vec::new(), 0, 0);
        loop {
            let query = format!("destination=tracking_plan{limit}&after={after}");
            let (status, body) = admin_list(f, &query).await;
            assert_eq!(status, 200, "{body}");
            let letters = body["dead_letters"].as_array().unwrap();
            assert!(letters.len() <= 1000);
            seen.extend(message_ids(letters));
            pages += 1;
            match body["next"].as_i64() {
                Some(next) => after = next,
                None => break,
            }
        }
        assert_eq!(pages, expected_pages, "{limit}");
        assert_eq!(seen, sent, "{limit}: every letter once, in order");
    }
    assert_eq!(message_ids(&f.dead_letters("tracking_plan").await), sent);
}

#[tokio::test]
async fn the_admin_listing_is_paged_with_a_cursor() {
    assert_paged(&blocking(None, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_admin_listing_is_paged_with_a_cursor() {
    let nats = NatsCluster::single();
    assert_paged(&blocking(Some(&nats), "")).await;
}
