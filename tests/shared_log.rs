//! `[queue] backend = "nats"`: several fanout processes share one log on real NATS
//! JetStream servers (one node, or three in a cluster), deliver through a real HTTP
//! receiver, and are killed, stopped and reloaded mid-traffic. What must hold: every
//! message answered 200 is delivered; each user's messages arrive in order, a message
//! repeated only when the instance that held it died; dead letters are shared.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::receiver::{ReceivedRequest, Receiver, Reply};
use common::{basic, client, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

/// A short ack wait, so a dead instance's messages move to another within seconds.
const QUEUE: &str = "ack_wait = \"2s\"\npartitions = 4";
const ADMIN_TOKEN: &str = "shared-log-admin-token";

/// An instance on `nats` whose `hook` destination posts to `receiver`, saying which
/// instance it is in a header.
fn instance(nats: &NatsCluster, receiver: &Receiver, name: &str) -> Fanout {
    Fanout::start_with(settings(nats, receiver, name))
}

fn settings(nats: &NatsCluster, receiver: &Receiver, name: &str) -> Settings {
    Settings::default()
        .section(&nats.queue_section(QUEUE))
        .section(&hook(receiver, name))
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", ADMIN_TOKEN)
}

fn hook(receiver: &Receiver, instance: &str) -> String {
    format!(
        "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         headers = {{ \"X-Instance\" = \"{instance}\" }}\n\
         batch = {{ max_events = 20, linger = \"10ms\" }}\n\
         retry = {{ initial_backoff = \"50ms\", max_backoff = \"500ms\" }}\n",
        receiver.url("/hook")
    )
}

/// `users` users with `each` messages apiece, interleaved: user `u<k>`'s message `n`
/// has messageId `u<k>-<n>` and `properties.n = n`.
fn plan(users: usize, each: usize) -> Vec<Value> {
    let mut all = Vec::new();
    for n in 0..each {
        for k in 0..users {
            all.push(json!({
                "type": "track",
                "userId": format!("u{k}"),
                "event": "Step",
                "messageId": format!("u{k}-{n}"),
                "properties": {"n": n},
            }));
        }
    }
    all
}

async fn post_batch(f: &Fanout, batch: &[Value]) -> reqwest::Response {
    client()
        .post(f.url("/v1/batch"))
        .header("authorization", basic(WRITE_KEY))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .expect("request")
}

/// Sends `batch`; returns the status.
async fn send(f: &Fanout, batch: &[Value]) -> u16 {
    post_batch(f, batch).await.status().as_u16()
}

/// Sends `batch` until it is answered 200, as the Segment libraries retry a 503.
async fn send_until_stored(f: &Fanout, batch: &[Value], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let response = post_batch(f, batch).await;
        match response.status().as_u16() {
            200 => return,
            503 => {
                assert!(
                    response.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                assert!(Instant::now() < deadline, "still 503 after {within:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!(
                "unexpected status {other}: {}",
                response.text().await.unwrap()
            ),
        }
    }
}

fn message_ids(messages: &[Value]) -> HashSet<String> {
    messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect()
}

/// Each user's messages in arrival order (as `properties.n`), over every 2xx request.
fn by_user(requests: &[ReceivedRequest]) -> BTreeMap<String, Vec<u64>> {
    let mut users: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for request in requests.iter().filter(|r| r.ok()) {
        for m in request.messages() {
            let user = m["userId"].as_str().unwrap().to_string();
            users
                .entry(user)
                .or_default()
                .push(m["properties"]["n"].as_u64().unwrap());
        }
    }
    users
}

/// Per user, the messages arrive in order: ascending runs, where a new run (a step back)
/// can only start when a delivering instance died (`failovers` times at most), and
/// only goes back to messages already delivered (a repeat, never a skip ahead).
fn assert_in_order(requests: &[ReceivedRequest], failovers: usize) {
    for (user, ns) in by_user(requests) {
        let mut runs = 1;
        let mut seen = HashSet::new();
        for pair in ns.windows(2) {
            if pair[1] <= pair[0] {
                runs += 1;
                assert!(
                    seen.contains(&pair[1]) || pair[1] == pair[0],
                    "{user}: went back to {} that was never delivered: {ns:?}",
                    pair[1]
                );
            } else {
                assert!(
                    pair[1] == pair[0] + 1 || seen.contains(&(pair[0] + 1)),
                    "{user}: skipped from {} to {}: {ns:?}",
                    pair[0],
                    pair[1]
                );
            }
            seen.insert(pair[0]);
        }
        assert!(
            runs <= 1 + failovers,
            "{user}: {runs} ascending runs for {failovers} fail-overs: {ns:?}"
        );
    }
}

/// Waits until every message of `sent` arrived at the receiver in a 2xx request.
async fn assert_all_delivered(receiver: &Receiver, sent: &[Value], within: Duration) {
    let missing = receiver.wait_for_ids(&message_ids(sent), within).await;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages never delivered, e.g. {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(10)]
    );
}

fn instance_of(request: &ReceivedRequest) -> String {
    request.header("x-instance").unwrap_or("?").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_messages_are_delivered_by_the_other_in_user_order() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(40));
    // `a` starts first and so holds the partitions; `b` waits on standby.
    let mut a = instance(&nats, &receiver, "a");
    let b = instance(&nats, &receiver, "b");
    let all = plan(12, 40);
    let (first, second) = all.split_at(all.len() / 2);
    for (i, chunk) in first.chunks(12).enumerate() {
        let through = if i % 2 == 0 { &a } else { &b };
        assert_eq!(send(through, chunk).await, 200);
    }
    receiver
        .wait_for_messages(60, Duration::from_secs(20))
        .await;
    a.kill9();
    let killed_at = Instant::now();
    for chunk in second.chunks(12) {
        assert_eq!(send(&b, chunk).await, 200);
    }
    assert_all_delivered(&receiver, &all, Duration::from_secs(60)).await;

    let requests: Vec<ReceivedRequest> =
        receiver.requests().into_iter().filter(|r| r.ok()).collect();
    assert!(
        requests
            .iter()
            .any(|r| instance_of(r) == "a" && r.at < killed_at),
        "`a` delivered before it was killed"
    );
    let b_took_over = requests
        .iter()
        .filter(|r| instance_of(r) == "b")
        .flat_map(|r| r.messages())
        .any(|m| first.iter().any(|f| f["messageId"] == m["messageId"]));
    assert!(
        b_took_over,
        "`b` delivered messages accepted before the kill"
    );
    assert_in_order(&requests, 1);
    // A repeat is a message the dead instance had sent (and not yet acknowledged).
    let mut seen = HashSet::new();
    let before_kill: HashSet<String> = requests
        .iter()
        .filter(|r| r.at < killed_at)
        .flat_map(|r| r.message_ids())
        .collect();
    for id in requests.iter().flat_map(|r| r.message_ids()) {
        if !seen.insert(id.clone()) {
            assert!(
                before_kill.contains(&id),
                "{id} delivered twice, but the first time was not before the kill"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_hands_over_at_once_without_repeats() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(30));
    let mut a = instance(&nats, &receiver, "a");
    let b = instance(&nats, &receiver, "b");
    let all = plan(8, 40);
    // One message a request, so each pack holds one: a pack partly delivered at the stop
    // is given back whole, and its delivered messages would be sent again (docs/several-instances.md).
    for message in &all {
        assert_eq!(send(&a, std::slice::from_ref(message)).await, 200);
    }
    receiver
        .wait_for_messages(40, Duration::from_secs(20))
        .await;
    let stopped_at = Instant::now();
    assert!(a.terminate().success());
    // Far less than the pin timeout (ack wait + 9 s) a crash would take.
    assert_all_delivered(&receiver, &all, Duration::from_secs(8)).await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(9),
        "the handover waited for the pin to time out"
    );
    let requests: Vec<ReceivedRequest> =
        receiver.requests().into_iter().filter(|r| r.ok()).collect();
    assert!(requests.iter().any(|r| instance_of(r) == "b"));
    assert_in_order(&requests, 0);
    let ids: Vec<String> = requests.iter().flat_map(|r| r.message_ids()).collect();
    assert_eq!(
        ids.len(),
        all.len(),
        "nothing sent twice across a clean stop"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_node_of_three_loses_no_acknowledged_message() {
    let mut nats = NatsCluster::start(3);
    let receiver = Receiver::start().await;
    let f = Fanout::start_with(
        Settings::default()
            .section(&nats.queue_section(&format!("{QUEUE}\nreplicas = 3")))
            .section(&hook(&receiver, "a")),
    );
    let all = plan(10, 60);
    let (first, second) = all.split_at(all.len() / 3);
    for chunk in first.chunks(10) {
        send_until_stored(&f, chunk, Duration::from_secs(30)).await;
    }
    // The node leading the stream: the hardest one to lose.
    let leader = nats
        .stream_leader("fanout")
        .expect("the stream has a leader");
    nats.nodes[leader].kill();
    for chunk in second.chunks(10) {
        send_until_stored(&f, chunk, Duration::from_secs(30)).await;
    }
    assert_all_delivered(&receiver, &all, Duration::from_secs(60)).await;
    let requests: Vec<ReceivedRequest> =
        receiver.requests().into_iter().filter(|r| r.ok()).collect();
    // Acknowledgements the lost leader had not replicated are lost with it: the new
    // leader delivers those messages again, possibly in several waves (docs/several-instances.md). Every
    // step back must still be a repeat of something delivered, never a skip ahead.
    assert_in_order(&requests, usize::MAX - 1);
    let ready = client().get(f.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "two nodes of three are a quorum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_means_503_and_recovery_needs_no_restart() {
    let mut nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let f = instance(&nats, &receiver, "a");
    let before = plan(4, 10);
    assert_eq!(send(&f, &before).await, 200);
    // Delivery is held back, so some is still owed when the server goes.
    receiver.stop().await;
    nats.nodes[0].kill();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probe = 0;
    let down = loop {
        probe += 1;
        let fresh = json!({"type": "track", "userId": "p", "event": "Probe", "messageId": format!("probe-{probe}")});
        let response = post_batch(&f, &[fresh]).await;
        if response.status() == 503 {
            break response;
        }
        assert!(Instant::now() < deadline, "still accepting with NATS down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(down.headers()["retry-after"], "1");
    let body: Value = down.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let ready = client().get(f.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    nats.nodes[0].restart();
    nats.wait_ready();
    receiver.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client().get(f.url("/ready")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "/ready did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: Vec<Value> = plan(4, 10)
        .into_iter()
        .map(|mut m| {
            let id = format!("after-{}", m["messageId"].as_str().unwrap());
            m["messageId"] = json!(id);
            m
        })
        .collect();
    send_until_stored(&f, &after, Duration::from_secs(20)).await;
    let mut all = before;
    all.extend(after);
    assert_all_delivered(&receiver, &all, Duration::from_secs(30)).await;
}

async fn admin_get(f: &Fanout, path: &str) -> Value {
    let response = client()
        .get(f.url(path))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_from_one_instance_are_replayed_from_the_other() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.respond_with(|r: &ReceivedRequest| {
        r.contains_message("poison")
            .then(|| Reply::json(400, r#"{"error":"no"}"#))
    });
    let a = instance(&nats, &receiver, "a");
    let b = instance(&nats, &receiver, "b");
    let poison = json!({"type": "track", "userId": "p", "event": "Bad", "messageId": "poison"});
    let good = plan(3, 3);
    let mut batch = good.clone();
    batch.push(poison);
    assert_eq!(send(&a, &batch).await, 200);
    assert_all_delivered(&receiver, &good, Duration::from_secs(20)).await;

    // Stored once, seen from both instances and both interfaces.
    let listed = b
        .wait_dead_letters("hook", 1, Duration::from_secs(20))
        .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["message"]["messageId"], "poison");
    assert_eq!(listed[0]["reason"], "rejected");
    assert_eq!(listed[0]["attempts"], 1);
    let via_admin = admin_get(&a, "/admin/dead-letters?destination=hook").await;
    assert_eq!(via_admin["dead_letters"][0]["id"], listed[0]["id"]);

    // Replayed while the destination still refuses it: it comes back, attempts added up.
    let replayed = b
        .cli(&["dead-letters", "replay", "--destination", "hook"])
        .await;
    assert!(replayed.contains("\"replayed\":1"), "{replayed}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let rows = a.dead_letters("hook").await;
        if rows.first().is_some_and(|r| r["attempts"] == 2) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "not dead-lettered again: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0]["id"], listed[0]["id"], "stored anew");

    // Accepted now: a replay from the other instance delivers it, and the list empties.
    receiver.clear_responder();
    let response = client()
        .post(a.url("/admin/dead-letters/replay?destination=hook"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["replayed"], 1);
    let missing = receiver
        .wait_for_ids(
            &HashSet::from(["poison".to_string()]),
            Duration::from_secs(20),
        )
        .await;
    assert!(missing.is_empty(), "the replayed letter was not delivered");
    assert!(b.dead_letters("hook").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_purges_destinations_on_the_stream() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let f = instance(&nats, &receiver, "a");
    let path = f.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let second = format!(
        "\n[[destinations]]\nname = \"second\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        receiver.url("/second")
    );
    std::fs::write(&path, format!("{text}{second}")).unwrap();
    let (status, done) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changes"]["added"], json!(["second"]), "{done}");
    let messages = plan(2, 5);
    assert_eq!(send(&f, &messages).await, 200);
    let arrived = |path: &str| {
        receiver
            .requests()
            .iter()
            .filter(|r| r.ok() && r.path == path)
            .flat_map(|r| r.message_ids())
            .collect::<HashSet<String>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrived("/second").len() < messages.len() || arrived("/hook").len() < messages.len() {
        assert!(
            Instant::now() < deadline,
            "both destinations get everything"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Removed: its consumers stay (holding what it has not had) until purged.
    std::fs::write(&path, &text).unwrap();
    let (status, done) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changes"]["unpurged"], json!(["second"]), "{done}");
    let (status, done) = common::post_reload(&f, ADMIN_TOKEN, "?purge=true").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changes"]["purged"], json!(["second"]), "{done}");
    let consumers = nats.nodes[0]
        .monitor("/jsz?consumers=true")
        .expect("monitoring answers");
    let names: Vec<String> = consumers["account_details"][0]["stream_detail"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["consumer_detail"].as_array().cloned().unwrap_or_default())
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("hook_")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("second_")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_in_metrics_and_a_full_stream_answers_503() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.stop().await;
    let f = Fanout::start_with(
        settings(&nats, &receiver, "a").server("segment_bytes = 16384\nmax_queue_bytes = 65536"),
    );
    let mut accepted = 0;
    let mut refused = None;
    for chunk in plan(50, 40).chunks(20) {
        let response = post_batch(&f, chunk).await;
        if response.status() == 503 {
            refused = Some(response.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(response.status(), 200);
        accepted += chunk.len();
    }
    let refused = refused.expect("a 64 KiB stream fills up");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("full"), "{message}");
    assert!(accepted > 0);
    let ready = client().get(f.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "full: not ready");
    // The destination is down: what it has not had shows as lag on its consumers
    // (delivered to the instance and held there, retrying).
    f.wait_metric(
        "fanout_queue_consumer_ack_pending",
        &[("destination", "hook")],
        |held| held > 0.0,
    )
    .await;
    // Back up: the stream drains, and ingest recovers by itself.
    receiver.restart().await;
    for gauge in [
        "fanout_queue_consumer_ack_pending",
        "fanout_queue_consumer_pending",
    ] {
        f.wait_metric(gauge, &[("destination", "hook")], |n| n == 0.0)
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while client().get(f.url("/ready")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "/ready did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(send(&f, &plan(1, 1)).await, 200);
}

#[test]
fn an_unreachable_server_at_start_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let output = run_against_nats_at(port);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "fails fast");
}

/// Users spread over the partitions: with 4 partitions, a few dozen users use them all
/// (checked on the stream's subjects), and one request's messages for one partition are
/// one stream message (a pack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_spread_over_the_partitions() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.stop().await;
    let f = instance(&nats, &receiver, "a");
    assert_eq!(send(&f, &plan(40, 1)).await, 200);
    let jsz = nats.nodes[0]
        .monitor("/jsz?streams=true&config=true")
        .unwrap();
    let stream = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "fanout")
        .expect("the stream")
        .clone();
    assert_eq!(
        stream["state"]["messages"], 4,
        "one pack per partition: {stream}"
    );
    assert_eq!(
        stream["state"]["num_subjects"], 4,
        "every partition holds some of 40 users: {stream}"
    );
}

/// Waits until every consumer of `destination` on the stream, as nats-server reports them
/// now, has no message left to deliver (`num_pending`) or awaiting its ack
/// (`num_ack_pending`).
async fn wait_consumers_idle(nats: &NatsCluster, destination: &str) {
    let prefix = format!("{destination}_");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jsz = nats.nodes[0].monitor("/jsz?consumers=true");
        let consumers: Vec<Value> = jsz.as_ref().map_or_else(Vec::new, |jsz| {
            jsz["account_details"][0]["stream_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["consumer_detail"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(&prefix)))
                .collect()
        });
        let idle = |c: &Value| c["num_pending"] == 0 && c["num_ack_pending"] == 0;
        if !consumers.is_empty() && consumers.iter().all(idle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{destination}'s consumers never went idle: {consumers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn retained_messages_are_replayed_to_one_destination() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("archive.jsonl");
    let f = Fanout::start_in(
        tmp,
        settings(&nats, &receiver, "one")
            .server("retention = \"1h\"")
            .section(&format!(
                "[[destinations]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n",
                archive.display()
            )),
    );
    let batch = |ids: &[&str]| -> Vec<Value> {
        ids.iter()
            .map(|id| json!({"type": "track", "userId": "u1", "event": "E", "messageId": id}))
            .collect()
    };
    assert_eq!(send(&f, &batch(&["a1", "a2"])).await, 200);
    let t1 = common::next_second().await;
    assert_eq!(send(&f, &batch(&["b1", "b2"])).await, 200);
    receiver.wait_for_messages(4, Duration::from_secs(20)).await;
    let since = t1.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body) =
        common::post_replay(&f, ADMIN_TOKEN, &format!("destination=hook&since={since}")).await;
    assert_eq!((status, &body["messages"]), (200, &json!(2)), "{body}");
    // Repeats count: wait for six deliveries, not six distinct ids.
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.messages().len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = receiver.messages();
    assert_eq!(
        common::receiver::ids(&got),
        ["a1", "a2", "b1", "b2", "b1", "b2"]
    );
    common::wait_file_lines(&archive, 4).await;
    // The copies are on the stream (the replay answered once they were stored): when
    // the archive's consumers have nothing left to deliver or settle, it has all it gets.
    wait_consumers_idle(&nats, "archive").await;
    assert_eq!(
        common::file_lines(&archive).len(),
        4,
        "the other destination is untouched"
    );
}

#[tokio::test]
async fn without_retention_the_shared_log_refuses_a_replay_with_the_oldest_time() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let f = instance(&nats, &receiver, "one");
    let t0 = common::next_second().await;
    let batch = vec![json!({"type": "track", "userId": "u1", "event": "E", "messageId": "x1"})];
    assert_eq!(send(&f, &batch).await, 200);
    receiver.wait_for_messages(1, Duration::from_secs(20)).await;
    let since = t0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // The stream lets a message go once every consumer has acknowledged it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) =
            common::post_replay(&f, ADMIN_TOKEN, &format!("destination=hook&since={since}")).await;
        if status == 400 {
            assert_eq!(body["error"]["code"], "not_retained", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A server older than 2.11 (no priority groups) is refused at start with its version
/// named. No such server is installed here: a listener speaking just enough of the NATS
/// protocol (INFO, then PONG to each PING) says it is 2.9.25, as Debian's does.
#[test]
fn a_server_older_than_2_11_is_refused_with_its_version() {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let info = r#"INFO {"server_id":"old","server_name":"old","version":"2.9.25","go":"go1.19","host":"127.0.0.1","port":4222,"headers":true,"max_payload":1048576,"proto":1,"jetstream":true}"#;
            if stream.write_all(format!("{info}\r\n").as_bytes()).is_err() {
                continue;
            }
            let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("PING") && stream.write_all(b"PONG\r\n").is_err() {
                    break;
                }
            }
        }
    });
    let output = run_against_nats_at(port);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nats-server 2.9 found, fanout needs ≥ 2.11 (priority groups)"),
        "{stderr}"
    );
}

/// `plan(users, each)` with its messageIds prefixed, for a second round of the same users.
fn renamed(messages: Vec<Value>, prefix: &str) -> Vec<Value> {
    messages
        .into_iter()
        .map(|mut m| {
            let id = format!("{prefix}-{}", m["messageId"].as_str().unwrap());
            m["messageId"] = json!(id);
            m
        })
        .collect()
}

/// The sequence the `fanout` stream has reached, as its (single) node says.
fn last_sequence(nats: &NatsCluster) -> u64 {
    let jsz = nats.nodes[0].monitor("/jsz?streams=true").unwrap();
    jsz["account_details"][0]["stream_detail"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "fanout")
        .and_then(|s| s["state"]["last_seq"].as_u64())
        .unwrap_or_else(|| panic!("no stream `fanout`: {jsz}"))
}

/// A server whose store is wiped while fanout runs: the stream and consumers are made
/// again without a restart (`/ready` recovers, ingest and delivery resume, new messages
/// numbered from 1 again are not taken for the old ones), and the loss is logged at
/// ERROR with the sequence reached before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_store_is_made_again_while_running_and_the_loss_is_logged() {
    let mut nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.respond_with(|r: &ReceivedRequest| {
        r.contains_message("poison")
            .then(|| Reply::json(400, r#"{"error":"no"}"#))
    });
    let f = instance(&nats, &receiver, "a");
    // Delivered (and acknowledged) first: one stream message per partition a user is on.
    let delivered = plan(4, 5);
    assert_eq!(send(&f, &delivered).await, 200);
    assert_all_delivered(&receiver, &delivered, Duration::from_secs(30)).await;
    // Then owed when the store goes.
    receiver.stop().await;
    assert_eq!(send(&f, &renamed(plan(4, 5), "owed")).await, 200);
    let last = last_sequence(&nats);
    assert!(last > 1);

    nats.nodes[0].kill();
    nats.nodes[0].wipe_store();
    nats.nodes[0].restart();
    nats.wait_ready();
    receiver.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Traffic or not, the stream comes back.
        let ready = client().get(f.url("/ready")).send().await.unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready did not recover: {}",
            ready.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = renamed(plan(4, 5), "after");
    send_until_stored(&f, &after, Duration::from_secs(20)).await;
    assert_all_delivered(&receiver, &after, Duration::from_secs(30)).await;
    let log = f.stderr();
    assert!(
        log.iter().any(|l| l.contains("ERROR")
            && l.contains("stream `fanout` was recreated")
            && l.contains(&format!("messages up to seq {last} known before are gone"))),
        "{log:#?}"
    );

    // The dead-letter stream went with the store and is made again too: a message
    // refused now is stored, as this instance lists it (`fanout dead-letters` would
    // make the stream itself).
    let poison = json!({"type": "track", "userId": "p", "event": "Bad", "messageId": "poison"});
    send_until_stored(&f, &[poison], Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = client()
            .get(f.url("/admin/dead-letters?destination=hook"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let listed: Value = response.json().await.unwrap_or_default();
        if status == 200
            && listed["dead_letters"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
        {
            assert_eq!(listed["dead_letters"][0]["message"]["messageId"], "poison");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letter was not stored: {status} {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = f.stderr();
    assert!(
        log.iter().any(|l| l.contains("ERROR")
            && l.contains("dead-letter stream `fanout_dead_letters` was missing")),
        "{log:#?}"
    );
}

/// A publish the stream does not acknowledge in time (the server paused past
/// `queue.publish_timeout`) may be stored or not: the 503 says the outcome is unknown,
/// and the client's retry, packed with a newer message, does not store it twice (nor
/// the message that was with it the first time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_an_unknown_outcome_is_delivered_once() {
    let nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    let f = Fanout::start_with(
        Settings::default()
            .section(&nats.queue_section(&format!("{QUEUE}\npublish_timeout = \"1s\"")))
            .section(&hook(&receiver, "a")),
    );
    // One user: one partition, delivered in order.
    let message = |id: &str| json!({"type": "track", "userId": "u", "event": "E", "messageId": id});
    send_until_stored(&f, &[message("first")], Duration::from_secs(10)).await;
    assert_all_delivered(&receiver, &[message("first")], Duration::from_secs(30)).await;

    nats.nodes[0].pause();
    let unknown = post_batch(&f, &[message("a"), message("c")]).await;
    nats.nodes[0].resume();
    assert_eq!(unknown.status(), 503);
    let body: Value = unknown.json().await.unwrap();

    // The client sends "a" again, with a message it had since.
    send_until_stored(&f, &[message("a"), message("b")], Duration::from_secs(20)).await;
    // Once "last" is here, so is any copy of what was stored before it.
    send_until_stored(&f, &[message("last")], Duration::from_secs(20)).await;
    assert_all_delivered(&receiver, &[message("last")], Duration::from_secs(30)).await;
    let ids = receiver.message_ids();
    let count = |id: &str| ids.iter().filter(|i| *i == id).count();
    assert_eq!(count("a"), 1, "{ids:?}");
    assert_eq!(count("b"), 1, "{ids:?}");
    // Stored by the first publish after all.
    assert_eq!(count("c"), 1, "{ids:?}");

    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let text = body["error"]["message"].as_str().unwrap();
    assert!(text.contains("the outcome is unknown"), "{body}");
    assert!(!text.contains("were not stored"), "{body}");
}

/// A store wiped while fanout was stopped: at its next start fanout compares the stream
/// with what it saw before (kept in `server.data_dir`) and says at ERROR what is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_wiped_while_stopped_is_noted_at_the_next_start() {
    let mut nats = NatsCluster::single();
    let receiver = Receiver::start().await;
    receiver.stop().await;
    let mut f = instance(&nats, &receiver, "a");
    assert_eq!(send(&f, &plan(4, 5)).await, 200);
    let last = last_sequence(&nats);
    // The record catches up within a few seconds.
    let record = f.dir().join("data").join("nats-stream-fanout.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let saved: Option<Value> = std::fs::read(&record)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok());
        if saved.is_some_and(|s| s["last_sequence"] == last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record of seq {last} in {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(f.terminate().success());

    nats.nodes[0].kill();
    nats.nodes[0].wipe_store();
    nats.nodes[0].restart();
    nats.wait_ready();
    f.restart();
    let log = f.stderr();
    assert!(
        log.iter().any(|l| l.contains("ERROR")
            && l.contains("stream `fanout` is not the one this instance saw before it stopped")
            && l.contains(&format!("messages up to seq {last} known before are gone"))),
        "{log:#?}"
    );
    assert_eq!(send(&f, &plan(1, 1)).await, 200);
}

/// Runs fanout on the NATS backend with one server at `port` until it exits.
fn run_against_nats_at(port: u16) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [queue]\nbackend = \"nats\"\nservers = [\"nats://127.0.0.1:{port}\"]\n\
             [[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n",
            dir.path().display()
        ),
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap()
}

/// Spread tests: the default partitions (32), an ack wait short enough for a handover
/// to be quick, and the stream on all three nodes.
const SPREAD_QUEUE: &str = "ack_wait = \"5s\"\nreplicas = 3";

/// The spread tests each run a 3-node cluster and several instances under load: one at
/// a time, so that none starves another's cluster on a small machine.
static SPREAD_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spread_instance(nats: &NatsCluster, receiver: &Receiver, name: &str) -> Fanout {
    Fanout::start_with(
        Settings::default()
            .section(&nats.queue_section(SPREAD_QUEUE))
            .section(&hook(receiver, name)),
    )
}

/// Sends `messages` in requests of 100, through each of `through` in turn.
async fn send_round_robin(through: &[&Fanout], messages: &[Value]) {
    for (i, chunk) in messages.chunks(100).enumerate() {
        send_until_stored(through[i % through.len()], chunk, Duration::from_secs(30)).await;
    }
}

/// Waits until each of `instances` sees `count` live instances and holds a share of
/// `hook`'s partitions no bigger than ⌈32 / count⌉.
async fn wait_shares(instances: &[&Fanout], count: usize) {
    let cap = 32usize.div_ceil(count) as f64;
    for f in instances {
        f.wait_metric("fanout_queue_instances", &[], |n| n == count as f64)
            .await;
        f.wait_metric(
            "fanout_queue_consumer_partitions",
            &[("destination", "hook")],
            |held| held >= 1.0 && held <= cap,
        )
        .await;
    }
}

/// How many of `ids` each instance delivered (first deliveries, by the X-Instance header).
fn shares_of(receiver: &Receiver, ids: &HashSet<String>) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    let mut seen = HashSet::new();
    for request in receiver.requests().iter().filter(|r| r.ok()) {
        for id in request.message_ids() {
            if ids.contains(&id) && seen.insert(id) {
                *shares.entry(instance_of(request)).or_insert(0) += 1;
            }
        }
    }
    shares
}

/// Three instances share a webhook's 30 000 messages (each ≥ 20 %); a fourth joining
/// takes a share of the next ones; one stopping hands its share over. Nothing is lost,
/// each user's messages arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_live_instances_share_the_partitions_as_they_join_and_leave() {
    let _turn = SPREAD_TURN.lock().await;
    let nats = NatsCluster::start(3);
    let receiver = Receiver::start().await;
    let a = spread_instance(&nats, &receiver, "a");
    let b = spread_instance(&nats, &receiver, "b");
    let mut c = spread_instance(&nats, &receiver, "c");
    wait_shares(&[&a, &b, &c], 3).await;

    let all = plan(300, 166);
    let (first, rest) = all.split_at(30_000);
    let (second, third) = rest.split_at(10_000);
    send_round_robin(&[&a, &b, &c], first).await;
    assert_all_delivered(&receiver, first, Duration::from_secs(240)).await;
    let shares = shares_of(&receiver, &message_ids(first));
    for name in ["a", "b", "c"] {
        let share = shares.get(name).copied().unwrap_or(0);
        assert!(
            share * 5 >= first.len(),
            "{name} delivered {share} of 30 000: {shares:?}"
        );
    }

    let d = spread_instance(&nats, &receiver, "d");
    wait_shares(&[&a, &b, &c, &d], 4).await;
    send_round_robin(&[&a, &b, &c, &d], second).await;
    assert_all_delivered(&receiver, second, Duration::from_secs(120)).await;
    let shares = shares_of(&receiver, &message_ids(second));
    let d_share = shares.get("d").copied().unwrap_or(0);
    assert!(
        d_share * 10 >= second.len(),
        "the joining instance delivered {d_share}: {shares:?}"
    );

    assert!(c.terminate().success());
    wait_shares(&[&a, &b, &d], 3).await;
    send_round_robin(&[&a, &b, &d], third).await;
    assert_all_delivered(&receiver, third, Duration::from_secs(120)).await;
    let shares = shares_of(&receiver, &message_ids(third));
    assert_eq!(shares.get("c"), None, "{shares:?}");
    assert_eq!(shares.values().sum::<usize>(), third.len());

    let requests: Vec<ReceivedRequest> =
        receiver.requests().into_iter().filter(|r| r.ok()).collect();
    // The clean stop may send again what was in a pack it had partly delivered.
    assert_in_order(&requests, 1);
}

/// Three instances started at the same moment on a stream that does not exist yet all
/// come up (several rounds, a new stream each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_instances_started_together_on_a_new_stream_all_come_up() {
    let _turn = SPREAD_TURN.lock().await;
    let nats = NatsCluster::start(3);
    let receiver = Receiver::start().await;
    for round in 0..4 {
        let queue = format!("{SPREAD_QUEUE}\nstream = \"together{round}\"");
        let settings = Settings::default()
            .section(&nats.queue_section(&queue))
            .section(&hook(&receiver, "x"));
        // Each start panics if its process exits instead of listening.
        let instances: Vec<Fanout> = std::thread::scope(|s| {
            let starting: Vec<_> = (0..3)
                .map(|_| s.spawn(|| Fanout::start_with(settings.clone())))
                .collect();
            starting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let refs: Vec<&Fanout> = instances.iter().collect();
        wait_shares(&refs, 3).await;
        let messages = renamed(plan(10, 3), &format!("r{round}-"));
        send_round_robin(&refs, &messages).await;
        assert_all_delivered(&receiver, &messages, Duration::from_secs(30)).await;
    }
}

/// A 5 s ack wait under load: messages wait here far longer than that (a slow receiver
/// behind several instances' backlogs), and are kept alive, so none is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_messages_held_past_the_ack_wait_are_kept_alive_and_delivered_once() {
    let _turn = SPREAD_TURN.lock().await;
    let nats = NatsCluster::start(3);
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(100));
    let a = spread_instance(&nats, &receiver, "a");
    let b = spread_instance(&nats, &receiver, "b");
    wait_shares(&[&a, &b], 2).await;
    // About 200 messages a second get through (20 a request, two instances, 100 ms
    // each): 4 000 take about 20 s, so most wait here well past the 5 s ack wait.
    let all = plan(100, 40);
    send_round_robin(&[&a, &b], &all).await;
    assert_all_delivered(&receiver, &all, Duration::from_secs(120)).await;
    let ids: Vec<String> = receiver
        .requests()
        .iter()
        .filter(|r| r.ok())
        .flat_map(|r| r.message_ids())
        .collect();
    let repeated = ids.len() - message_ids(&all).len();
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in receiver.requests().iter().filter(|r| r.ok()) {
        for id in request.message_ids() {
            by.entry(id).or_default().push(instance_of(request));
        }
    }
    let twice: Vec<_> = by.iter().filter(|(_, at)| at.len() > 1).take(10).collect();
    assert_eq!(
        repeated,
        0,
        "{repeated} of {} delivered twice, e.g. (id, by) {twice:?}",
        all.len()
    );
    // Nor did the server send many of them again (a re-sent pack is told apart and not
    // passed on: the count above). Runs alone have seen 0 or 1 of 1 280 sent again, a
    // loaded run of the whole suite 26 (2 %): a gap the keep-alive still leaves, not
    // found yet; the bound catches the keep-alive failing outright.
    wait_consumers_idle(&nats, "hook").await;
    let (deliveries, packs) = server_deliveries(&nats, "hook");
    assert!(
        deliveries >= packs && (deliveries - packs) * 20 <= packs,
        "the server delivered {} of {packs} packs again (more than 5 %)",
        deliveries.saturating_sub(packs)
    );
    let requests: Vec<ReceivedRequest> =
        receiver.requests().into_iter().filter(|r| r.ok()).collect();
    assert_in_order(&requests, 0);
}

/// Deliveries the server made to `destination`'s partition consumers (the most any node
/// reports for each), and the packs published to the stream: equal when none was sent again.
fn server_deliveries(nats: &NatsCluster, destination: &str) -> (u64, u64) {
    let prefix = format!("{destination}_p");
    let mut by_consumer: BTreeMap<String, u64> = BTreeMap::new();
    let mut packs = 0;
    for node in &nats.nodes {
        let Some(jsz) = node.monitor("/jsz?streams=true&consumers=true") else {
            continue;
        };
        for stream in jsz["account_details"][0]["stream_detail"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "fanout")
        {
            packs = packs.max(stream["state"]["last_seq"].as_u64().unwrap_or(0));
            for consumer in stream["consumer_detail"].as_array().into_iter().flatten() {
                let name = consumer["name"].as_str().unwrap_or("");
                if name.starts_with(&prefix) {
                    let sent = consumer["delivered"]["consumer_seq"].as_u64().unwrap_or(0);
                    let most = by_consumer.entry(name.to_string()).or_default();
                    *most = (*most).max(sent);
                }
            }
        }
    }
    (by_consumer.values().sum(), packs)
}
