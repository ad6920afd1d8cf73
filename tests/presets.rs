//! `preset = "NAME"`: destinations shipped in the binary, end to end through the running
//! server into a receiver on loopback (`base_url` points each preset at it): the merge
//! of the user's keys, `settings` and their secrets, `drop_on`, `fanout presets`, and
//! `fanout check` naming a preset's missing setting.

mod common;

use std::process::Command;
use std::time::Duration;

use common::receiver::{ReceivedRequest, Receiver, Reply};
use common::{Fanout, Settings};
use serde_json::{json, Value};

const FAST_RETRY: &str = r#"retry = { initial_backoff = "100ms", max_backoff = "1s" }"#;
const WAIT: Duration = Duration::from_secs(15);

/// Bodies of every request to `path` answered 2xx, in the order they arrived.
fn bodies(requests: &[ReceivedRequest], path: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.path == path && r.ok())
        .map(|r| r.json().unwrap())
        .collect()
}

fn track(id: &str, user: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "anonymousId": "anon-1",
           "event": event, "timestamp": "2024-03-01T12:00:00.250Z",
           "properties": {"plan": "pro"}})
}

/// The mechanism on one preset: its keys under the user's (`base_url`, a `batch` key),
/// a secret setting read from the environment into the body, and `drop_on` settling a
/// documented refusal as skipped while another 400 is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_with_the_users_keys_over_it() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(
        Settings::default()
            .env("PRESETS_TEST_AMPLITUDE_KEY", "amp-key")
            .section(&format!(
                r#"[[destinations]]
name = "amp"
preset = "amplitude"
base_url = "{}"
settings = {{ api_key_env = "PRESETS_TEST_AMPLITUDE_KEY" }}
batch = {{ linger = "50ms" }}
drop_on = [{{ status = 400, body_contains = "silly_event" }}]
{FAST_RETRY}
"#,
                r.url("")
            )),
    );
    f.send_batch(json!([track("t-1", "u1", "Signed Up")])).await;
    let requests = r
        .wait_until(WAIT, |rs| !bodies(rs, "/2/httpapi").is_empty())
        .await;
    let body = &bodies(&requests, "/2/httpapi")[0];
    assert_eq!(body["api_key"], "amp-key");
    assert_eq!(body["events"][0]["event_type"], "Signed Up");
    assert_eq!(body["events"][0]["insert_id"], "t-1");
    assert_eq!(body["events"][0]["time"], 1709294400250i64);

    // A 400 `drop_on` names: skipped, not a dead letter.
    r.push_reply(Reply::json(400, r#"{"code":400,"error":"silly_event"}"#));
    f.send_batch(json!([track("t-2", "u1", "Dropped")])).await;
    let deadline = std::time::Instant::now() + WAIT;
    while f.deliveries("amp", "skipped").await < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.deliveries("amp", "skipped").await, 1.0);

    // Any other 400: a dead letter, with the vendor's answer.
    r.push_reply(Reply::json(
        400,
        r#"{"code":400,"error":"invalid_api_key"}"#,
    ));
    f.send_batch(json!([track("t-3", "u1", "Refused")])).await;
    let dead = f.wait_dead_letters("amp", 1, WAIT).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].to_string().contains("invalid_api_key"), "{dead:?}");
    assert_eq!(f.deliveries("amp", "skipped").await, 1.0);
}

/// `fanout check` of `config`: success, and standard error.
fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_names_the_preset_key_at_fault() {
    let head = "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n\
                [[sources]]\nname = \"s\"\nwrite_keys = [\"k\"]\n\
                [[destinations]]\nname = \"amp\"\n";
    let cases = [
        (
            "preset = \"amplitude\"\n",
            "destinations[0].settings.api_key",
        ),
        ("preset = \"nope\"\n", "destinations[0].preset"),
        (
            "preset = \"amplitude\"\nkind = \"webhook\"\nsettings = { api_key = \"k\" }\n",
            "destinations[0].kind",
        ),
        (
            "preset = \"posthog\"\nsettings = { api_key = \"k\", host = \"eu\" }\n",
            "destinations[0].settings.host",
        ),
    ];
    for (keys, key) in cases {
        let (ok, stderr) = check(&format!("{head}{keys}"));
        assert!(!ok && stderr.contains(key), "want {key}: {stderr}");
    }
    let (ok, stderr) = check(&format!(
        "{head}preset = \"amplitude\"\nsettings = {{ api_key = \"k\" }}\n"
    ));
    assert!(ok, "{stderr}");
}

#[test]
fn presets_are_listed_and_shown() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, listed) = run(&["presets"]);
    assert!(ok);
    for name in ["amplitude", "mixpanel", "posthog"] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(name) && l.len() > name.len() + 10),
            "{listed}"
        );
    }
    let (ok, shown) = run(&["presets", "show", "amplitude"]);
    assert!(ok);
    assert!(shown.contains("preset.settings.api_key"), "{shown}");
    let (ok, _) = run(&["presets", "show", "nope"]);
    assert!(!ok);
}
