//! Identity stitching end to end: a browser session's anonymous calls, an identify with an
//! email, then more anonymous-only calls; the later ones reach the Klaviyo receiver
//! (`tests/common/klaviyo.rs`, every body checked with Klaviyo's SDK models) under the
//! known profile. Across a restart (memory backend, its journal) and across two
//! instances sharing a real Redis.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::klaviyo::{Klaviyo, API_KEY, CURRENT, KEY_ENV};
use common::{assert_success, Fanout, RedisServer, Settings};
use serde_json::{json, Value};

const ANON: &str = "ajs-anon-7f3c";
const EMAIL: &str = "ada@example.com";

/// Fanout with the Klaviyo destination `kl` sending to `k`, and `identity` (raw TOML
/// lines) as its `[identity]` section.
fn settings(k: &Klaviyo, identity: &str) -> Settings {
    Settings::default()
        .section(&format!("[identity]\n{identity}\n"))
        .section(&format!(
            "[[destinations]]\nname = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\n\
             base_url = \"{}\"\nbatch = {{ max_events = 100, linger = \"100ms\" }}\n",
            k.base_url()
        ))
        .env(KEY_ENV, API_KEY)
}

async fn send(f: &Fanout, messages: &[Value]) {
    let body = json!({ "batch": messages });
    assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
}

/// What analytics-next sends for a page view or a track before the user identifies:
/// an anonymousId, no traits.
fn anonymous(id: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "anonymousId": ANON, "event": event,
           "properties": {"path": "/pricing"},
           "context": {"library": {"name": "analytics.js", "version": "next-1.70.0"},
                       "page": {"path": "/pricing"}}})
}

fn identify() -> Value {
    json!({"type": "identify", "messageId": "identify-1", "anonymousId": ANON,
           "userId": "user-42", "traits": {"email": EMAIL, "first_name": "Ada"}})
}

/// Waits for the unique_ids and returns the profile each event was sent for.
async fn profiles_of(k: &Klaviyo, ids: &[&str]) -> Vec<(String, Value)> {
    let wanted: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let missing = k
        .wait_for_unique_ids(&wanted, Duration::from_secs(20))
        .await;
    assert!(missing.is_empty(), "missing {missing:?}\n{}", k.summary());
    k.events()
        .into_iter()
        .filter_map(|e| {
            let id = e.unique_id.clone()?;
            wanted.contains(&id).then_some((id, e.profile))
        })
        .collect()
}

fn assert_known(profile: &Value, id: &str) {
    assert_eq!(profile["email"], EMAIL, "{id}: {profile:#}");
    assert_eq!(profile["external_id"], "user-42", "{id}: {profile:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_events_after_an_identify_reach_the_known_profile_and_a_restart_keeps_it() {
    let k = Klaviyo::start(CURRENT).await;
    let mut f = Fanout::start_with(settings(&k, ""));
    // The session before the user says who they are.
    send(
        &f,
        &[
            anonymous("before-1", "Viewed Pricing"),
            anonymous("before-2", "Clicked Plan"),
        ],
    )
    .await;
    for (id, profile) in profiles_of(&k, &["before-1", "before-2"]).await {
        assert_eq!(
            profile,
            json!({"anonymous_id": ANON}),
            "{id}: nothing known yet"
        );
    }
    // The identify and the tracks after it in one request: a request's identifies are
    // learnt before it is stored, so its tracks are filled too.
    send(&f, &[identify(), anonymous("after-1", "Started Trial")]).await;
    send(&f, &[anonymous("after-2", "Viewed Docs")]).await;
    for (id, profile) in profiles_of(&k, &["after-1", "after-2"]).await {
        assert_known(&profile, &id);
    }
    f.wait_settled("kl").await;
    // The file destination (enrich_identity off by default) gets the messages as stored.
    let stored = f.wait_delivered(5).await;
    let after = stored.iter().find(|m| m["messageId"] == "after-1").unwrap();
    assert!(after.get("userId").is_none(), "{after:#}");

    f.terminate();
    f.restart();
    send(&f, &[anonymous("restarted-1", "Upgraded")]).await;
    for (id, profile) in profiles_of(&k, &["restarted-1"]).await {
        assert_known(&profile, &id);
    }
    f.wait_settled("kl").await;
    k.assert_valid().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identify_taken_by_one_instance_fills_the_events_another_takes_through_redis() {
    let redis = RedisServer::start();
    let k = Klaviyo::start(CURRENT).await;
    let identity = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nttl = \"1h\"",
        redis.url()
    );
    let a = Fanout::start_with(settings(&k, &identity));
    let b = Fanout::start_with(settings(&k, &identity));
    send(&a, &[identify()]).await;
    send(&b, &[anonymous("on-b-1", "Started Trial")]).await;
    for (id, profile) in profiles_of(&k, &["on-b-1"]).await {
        assert_known(&profile, &id);
    }
    a.wait_settled("kl").await;
    b.wait_settled("kl").await;
    k.assert_valid().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_identity_false_sends_anonymous_events_as_they_came() {
    let k = Klaviyo::start(CURRENT).await;
    let mut settings = settings(&k, "");
    settings.sections = settings.sections.replace(
        "kind = \"klaviyo\"\n",
        "kind = \"klaviyo\"\nenrich_identity = false\n",
    );
    let f = Fanout::start_with(settings);
    send(&f, &[identify()]).await;
    send(&f, &[anonymous("plain-1", "Started Trial")]).await;
    for (id, profile) in profiles_of(&k, &["plain-1"]).await {
        assert_eq!(profile, json!({"anonymous_id": ANON}), "{id}");
    }
    f.wait_settled("kl").await;
    k.assert_valid().await;
}
