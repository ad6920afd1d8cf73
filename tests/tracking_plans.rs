//! Tracking plans through the running server: blocked, omitted and flagged messages with
//! each setting, what the client is told, the dead letters of the source, the metrics and
//! the live view; a plan fixed and reloaded, and the blocked messages taken in again;
//! `fanout route`'s verdict; bad plan files refused as config errors.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sse::Sse;
use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

const TOKEN: &str = "plan-admin-token";

/// The plan of the issue, with its three settings given.
fn plan(unplanned_events: &str, violations: &str, unplanned_properties: &str) -> String {
    json!({
        "events": { "Order Completed": { "type": "object", "required": ["revenue"],
                                          "properties": { "revenue": {"type": "number"} } } },
        "identify": { "type": "object", "properties": { "email": {"type": "string"} } },
        "unplanned_events": unplanned_events,
        "violations": violations,
        "unplanned_properties": unplanned_properties,
    })
    .to_string()
}

/// fanout with the harness's `test` source on `plans/web.json` (written first).
fn with_plan(plan: &str) -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    write_plan(tmp.path(), plan);
    let settings = Settings::default()
        .source("tracking_plan = \"plans/web.json\"")
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN);
    Fanout::start_in(tmp, settings)
}

fn write_plan(dir: &Path, plan: &str) {
    std::fs::create_dir_all(dir.join("plans")).unwrap();
    std::fs::write(dir.join("plans/web.json"), plan).unwrap();
}

fn batch() -> Value {
    json!({"batch": [
        {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "planned",
         "properties": {"revenue": 12.5, "coupon": "SPRING"}},
        {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "unplanned"},
        {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "violating",
         "properties": {"revenue": "a lot"}},
        {"type": "identify", "userId": "u1", "messageId": "bad-traits", "traits": {"email": 7}},
        {"type": "page", "userId": "u1", "name": "Home", "messageId": "page"},
    ]})
}

