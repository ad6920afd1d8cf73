//! `[[destinations.actions]]` of the `klaviyo` destination against the Klaviyo-shaped
//! receiver (`tests/common/klaviyo.rs`): each `do` reaches its bulk endpoint with the
//! batch's profiles merged, cut at each endpoint's profiles per call, consent older than
//! a day sent as a historical import, a profile Klaviyo refuses dead-lettered with its
//! detail, and `fanout check` naming the key of a bad action. Every test ends by checking
//! every request body against Klaviyo's SDK models.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::klaviyo::{
    action_endpoint, action_rows, Klaviyo, API_KEY, CURRENT, KEY_ENV, LIST_ADD, LIST_REMOVE,
    PROFILE_IMPORT, SUBSCRIBE, SUPPRESS, UNSUBSCRIBE, UNSUPPRESS,
};
use common::receiver::ReceivedRequest;
use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

/// A fanout whose Klaviyo destination `kl` sends to `k`, with `actions` (raw TOML of
/// `[[destinations.actions]]` tables) and one batch for everything sent at once.
fn start(k: &Klaviyo, actions: &str) -> Fanout {
    let section = format!(
        "[[destinations]]\nname = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\n\
         base_url = \"{}\"\nretry = {{ initial_backoff = \"100ms\", max_backoff = \"1s\" }}\n\
         batch = {{ max_events = 1000, linger = \"500ms\" }}\n{actions}",
        k.base_url()
    );
    Fanout::start_with(Settings::default().section(&section).env(KEY_ENV, API_KEY))
}

fn action(event: &str, rest: &str) -> String {
    format!("[[destinations.actions]]\nwhen = {{ events = [\"{event}\"] }}\n{rest}\n")
}

async fn send(f: &Fanout, messages: &[Value]) {
    let body = json!({ "batch": messages });
    assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
}

/// A track of `event` by `user`, whose context traits carry an email and a phone.
fn track(id: &str, user: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": event,
        "context": {"traits": {"email": format!("{user}@example.com"), "phone": "+1 555 555 0100"}}})
}

/// The requests to the consent or list bucket `endpoint` answered with a 2xx.
fn calls(k: &Klaviyo, endpoint: &str) -> Vec<ReceivedRequest> {
    k.requests()
        .into_iter()
        .filter(|r| {
            r.ok() && action_endpoint(&r.method, r.path.trim_end_matches('/')) == Some(endpoint)
        })
        .collect()
}

