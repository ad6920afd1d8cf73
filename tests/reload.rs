//! Config reload: SIGHUP and `POST /admin/reload` apply new write keys and destinations
//! while requests keep being answered; an invalid config is refused and the old one keeps
//! running; a removed destination keeps its queued data until it is purged.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, Fanout, Settings};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "reload-test-admin-token";

fn settings() -> Settings {
    Settings::default()
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", ADMIN_TOKEN)
}

/// A file destination's config block.
fn file_destination(name: &str, dir: &Path) -> String {
    format!(
        "\n[[destinations]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{}/{name}.jsonl\"\n",
        dir.display()
    )
}

/// A second source with its own key.
const NEW_SOURCE: &str = "\n[[sources]]\nname = \"mobile\"\nwrite_keys = [\"wk_mobile\"]\n";

fn edit_config(f: &Fanout, edit: impl FnOnce(String) -> String) {
    let path = f.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

fn sighup(f: &Fanout) {
    let ok = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(f.pid().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

fn track(id: &str) -> Value {
    json!({"userId": "u1", "event": "Reloaded", "messageId": id})
}

/// Reloading `config` is refused with a message naming `mentions`, and nothing of it
/// takes effect (the new source's key stays unknown).
async fn assert_refused(f: &Fanout, config: &str, mentions: &str) {
    std::fs::write(f.config_path(), config).unwrap();
    let (status, body) = common::post_reload(f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{message}");
    assert_eq!(status_as(f, "wk_mobile", "refused").await, 401);
}

/// Waits until the log shows `n` refused reloads.
async fn wait_refusals(f: &Fanout, n: usize) {
    let refused = || {
        f.stderr()
            .iter()
            .filter(|l| l.contains("config reload refused"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused() < n {
        assert!(
            Instant::now() < deadline,
            "{} reloads refused, want {n}",
            refused()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_as(f: &Fanout, key: &str, id: &str) -> u16 {
    f.post_as(key, "/v1/track")
        .json(&track(id))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_adds_a_key_and_a_destination_without_failing_a_request() {
    let f = Fanout::start_with(settings());
    assert_eq!(status_as(&f, "wk_mobile", "before").await, 401);

    // Eight clients send without pause until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (url, stop, sent) = (f.url("/v1/track"), stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let http = client();
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let result = http
                    .post(&url)
                    .header("authorization", common::basic(common::WRITE_KEY))
                    .json(&track(&format!("load-{worker}-{n}")))
                    .send()
                    .await;
                match result {
                    Ok(r) if r.status() == 200 => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("{e}")),
                }
                n += 1;
            }
            failures
        }));
    }
    // Some traffic first, so there is something the new destination must not get.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = f.dir().to_path_buf();
    edit_config(&f, |text| {
        format!("{text}{NEW_SOURCE}{}", file_destination("second", &dir))
    });
    let before_reload = sent.load(Ordering::Relaxed);
    sighup(&f);

    // The new key works once the reload is in; until then it is refused, never an error.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match status_as(&f, "wk_mobile", "after").await {
            200 => break,
            401 => assert!(
                Instant::now() < deadline,
                "the new key never started working"
            ),
            other => panic!("new key answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Load goes on past the reload: another 50 requests, all answered.
    let after_reload = sent.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent.load(Ordering::Relaxed) < after_reload + 50 {
        assert!(
            Instant::now() < deadline,
            "the load stalled after the reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in load {
        failures.extend(worker.await.unwrap());
    }
    let total = sent.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "requests failed during the reload: {failures:?}"
    );
    assert!(
        total > before_reload,
        "the load kept running across the reload"
    );

    // Every accepted message reaches the old destination; the new one gets what was
    // accepted after it started, including the new source's message.
    let out = f.wait_delivered(total + 1).await;
    assert_eq!(out.len(), total + 1);
    let second = common::wait_file_lines(&dir.join("second.jsonl"), 1).await;
    let ids: Vec<&str> = second
        .iter()
        .map(|m| m["messageId"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"after"), "{ids:?}");
    // What was acknowledged before the SIGHUP was in the log before the destination began.
    assert!(
        second.len() <= out.len() - before_reload,
        "the new destination starts at the log end: {} of {}, {before_reload} before",
        second.len(),
        out.len()
    );
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_running() {
    let f = Fanout::start_with(settings());
    let good = std::fs::read_to_string(f.config_path()).unwrap();
    // A typo'd key in a new source: refused with the key and its line.
    edit_config(&f, |text| {
        format!("{text}\n[[sources]]\nname = \"mobile\"\nwrite_kyes = [\"wk_mobile\"]\n")
    });
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("write_kyes"), "{message}");
    let line = good.lines().count() + 4;
    assert!(message.contains(&format!("line {line}")), "{message}");

    // SIGHUP with the same file: also refused; the process keeps serving the old config.
    sighup(&f);
    wait_refusals(&f, 2).await;
    assert_eq!(status_as(&f, common::WRITE_KEY, "still-ok").await, 200);
    assert_eq!(status_as(&f, "wk_mobile", "unknown").await, 401);

    // A config whose secret is missing is refused too, before anything changes.
    let relay = "\n[[destinations]]\nname = \"relay\"\nkind = \"segment\"\n\
                 url = \"http://127.0.0.1:9\"\nwrite_key_env = \"FANOUT_TEST_UNSET_VARIABLE\"\n";
    assert_refused(
        &f,
        &format!("{good}{NEW_SOURCE}{relay}"),
        "FANOUT_TEST_UNSET_VARIABLE",
    )
    .await;
    // And a file destination whose output cannot be opened (its path is a directory).
    let archive = format!(
        "\n[[destinations]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n",
        f.dir().display()
    );
    assert_refused(&f, &format!("{good}{NEW_SOURCE}{archive}"), "archive").await;

    // The fixed file is taken, and the answer says what changed.
    edit_config(&f, |_| format!("{good}{NEW_SOURCE}"));
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["sources"], 2, "{body}");
    assert_eq!(status_as(&f, "wk_mobile", "now-known").await, 200);
    let delivered = f.wait_delivered(2).await;
    assert_eq!(common::receiver::ids(&delivered), ["still-ok", "now-known"]);
}

#[tokio::test]
async fn reload_needs_the_admin_token() {
    let f = Fanout::start_with(settings());
    let response = client()
        .post(f.url("/admin/reload"))
        .header("authorization", "Bearer wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Without a token configured, the endpoint does not exist.
    let bare = Fanout::start();
    let response = client()
        .post(bare.url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_removed_destination_keeps_its_queue_until_purged() {
    let f = Fanout::start_with(settings());
    let dir = f.dir().to_path_buf();
    let second = dir.join("second.jsonl");
    let with_second = {
        let text = std::fs::read_to_string(f.config_path()).unwrap();
        format!("{text}{}", file_destination("second", &dir))
    };
    let without_second = std::fs::read_to_string(f.config_path()).unwrap();
    std::fs::write(f.config_path(), &with_second).unwrap();
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["added"], json!(["second"]), "{body}");
    assert_eq!(status_as(&f, common::WRITE_KEY, "m1").await, 200);
    assert_eq!(common::wait_file_lines(&second, 1).await.len(), 1);

    // Removed: it stops receiving, but its cursor stays and holds what arrives meanwhile.
    std::fs::write(f.config_path(), &without_second).unwrap();
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["removed"], json!(["second"]), "{body}");
    assert_eq!(body["changes"]["unpurged"], json!(["second"]), "{body}");
    for id in ["m2", "m3"] {
        assert_eq!(status_as(&f, common::WRITE_KEY, id).await, 200);
    }
    f.wait_delivered(3).await;
    assert_eq!(common::file_lines(&second).len(), 1);
    let cursor = dir.join("data/cursors/second.cursor");
    assert!(cursor.exists());

    // Back again: it catches up on what it missed.
    std::fs::write(f.config_path(), &with_second).unwrap();
    let (status, _) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200);
    let caught_up: Vec<Value> = common::wait_file_lines(&second, 3)
        .await
        .into_iter()
        .map(|m| m["messageId"].clone())
        .collect();
    assert_eq!(caught_up, [json!("m1"), json!("m2"), json!("m3")]);

    // Removed and purged: the cursor is gone.
    std::fs::write(f.config_path(), &without_second).unwrap();
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "?purge=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["purged"], json!(["second"]), "{body}");
    assert!(!cursor.exists());
}

#[tokio::test]
async fn a_changed_destination_restarts_from_its_cursor() {
    let f = Fanout::start_with(settings());
    assert_eq!(status_as(&f, common::WRITE_KEY, "a").await, 200);
    f.wait_delivered(1).await;
    // A changed setting restarts the destination; nothing is lost or repeated.
    edit_config(&f, |text| {
        text.replace(
            "kind = \"file\"\n",
            "kind = \"file\"\nbatch = { max_events = 7 }\n",
        )
    });
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["changed"], json!(["out"]), "{body}");
    assert_eq!(status_as(&f, common::WRITE_KEY, "b").await, 200);
    let delivered = f.wait_delivered(2).await;
    assert_eq!(common::receiver::ids(&delivered), ["a", "b"]);
}

#[tokio::test]
async fn admin_endpoints_move_to_their_own_listener() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = Fanout::start_with(
        Settings::default()
            .section(&format!(
                "[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\nlisten = \"127.0.0.1:{port}\"\n"
            ))
            .env("FANOUT_ADMIN_TOKEN", ADMIN_TOKEN),
    );
    let admin = format!("http://127.0.0.1:{port}");
    let http = client();
    // Not on the public address...
    for (method, path) in [("POST", "/admin/reload"), ("GET", "/metrics")] {
        let response = http
            .request(method.parse().unwrap(), f.url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path} on the public address");
    }
    // ...but on the admin one, with health and readiness too.
    let response = http
        .post(format!("{admin}/admin/reload"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for path in ["/metrics", "/health", "/ready"] {
        let response = http.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} on the admin address");
    }
    assert_eq!(
        http.get(f.url("/health")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn an_emptied_config_is_refused_and_a_cut_one_warns() {
    let f = Fanout::start_with(settings().env("FANOUT_TEST_SHARED_KEYS", "wk_other,wk_test"));
    let good = std::fs::read_to_string(f.config_path()).unwrap();

    // `: > config.toml; kill -HUP`: refused, every key keeps working.
    std::fs::write(f.config_path(), "").unwrap();
    sighup(&f);
    wait_refusals(&f, 1).await;
    assert_eq!(status_as(&f, common::WRITE_KEY, "after-empty").await, 200);
    assert_refused(&f, "", "sources").await;
    // Cut before its first [[sources]]: refused as well.
    let head = &good[..good.find("[[sources]]").unwrap()];
    assert_refused(&f, head, "no [[sources]]").await;
    // A key that the environment gives to a second source as well: refused, unnamed.
    let shared = "\n[[sources]]\nname = \"other\"\nwrite_keys_env = \"FANOUT_TEST_SHARED_KEYS\"\n";
    assert_refused(&f, &format!("{good}{NEW_SOURCE}{shared}"), "source `test`").await;
    assert!(f.stderr().iter().all(|l| !l.contains("wk_test\"")));

    // Cut before its [[destinations]]: a legal config, taken, with a warning.
    let no_destinations = &good[..good.find("[[destinations]]").unwrap()];
    let admin = "\n[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n";
    std::fs::write(f.config_path(), format!("{no_destinations}{admin}")).unwrap();
    let (status, body) = common::post_reload(&f, ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["removed"], json!(["out"]), "{body}");
    assert!(
        f.stderr()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("removes every destination")),
        "no warning in the log"
    );
}