#[tokio::test]
async fn a_blocking_plan_keeps_blocked_messages_as_dead_letters_of_the_source() {
    let f = with_plan(&plan("block", "block", "omit"));
    let mut live = Sse::open(&f, TOKEN, "").await;
    // The client's answer is the usual one: a plan is not the client's problem.
    assert_success(f.post("/v1/batch").json(&batch()).send().await.unwrap()).await;

    f.wait_delivered(2).await;
    f.wait_settled("out").await;
    let delivered = f.delivered();
    assert_eq!(common::receiver::ids(&delivered), ["planned", "page"]);
    assert_eq!(
        delivered[0]["properties"],
        json!({"revenue": 12.5}),
        "the unplanned property is omitted before any destination"
    );

    let letters = f.dead_letters("tracking_plan").await;
    let mut ids: Vec<&str> = letters
        .iter()
        .map(|l| l["message"]["messageId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["bad-traits", "unplanned", "violating"]);
    for letter in &letters {
        assert_eq!(letter["source"], "test");
        assert_eq!(letter["reason"], "tracking_plan");
        let why: Value = serde_json::from_str(letter["response"].as_str().unwrap()).unwrap();
        let path = why["violations"][0]["path"].as_str().unwrap();
        let expected = match letter["message"]["messageId"].as_str().unwrap() {
            "unplanned" => "/event",
            "violating" => "/properties/revenue",
            _ => "/traits/email",
        };
        assert_eq!(path, expected, "{letter}");
    }
    assert_eq!(
        f.metric(
            "fanout_events_total",
            &[
                ("source", "test"),
                ("type", "track"),
                ("outcome", "blocked")
            ]
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        f.metric(
            "fanout_events_total",
            &[
                ("source", "test"),
                ("type", "identify"),
                ("outcome", "blocked")
            ]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        f.metric(
            "fanout_events_total",
            &[
                ("source", "test"),
                ("type", "track"),
                ("outcome", "accepted")
            ]
        )
        .await,
        Some(1.0)
    );
    let seen = live
        .until(|e| e["kind"] == "blocked" && e["messageId"] == "violating")
        .await;
    let blocked = seen.last().unwrap();
    assert_eq!(blocked["violations"][0]["path"], "/properties/revenue");
    assert_eq!(blocked["message"]["properties"]["revenue"], "a lot");
}

#[tokio::test]
async fn an_allowing_plan_delivers_everything_and_flags_violations() {
    let f = with_plan(&plan("allow", "allow", "allow"));
    assert_success(f.post("/v1/batch").json(&batch()).send().await.unwrap()).await;
    let delivered = f.wait_delivered(5).await;
    assert_eq!(
        common::receiver::ids(&delivered),
        ["planned", "unplanned", "violating", "bad-traits", "page"]
    );
    assert_eq!(delivered[0]["properties"]["coupon"], "SPRING", "extra kept");
    assert!(delivered[0]["context"].get("violations").is_none());
    assert!(
        delivered[1]["context"].get("violations").is_none(),
        "unplanned is not a violation when allowed"
    );
    let flagged = &delivered[2]["context"]["violations"][0];
    assert_eq!(flagged["type"], "tracking_plan");
    assert_eq!(flagged["path"], "/properties/revenue");
    assert_eq!(
        delivered[3]["context"]["violations"][0]["path"],
        "/traits/email"
    );
    assert!(f.dead_letters("tracking_plan").await.is_empty());
}

#[tokio::test]
async fn blocked_messages_go_in_after_the_plan_is_fixed_and_reloaded() {
    let f = with_plan(&plan("block", "block", "allow"));
    assert_success(f.post("/v1/batch").json(&batch()).send().await.unwrap()).await;
    f.wait_delivered(2).await;
    assert_eq!(f.dead_letters("tracking_plan").await.len(), 3);

    // The plan learns `Signed Up`; violations still block.
    let mut fixed: Value = serde_json::from_str(&plan("block", "block", "allow")).unwrap();
    fixed["events"]["Signed Up"] = json!({"type": "object"});
    write_plan(f.dir(), &fixed.to_string());
    let (status, body) = common::post_reload(&f, TOKEN, "").await;
    assert_eq!(status, 200, "{body}");

    let answer = f
        .cli(&[
            "dead-letters",
            "replay",
            "--destination",
            "tracking_plan",
            "--url",
            &f.url(""),
        ])
        .await;
    let answer: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(answer, json!({"replayed": 1, "still_blocked": 2}));
    let delivered = f.wait_delivered(3).await;
    assert_eq!(
        common::receiver::ids(&delivered),
        ["planned", "page", "unplanned"]
    );
    let left: Vec<Value> = f.dead_letters("tracking_plan").await;
    let mut ids: Vec<&str> = left
        .iter()
        .map(|l| l["message"]["messageId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["bad-traits", "violating"]);

    // Over HTTP too, once the plan allows violations.
    write_plan(f.dir(), &plan("block", "allow", "allow"));
    assert_eq!(common::post_reload(&f, TOKEN, "").await.0, 200);
    let (status, body) = common::post_admin(
        &f,
        TOKEN,
        "/admin/dead-letters/replay?destination=tracking_plan",
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"replayed": 2, "still_blocked": 0}))
    );
    let delivered = f.wait_delivered(5).await;
    assert_eq!(delivered.len(), 5);
    assert_eq!(
        delivered[3]["context"]["violations"][0]["type"],
        "tracking_plan"
    );
    assert!(f.dead_letters("tracking_plan").await.is_empty());
    // Each message went once more only: with the cursor at the log's end, nothing else
    // was repeated.
    f.wait_settled("out").await;
    assert_eq!(f.delivered().len(), 5);
}

#[tokio::test]
async fn route_shows_the_plans_verdict() {
    let f = with_plan(&plan("block", "block", "omit"));
    let run = |input: Value| {
        let mut command = f.command();
        command.arg("route");
        common::run_with_stdin(command, input.to_string().into_bytes())
    };
    let (code, out, err) = run(
        json!({"type": "track", "event": "Order Completed", "userId": "u",
        "properties": {"revenue": 1, "coupon": "X"}}),
    );
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let message = &report["messages"][0];
    assert_eq!(
        message["tracking_plan"],
        json!({"verdict": "deliver", "omitted": ["coupon"]})
    );
    assert_eq!(message["stored"]["properties"], json!({"revenue": 1}));
    assert_eq!(message["destinations"][0]["send"], true);

    let (code, out, err) = run(json!({"type": "track", "event": "Nope", "userId": "u"}));
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let message = &report["messages"][0];
    assert_eq!(message["tracking_plan"]["verdict"], "blocked");
    assert_eq!(message["tracking_plan"]["violations"][0]["path"], "/event");
    assert_eq!(message["destinations"][0]["send"], false);
    assert_eq!(message["destinations"][0]["skipped"], "tracking_plan");
}

#[test]
fn bad_plan_files_are_config_errors_naming_file_and_pointer() {
    let cases: [(&str, &str); 4] = [
        ("{ not json", "not JSON"),
        (
            r#"{"events": {}, "colour": "red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"violations": "warn"}"#, "at /violations"),
        (
            r#"{"events": {"Order Completed": {"properties": {"revenue": {"type": "numbr"}}}}}"#,
            "at /events/Order Completed/properties/revenue/type",
        ),
    ];
    for (plan, wanted) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_plan(dir.path(), plan);
        let (ok, stderr) = check(
            dir.path(),
            "[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\ntracking_plan = \"plans/web.json\"\n",
        );
        assert!(!ok, "accepted: {plan}");
        assert!(
            stderr.contains("sources[0].tracking_plan")
                && stderr.contains("plans/web.json")
                && stderr.contains(wanted),
            "want {wanted}: {stderr}"
        );
    }
    // A destination cannot take the name blocked messages are filed under.
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = check(
        dir.path(),
        "[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"tracking_plan\"\nkind = \"file\"\npath = \"x\"\n",
    );
    assert!(!ok);
    assert!(stderr.contains("reserved"), "{stderr}");
}

/// `fanout check` of `config` written to `dir/fanout.toml`, run from another directory (so
/// the plan's path must be taken relative to the file): (success, standard error).
fn check(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("fanout.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command
        .args(["check", "--config"])
        .arg(&path)
        .current_dir("/");
    let (code, stderr) = run_to_end(command);
    (code == Some(0), stderr)
}

/// Runs `command` to its end: (exit code, standard error). One that has not ended after a
/// minute (a read that waits for ever) is killed, and its code is `None`.
fn run_to_end(mut command: Command) -> (Option<i32>, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.and_then(|s| s.code()), stderr)
}

/// A plan whose `Signed Up` event's `code` must match `pattern`.
fn plan_with_pattern(pattern: &str) -> String {
    json!({ "events": { "Signed Up": { "type": "object",
            "properties": { "code": { "type": "string", "pattern": pattern } } } } })
    .to_string()
}

/// Slow in a backtracking engine: it cost ~30 ms per message.
const BACKTRACKING: &str = "^(a|aa)+(?!b)$";

/// The plan file at `path` becomes a FIFO or a link to `/dev/zero`.
fn make_special(path: &Path, kind: &str) {
    let _ = std::fs::remove_file(path);
    match kind {
        "fifo" => {
            let made = Command::new("mkfifo").arg(path).status();
            assert!(made.unwrap().success());
        }
        _ => std::os::unix::fs::symlink("/dev/zero", path).unwrap(),
    }
}

const PLANNED_SOURCE: &str =
    "[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\ntracking_plan = \"plans/web.json\"\n";

#[test]
fn a_plan_pattern_that_backtracks_is_refused_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    write_plan(dir.path(), &plan_with_pattern(BACKTRACKING));
    let at = "plans/web.json: at /events/Signed Up/properties/code/pattern";
    let (ok, stderr) = check(dir.path(), PLANNED_SOURCE);
    assert!(!ok, "accepted");
    assert!(
        stderr.contains("sources[0].tracking_plan")
            && stderr.contains(at)
            && stderr.contains("linear time"),
        "{stderr}"
    );

    // The server does not start on it, and says the same.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}/data\"\n\n{PLANNED_SOURCE}",
        dir.path().display()
    );
    std::fs::write(dir.path().join("fanout.toml"), config).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_fanout"));
    server.arg("--config").arg(dir.path().join("fanout.toml"));
    let (code, stderr) = run_to_end(server);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("sources[0].tracking_plan") && stderr.contains(at),
        "{stderr}"
    );
}