fn emails(r: &ReceivedRequest) -> Vec<String> {
    action_rows(r)
        .iter()
        .map(|row| {
            row["attributes"]["email"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn dead_ids(rows: &[Value]) -> HashSet<String> {
    rows.iter()
        .map(|r| {
            r["message"]["messageId"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_do_reaches_its_endpoint_merged_across_the_batch_besides_the_events() {
    let k = Klaviyo::start(CURRENT).await;
    let actions = [
        action(
            "Subscribed",
            "do = \"subscribe\"\nchannels = [\"email\", \"sms\"]\nlist_id = \"L1\"",
        ),
        action(
            "Unsubscribed",
            "do = \"unsubscribe\"\nchannels = [\"email\", \"sms\"]",
        ),
        action("Bounced", "do = \"suppress\""),
        action("Restored", "do = \"unsuppress\""),
        action("Joined", "do = \"add_to_list\"\nlist_id = \"L2\""),
        action("Left", "do = \"remove_from_list\"\nlist_id = \"L2\""),
    ]
    .concat();
    let f = start(&k, &actions);
    let events = [
        "Subscribed",
        "Unsubscribed",
        "Bounced",
        "Restored",
        "Joined",
        "Left",
    ];
    // Two users per event, and a second message of the first user: three messages, two
    // profiles per call.
    let mut messages = Vec::new();
    for event in events {
        for (n, user) in ["ann", "bob", "ann"].iter().enumerate() {
            messages.push(track(&format!("{event}-{n}"), user, event));
        }
    }
    send(&f, &messages).await;
    let ids: HashSet<String> = messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect();
    // The message's own events still go: actions come in addition.
    let missing = k.wait_for_unique_ids(&ids, Duration::from_secs(20)).await;
    assert!(missing.is_empty(), "{missing:?}\n{}", k.summary());
    f.wait_settled("kl").await;
    for endpoint in [
        SUBSCRIBE,
        UNSUBSCRIBE,
        SUPPRESS,
        UNSUPPRESS,
        LIST_ADD,
        LIST_REMOVE,
    ] {
        let made = calls(&k, endpoint);
        assert_eq!(made.len(), 1, "{endpoint}:\n{}", k.summary());
        assert_eq!(
            action_rows(&made[0]).len(),
            2,
            "{endpoint}: {:?}",
            made[0].json()
        );
    }
    let subscribe = calls(&k, SUBSCRIBE)[0].json().unwrap();
    assert_eq!(
        subscribe["data"]["relationships"]["list"]["data"]["id"],
        "L1"
    );
    let ann = &subscribe["data"]["attributes"]["profiles"]["data"][0]["attributes"];
    assert_eq!(ann["email"], "ann@example.com");
    assert_eq!(ann["phone_number"], "+15555550100");
    assert_eq!(
        ann["subscriptions"]["email"]["marketing"]["consent"],
        "SUBSCRIBED"
    );
    assert_eq!(
        ann["subscriptions"]["sms"]["marketing"]["consent"],
        "SUBSCRIBED"
    );
    assert!(subscribe["data"]["attributes"]
        .get("historical_import")
        .is_none());
    let unsubscribe = calls(&k, UNSUBSCRIBE)[0].json().unwrap();
    assert!(unsubscribe["data"].get("relationships").is_none());
    assert_eq!(
        unsubscribe["data"]["attributes"]["profiles"]["data"][1]["attributes"]["subscriptions"]
            ["sms"]["marketing"]["consent"],
        "UNSUBSCRIBED"
    );
    assert_eq!(
        emails(&calls(&k, SUPPRESS)[0]),
        ["ann@example.com", "bob@example.com"]
    );
    // List calls name profiles by the id a profile import of their identifiers gave.
    for endpoint in [LIST_ADD, LIST_REMOVE] {
        let call = &calls(&k, endpoint)[0];
        assert_eq!(call.path, "/api/lists/L2/relationships/profiles");
        assert_eq!(
            call.json().unwrap(),
            json!({"data": [{"type": "profile", "id": "01P-ann"}, {"type": "profile", "id": "01P-bob"}]})
        );
    }
    assert!(f.dead_letters("kl").await.is_empty());
    k.assert_valid().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribes_go_100_profiles_per_call_subscribes_1000() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[
            action("Subscribed", "do = \"subscribe\""),
            action("Unsubscribed", "do = \"unsubscribe\""),
        ]
        .concat(),
    );
    let mut messages = Vec::new();
    for u in 0..250 {
        messages.push(track(&format!("s-{u}"), &format!("user{u}"), "Subscribed"));
        messages.push(track(
            &format!("u-{u}"),
            &format!("user{u}"),
            "Unsubscribed",
        ));
    }
    send(&f, &messages).await;
    k.wait("every profile in a call", Duration::from_secs(30), |k| {
        let count = |e| {
            calls(k, e)
                .iter()
                .map(|r| action_rows(r).len())
                .sum::<usize>()
        };
        count(SUBSCRIBE) == 250 && count(UNSUBSCRIBE) == 250
    })
    .await;
    f.wait_settled("kl").await;
    let sizes = |e| {
        calls(&k, e)
            .iter()
            .map(|r| action_rows(r).len())
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(SUBSCRIBE), [250]);
    assert_eq!(sizes(UNSUBSCRIBE), [100, 100, 50]);
    k.assert_valid().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_older_than_a_day_is_sent_as_a_historical_import() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &action(
            "Subscribed",
            "do = \"subscribe\"\nconsented_at = \"properties.consented_at\"",
        ),
    );
    let now = chrono::Utc::now();
    let at = |ago: chrono::Duration| (now - ago).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut old = track("old", "old", "Subscribed");
    old["properties"] = json!({"consented_at": at(chrono::Duration::days(3))});
    let mut recent = track("recent", "recent", "Subscribed");
    recent["properties"] = json!({"consented_at": at(chrono::Duration::hours(1))});
    send(&f, &[old, recent]).await;
    k.wait("two subscribe calls", Duration::from_secs(20), |k| {
        calls(k, SUBSCRIBE).len() == 2
    })
    .await;
    f.wait_settled("kl").await;
    let bodies: Vec<Value> = calls(&k, SUBSCRIBE)
        .iter()
        .map(|r| r.json().unwrap())
        .collect();
    let of = |email: &str| {
        bodies
            .iter()
            .find(|b| b.to_string().contains(email))
            .unwrap_or_else(|| panic!("no call for {email}: {bodies:?}"))
    };
    let historical = of("old@example.com");
    assert_eq!(historical["data"]["attributes"]["historical_import"], true);
    let marketing = &historical["data"]["attributes"]["profiles"]["data"][0]["attributes"]
        ["subscriptions"]["email"]["marketing"];
    let sent =
        chrono::DateTime::parse_from_rfc3339(marketing["consented_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent.timestamp(),
        (now - chrono::Duration::days(3)).timestamp()
    );
    let current = of("recent@example.com");
    assert!(current["data"]["attributes"]
        .get("historical_import")
        .is_none());
    assert!(!current.to_string().contains("consented_at"), "{current}");
    k.assert_valid().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_klaviyo_does_not_know_dead_letters_its_messages_at_once() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[
            action("Joined", "do = \"add_to_list\"\nlist_id = \"Missing1\""),
            action("Subscribed", "do = \"subscribe\""),
        ]
        .concat(),
    );
    send(
        &f,
        &[
            track("join", "joiner", "Joined"),
            track("sub", "subscriber", "Subscribed"),
        ],
    )
    .await;
    let rows = f.wait_dead_letters("kl", 1, Duration::from_secs(20)).await;
    f.wait_settled("kl").await;
    assert_eq!(
        dead_ids(&rows),
        ["join".to_string()].into_iter().collect(),
        "{rows:#?}"
    );
    assert_eq!(rows[0]["status"], 404, "{rows:#?}");
    assert!(rows[0]["response"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    // One call, not retried: a wrong list_id is not mended by waiting.
    let list_calls = k
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/lists/Missing1/"))
        .count();
    assert_eq!(list_calls, 1, "{}", k.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_profile_dead_letters_only_its_message_with_klaviyos_detail() {
    let k = Klaviyo::start(CURRENT).await;
    let f = start(
        &k,
        &[
            action("Subscribed", "do = \"subscribe\""),
            action("Joined", "do = \"add_to_list\"\nlist_id = \"L9\""),
        ]
        .concat(),
    );
    let messages = vec![
        track("ok-1", "ok1", "Subscribed"),
        track("bad", "refuse-me", "Subscribed"),
        track("ok-2", "ok2", "Subscribed"),
        // No email anywhere: refused before any request.
        json!({"type": "track", "messageId": "no-email", "userId": "u", "event": "Subscribed"}),
        track("join-bad", "refuse-too", "Joined"),
        track("join-ok", "joiner", "Joined"),
    ];
    send(&f, &messages).await;
    let rows = f.wait_dead_letters("kl", 3, Duration::from_secs(20)).await;
    f.wait_settled("kl").await;
    assert_eq!(
        dead_ids(&rows),
        ["bad", "no-email", "join-bad"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "{rows:#?}"
    );
    let text = |id: &str| {
        rows.iter()
            .find(|r| r["message"]["messageId"] == id)
            .unwrap()
            .to_string()
    };
    assert!(
        text("bad").contains("The email address is not valid."),
        "{}",
        text("bad")
    );
    assert!(text("join-bad").contains("The email address is not valid."));
    assert!(
        text("no-email").contains("no_contact_for_action: actions[0] (subscribe) needs an email"),
        "{}",
        text("no-email")
    );
    // The refused call, then the same without the refused row.
    let all = k.requests();
    let subscribes: Vec<&ReceivedRequest> = all.iter().filter(|r| r.path == SUBSCRIBE).collect();
    assert_eq!(subscribes.len(), 2, "{}", k.summary());
    assert_eq!(subscribes[0].status, 400);
    assert_eq!(
        emails(subscribes[1]),
        ["ok1@example.com", "ok2@example.com"]
    );
    assert!(subscribes[1].ok());
    let joined = calls(&k, LIST_ADD);
    assert_eq!(joined.len(), 1);
    assert_eq!(
        joined[0].json().unwrap()["data"],
        json!([{"type": "profile", "id": "01P-joiner"}])
    );
    assert!(k
        .requests()
        .iter()
        .any(|r| r.path == PROFILE_IMPORT && r.status == 400));
    k.assert_valid().await;
}

/// `fanout check` of a config with one Klaviyo destination and `actions`.
fn check(actions: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"kl\"\n\
         kind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\n{actions}"
    );
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&path)
        .env(KEY_ENV, API_KEY)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn fanout_check_names_the_key_of_a_bad_action() {
    let (ok, stderr) = check(&action(
        "A",
        "do = \"subscribe\"\nchannels = [\"email\", \"sms\"]",
    ));
    assert!(ok, "{stderr}");
    for (actions, key, words) in [
        (
            action("A", "do = \"subscrib\""),
            "destinations[0].actions[0].do",
            "unknown variant",
        ),
        (
            action("A", "do = \"add_to_list\""),
            "destinations[0].actions[0].list_id",
            "needs a list_id",
        ),
        (
            action("A", "do = \"subscribe\"\nchannels = [\"fax\"]"),
            "destinations[0].actions[0].channels[0]",
            "unknown variant",
        ),
    ] {
        let (ok, stderr) = check(&actions);
        assert!(!ok, "should fail: {actions}");
        assert!(
            stderr.contains(key) && stderr.contains(words),
            "want {key}: {stderr}"
        );
    }
}
