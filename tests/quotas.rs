//! Limits that hold per source and for a whole cluster: a source's `rate_limit` (429 +
//! Retry-After past it, while other sources go on), the official Node library getting
//! everything through a quota by its retries, and on the shared log a quota and a
//! destination's `rate_limit` held by several instances together.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::clients::run_node;
use common::nats::NatsCluster;
use common::receiver::Receiver;
use common::{basic, client, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

const OTHER_KEY: &str = "wk_other";

/// `n` track messages of one user, ids `<prefix>-<k>`.
fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|k| json!({"type": "track", "userId": format!("{prefix}-user"), "event": "E", "messageId": format!("{prefix}-{k}")}))
        .collect()
}

async fn post(f: &Fanout, key: &str, batch: &[Value]) -> reqwest::Response {
    client()
        .post(f.url("/v1/batch"))
        .header("authorization", basic(key))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .expect("request")
}

/// The `test` source limited to `quota`, and a source `other` without a limit.
fn with_quota(quota: &str) -> Settings {
    Settings::default()
        .source(&format!("rate_limit = {quota}"))
        .section(&format!(
            "[[sources]]\nname = \"other\"\nwrite_keys = [\"{OTHER_KEY}\"]\n"
        ))
}

#[tokio::test]
async fn a_source_at_its_quota_gets_429_while_another_keeps_200() {
    let f = Fanout::start_with(with_quota("{ events_per_second = 1, burst = 20 }"));
    assert_eq!(post(&f, WRITE_KEY, &events("a", 20)).await.status(), 200);
    let refused = post(&f, WRITE_KEY, &events("b", 20)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 20 events at 1 a second: about 20 s until the bucket holds them again.
    assert!(
        (15..=20).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("source `test`"),
        "{body}"
    );
    for round in 0..3 {
        let other = post(&f, OTHER_KEY, &events(&format!("o{round}"), 20)).await;
        assert_eq!(other.status(), 200, "the other source is not limited");
    }
    f.wait_metric(
        "fanout_source_throttled_total",
        &[("source", "test")],
        |n| n == 20.0,
    )
    .await;
    let delivered = f.wait_delivered(80).await;
    f.wait_settled("out").await;
    assert_eq!(f.delivered().len(), 80, "{delivered:?}");
}

#[tokio::test]
async fn the_node_library_behind_a_quota_delivers_everything() {
    // 70 events in batches of 15 against 20 a second: several batches are refused
    // and sent again after their Retry-After.
    let f = Fanout::start_with(with_quota("{ events_per_second = 20, burst = 20 }"));
    run_node(&f, &["--count", "10", "--close-timeout", "60000"]).await;
    let throttled = f
        .metric("fanout_source_throttled_total", &[("source", "test")])
        .await
        .unwrap_or(0.0);
    assert!(throttled > 0.0, "the library never met the quota");
    f.wait_delivered(70).await;
    f.wait_settled("out").await;
    let ids: HashSet<String> = f
        .delivered()
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 70, "every message once");
    assert_eq!(f.delivered().len(), 70);
}

/// An instance on `nats` (its `hook` webhook posting to `receiver`, at `rate_limit`),
/// saying which instance it is in a header.
fn instance_settings(nats: &NatsCluster, receiver: &Receiver, name: &str) -> Settings {
    Settings::default()
        .source("rate_limit = { events_per_second = 1, burst = 20 }")
        .section(&nats.queue_section("ack_wait = \"60s\"\npartitions = 32"))
        .section(&format!(
            "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
             headers = {{ \"X-Instance\" = \"{name}\" }}\nsources = [\"other\"]\n\
             batch = {{ max_events = 10, linger = \"5ms\" }}\n\
             rate_limit = {{ rate = 200, burst = 10 }}\n",
            receiver.url("/hook")
        ))
        .section(&format!(
            "[[sources]]\nname = \"other\"\nwrite_keys = [\"{OTHER_KEY}\"]\n"
        ))
}

/// Three instances started at once, so that the partitions land on several of them.
fn three_instances(nats: &NatsCluster, receiver: &Receiver) -> Vec<Fanout> {
    std::thread::scope(|scope| {
        let started: Vec<_> = ["a", "b", "c"]
            .map(|name| {
                let settings = instance_settings(nats, receiver, name);
                scope.spawn(move || Fanout::start_with(settings))
            })
            .into_iter()
            .collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_for_the_whole_cluster() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let instances = three_instances(&nats, &receiver);

    // The quota of `test`: what one instance accepted, the next refuses.
    assert_eq!(
        post(&instances[0], WRITE_KEY, &events("q", 20))
            .await
            .status(),
        200
    );
    let refused = post(&instances[1], WRITE_KEY, &events("r", 20)).await;
    assert_eq!(refused.status(), 429, "the quota is the cluster's");
    assert!(refused.headers().contains_key("retry-after"));

    // `hook` at 200 a second, fed through all three: never more than 220 in a second.
    let users = 100;
    let all: Vec<Value> = (0..3000)
        .map(|k| json!({"type": "track", "userId": format!("u{}", k % users), "event": "E", "messageId": format!("m{k}")}))
        .collect();
    for (i, chunk) in all.chunks(100).enumerate() {
        let through = &instances[i % 3];
        assert_eq!(post(through, OTHER_KEY, chunk).await.status(), 200);
    }
    let wanted: HashSet<String> = (0..all.len()).map(|k| format!("m{k}")).collect();
    let missing = receiver
        .wait_for_ids(&wanted, Duration::from_secs(90))
        .await;
    assert!(missing.is_empty(), "{} never arrived", missing.len());

    let requests: Vec<_> = receiver.requests().into_iter().filter(|r| r.ok()).collect();
    let start = requests.iter().map(|r| r.at).min().unwrap();
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for r in &requests {
        let n = r.messages().len();
        *per_second
            .entry(r.at.duration_since(start).as_secs())
            .or_default() += n;
        let instance = r.header("x-instance").unwrap_or("?").to_string();
        *per_instance.entry(instance).or_default() += n;
    }
    let took = requests.iter().map(|r| r.at).max().unwrap() - start;
    eprintln!("per second {per_second:?}; per instance {per_instance:?}; {took:?} in all");
    let most = per_second.values().max().copied().unwrap_or(0);
    assert!(most <= 220, "{most} in one second: {per_second:?}");
}
