//! Dedupe shared through a real Redis: several instances accept a messageId once between
//! them, and losing Redis behaves as configured (fail open or fail closed) and recovers.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{assert_success, status_json, Fanout, RedisServer, Settings};
use serde_json::{json, Value};

fn shared(redis: &RedisServer, on_error: &str) -> Settings {
    Settings::default().section(&format!(
        "[dedupe]\nbackend = \"redis\"\nredis_url = \"{}\"\non_redis_error = \"{on_error}\"\n",
        redis.url()
    ))
}

fn batch(ids: &[String]) -> Value {
    let items: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "userId": "u", "event": "Shared", "messageId": id}))
        .collect();
    json!({ "batch": items })
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Posts `body` to `/v1/batch` and asserts the success answer.
async fn send(f: &Fanout, body: &Value) {
    assert_success(f.post("/v1/batch").json(body).send().await.unwrap()).await;
}

/// Waits until the instances together delivered `n` messages and each has settled
/// everything (so a stray duplicate would show), then counts each messageId.
async fn delivered_counts(instances: &[&Fanout], n: usize) -> HashMap<String, usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let total: usize = instances.iter().map(|f| f.delivered().len()).sum();
        if total >= n || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for f in instances {
        f.wait_settled("out").await;
    }
    let mut counts = HashMap::new();
    for f in instances {
        for m in f.delivered() {
            *counts
                .entry(m["messageId"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test]
async fn two_instances_accept_each_message_id_once() {
    let redis = RedisServer::start();
    let a = Fanout::start_with(shared(&redis, "fail_open"));
    let b = Fanout::start_with(shared(&redis, "fail_open"));
    let sent = ids("both", 50);
    // The same batch to both instances, five times each, all at once.
    let mut requests = Vec::new();
    for _ in 0..5 {
        for f in [&a, &b] {
            let request = f.post("/v1/batch").json(&batch(&sent));
            requests.push(tokio::spawn(async move {
                assert_success(request.send().await.unwrap()).await
            }));
        }
    }
    for r in requests {
        r.await.unwrap();
    }
    let counts = delivered_counts(&[&a, &b], 50).await;
    assert_eq!(counts.len(), 50);
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    // Later retries to either instance are dropped too.
    for f in [&a, &b] {
        send(f, &batch(&sent)).await;
    }
    let counts = delivered_counts(&[&a, &b], 50).await;
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
}

#[tokio::test]
async fn redis_down_with_fail_open_accepts_and_recovers() {
    let mut redis = RedisServer::start();
    let a = Fanout::start_with(shared(&redis, "fail_open"));
    let b = Fanout::start_with(shared(&redis, "fail_open"));
    send(&a, &batch(&ids("before", 3))).await;

    redis.stop();
    // Accepted without Redis; retries to the same instance are still caught locally.
    send(&a, &batch(&ids("down", 3))).await;
    send(&a, &batch(&ids("down", 3))).await;
    // Keys A committed before the outage are known to A without asking Redis.
    send(&a, &batch(&ids("before", 3))).await;
    let counts = delivered_counts(&[&a], 6).await;
    assert_eq!(counts.len(), 6);
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");

    redis.restart();
    // Shared again by itself. The first requests after the restart may still find the old
    // connection broken (and fall back to local dedupe); probe until one is shared.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for round in 0.. {
        let probe = ids(&format!("probe{round}"), 1);
        send(&a, &batch(&probe)).await;
        send(&b, &batch(&probe)).await;
        let delivered = a.delivered().len() + b.delivered().len();
        let counts = delivered_counts(&[&a, &b], delivered).await;
        if counts[&probe[0]] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dedupe did not recover: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // From then on, what A accepts B drops.
    let after = ids("after", 4);
    let before = a.delivered().len() + b.delivered().len();
    send(&a, &batch(&after)).await;
    send(&b, &batch(&after)).await;
    let counts = delivered_counts(&[&a, &b], before + 4).await;
    assert!(
        after.iter().all(|id| counts.get(id) == Some(&1)),
        "{counts:?}"
    );
}

#[tokio::test]
async fn redis_down_with_fail_closed_refuses_with_retry_after() {
    let mut redis = RedisServer::start();
    let a = Fanout::start_with(shared(&redis, "fail_closed"));
    send(&a, &batch(&ids("up", 2))).await;
    redis.stop();
    let r = a
        .post("/v1/batch")
        .json(&batch(&ids("down", 2)))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (status, err) = status_json(r).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{err}"
    );
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = a
            .post("/v1/batch")
            .json(&batch(&ids("down", 2)))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            std::time::Instant::now() < deadline,
            "fail_closed did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = delivered_counts(&[&a], 4).await;
    assert_eq!(
        counts.len(),
        4,
        "the refused batch was stored only once it was accepted: {counts:?}"
    );
    assert!(counts.values().all(|&c| c == 1));
}