#[test]
fn plan_paths_that_are_not_regular_files_are_refused_by_check() {
    for (kind, what) in [("fifo", "a FIFO"), ("zero", "a character device")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plans")).unwrap();
        make_special(&dir.path().join("plans/web.json"), kind);
        let (ok, stderr) = check(dir.path(), PLANNED_SOURCE);
        assert!(!ok, "accepted a {kind}");
        assert!(
            stderr.contains("sources[0].tracking_plan")
                && stderr.contains(&format!("plans/web.json: not a regular file ({what})")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_reload_refuses_bad_plan_files_and_the_old_plan_stays() {
    let mut f = with_plan(&plan("allow", "allow", "allow"));
    let path = f.dir().join("plans/web.json");
    for (kind, wanted) in [
        ("fifo", "not a regular file (a FIFO)"),
        ("zero", "not a regular file (a character device)"),
        ("backtracking", "linear time"),
    ] {
        match kind {
            "backtracking" => {
                std::fs::remove_file(&path).unwrap();
                write_plan(f.dir(), &plan_with_pattern(BACKTRACKING));
            }
            _ => make_special(&path, kind),
        }
        let (status, body) = common::post_reload(&f, TOKEN, "").await;
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("sources[0].tracking_plan") && message.contains(wanted),
            "{message}"
        );
    }
    // The plan loaded at start still decides: it lets everything through, flagged. (A
    // readable file is put back for the CLI, which reads the config too; the server is not
    // told, and would block with it.)
    write_plan(f.dir(), &plan("block", "block", "allow"));
    assert_success(f.post("/v1/batch").json(&batch()).send().await.unwrap()).await;
    let delivered = f.wait_delivered(5).await;
    assert_eq!(
        delivered[2]["context"]["violations"][0]["path"],
        "/properties/revenue"
    );
    assert!(f.dead_letters("tracking_plan").await.is_empty());
    // And SIGTERM still ends it.
    assert!(f.terminate().success());
}
