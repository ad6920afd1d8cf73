//! `kind = "function"`: Segment destination functions run by a real fanout process,
//! reaching a real receiver on loopback through `fetch` (a public-looking host mapped to
//! it with `fetch_hosts`): delivery, settings from the environment, `RetryError` and the
//! time limit retried, an allocation bomb and `ValidationError` dead-lettered, a missing
//! handler skipped, a fetch to a refused host failing, a syntax error refused by `check`.
//! Source functions: a webhook at `/v1/functions/{writeKey}` turned into messages of its
//! source, and each answer `onRequest` can lead to. `fanout fn test` on a message, a request, a
//! throw and the fetches it made; the per-function call metrics.

mod common;

use std::process::Command;
use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

/// fanout with destination `fn` running `script` (written to `functions/f.js` beside the
/// config), `extra` keys added to it, `api.example.com` mapped to `receiver`.
fn start(script: &str, receiver: &Receiver, extra: &str) -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(tmp.path().join("functions/f.js"), script).unwrap();
    let section = format!(
        "[[destinations]]\nname = \"fn\"\nkind = \"function\"\nfile = \"functions/f.js\"\n\
         fetch_hosts = {{ \"api.example.com\" = \"http://127.0.0.1:{port}\" }}\n\
         retry = {{ initial_backoff = \"100ms\", max_backoff = \"300ms\" }}\n{extra}\n",
        port = receiver.port()
    );
    let settings = Settings::default()
        .section(&section)
        .env("FN_TOKEN", "s3cret");
    Fanout::start_in(tmp, settings)
}

const POSTER: &str = r#"
// Sloppy mode: an undeclared module-level variable, kept between calls.
sent = 0;
async function onTrack(event, settings) {
  const res = await fetch('https://api.example.com/hook?x=1', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json',
               Authorization: 'Basic ' + btoa(settings.token + ':') },
    body: JSON.stringify({ id: event.messageId, event: event.event,
                           channel: settings.channel, n: ++sent }),
  });
  if (res.status >= 500) throw new RetryError('upstream answered ' + res.status);
  if (!res.ok) throw new ValidationError('upstream refused: ' + (await res.json()).error);
  return res.headers.get('x-seen');
}
"#;

#[tokio::test]
async fn a_function_posts_each_track_through_fetch_retrying_on_retry_error() {
    let receiver = Receiver::start().await;
    receiver.push_reply(Reply::status(500));
    receiver.respond_with(|r| {
        let body = r.json()?;
        (body["event"] == "Bad").then(|| Reply::json(422, r#"{"error":"no such event"}"#))
    });
    let f = start(
        POSTER,
        &receiver,
        "settings = { token_env = \"FN_TOKEN\", channel = \"#events\" }",
    );
    f.send_batch(json!([
        {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "m1"},
        {"type": "track", "userId": "u1", "event": "Bad", "messageId": "m2"},
        {"type": "identify", "userId": "u1", "traits": {"a": 1}, "messageId": "m3"},
        {"type": "track", "userId": "u1", "event": "Paid", "messageId": "m4"},
    ]))
    .await;
    f.wait_settled("fn").await;

    let requests = receiver.requests();
    let seen: Vec<(String, u16)> = requests
        .iter()
        .map(|r| {
            (
                r.json().unwrap()["id"].as_str().unwrap().to_string(),
                r.status,
            )
        })
        .collect();
    let expected = [("m1", 500), ("m1", 200), ("m2", 422), ("m4", 200)]
        .map(|(id, status)| (id.to_string(), status));
    assert_eq!(seen, expected);
    let first = &requests[1];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/hook");
    assert_eq!(first.query.as_deref(), Some("x=1"));
    // Settings: `token_env` read from the environment and passed as `token`.
    assert_eq!(first.header("authorization"), Some("Basic czNjcmV0Og=="));
    let body = first.json().unwrap();
    assert_eq!(body["channel"], "#events");
    assert_eq!(body["event"], "Signed Up");
    assert_eq!(requests[3].json().unwrap()["n"], 4, "module state is kept");

    // ValidationError: dead-lettered with its message and the function's stack.
    let letters = f.wait_dead_letters("fn", 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message"]["messageId"], "m2");
    assert_eq!(letters[0]["reason"], "rejected");
    let response = letters[0]["response"].as_str().unwrap();
    assert!(
        response.starts_with("ValidationError: upstream refused: no such event"),
        "{response}"
    );
    assert!(response.contains("functions/f.js:13"), "{response}");

    // No onIdentify: skipped, not sent, not an error.
    assert_eq!(f.deliveries("fn", "skipped").await, 1.0);
    assert_eq!(f.deliveries("fn", "ok").await, 2.0);
    assert!(f.deliveries("fn", "retried").await >= 1.0);
}

#[tokio::test]
async fn an_endless_loop_is_retried_and_an_allocation_bomb_dead_lettered() {
    let receiver = Receiver::start().await;
    let script = r#"
var loops = 0;
function onTrack(event) {
  if (event.event === 'Loop' && ++loops === 1) { while (true) {} }
  if (event.event === 'Bomb') { const a = []; for (;;) a.push('x'.repeat(65536) + a.length); }
  return fetch('https://api.example.com/done', { method: 'POST', body: event.messageId });
}
"#;
    let f = start(
        script,
        &receiver,
        "timeout = \"300ms\"\nmemory_limit = 8388608",
    );
    f.send_batch(json!([
        {"type": "track", "userId": "u1", "event": "Loop", "messageId": "loop"},
        {"type": "track", "userId": "u2", "event": "Bomb", "messageId": "bomb"},
        {"type": "track", "userId": "u3", "event": "After", "messageId": "after"},
    ]))
    .await;
    f.wait_settled("fn").await;
    let mut bodies: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| String::from_utf8(r.body.clone()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["after", "loop"]);
    assert!(f.deliveries("fn", "retried").await >= 1.0);
    let letters = f.dead_letters("fn").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message"]["messageId"], "bomb");
    let response = letters[0]["response"].as_str().unwrap();
    assert!(response.contains("out of memory"), "{response}");

    // The server goes on serving.
    f.send_batch(
        json!([{"type": "track", "userId": "u1", "event": "Later", "messageId": "later"}]),
    )
    .await;
    let requests = receiver
        .wait_until(Duration::from_secs(10), |requests| requests.len() == 3)
        .await;
    assert_eq!(requests.len(), 3);
}

#[tokio::test]
async fn a_fetch_to_a_loopback_host_not_listed_is_refused() {
    let receiver = Receiver::start().await;
    let script = format!(
        "async function onTrack(e) {{ await fetch('{}'); }}",
        receiver.url("/direct")
    );
    let f = start(&script, &receiver, "");
    f.send_batch(json!([{"type": "track", "userId": "u1", "event": "A", "messageId": "a"}]))
        .await;
    let letters = f.wait_dead_letters("fn", 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let response = letters[0]["response"].as_str().unwrap();
    assert!(response.contains("loopback or private"), "{response}");
    assert!(receiver.requests().is_empty());
}

#[test]
fn check_names_the_file_and_line_of_a_syntax_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(
        tmp.path().join("functions/f.js"),
        "x = 1;\nfunction onTrack(e) {\n  return ) ;\n}\n",
    )
    .unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n\
         [[destinations]]\nname = \"fn\"\nkind = \"function\"\nfile = \"functions/f.js\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("destinations[0].file"), "{stderr}");
    assert!(stderr.contains("functions/f.js:3: SyntaxError"), "{stderr}");
}

#[tokio::test]
async fn an_insert_function_changes_drops_and_fails_messages_keeping_their_order() {
    let receiver = Receiver::start().await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(
        tmp.path().join("functions/clean.js"),
        r#"
seen = 0;
flaked = false;
function onTrack(event) {
  if (event.event === 'Internal') return null;
  if (event.event === 'Flaky' && !flaked) { flaked = true; throw new RetryError('later'); }
  if (event.event === 'Broken') throw new InvalidEventPayload('no amount');
  event.properties = event.properties || {};
  event.properties.seen = ++seen;
  delete event.context;
  return event;
}
"#,
    )
    .unwrap();
    let section = format!(
        "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         payload = \"message\"\ninsert_function = \"functions/clean.js\"\n\
         retry = {{ initial_backoff = \"100ms\", max_backoff = \"300ms\" }}\n",
        receiver.url("/hook")
    );
    let f = Fanout::start_in(tmp, Settings::default().section(&section));
    let track = |id: &str, event: &str| {
        json!({"type": "track", "userId": "u1", "event": event, "messageId": id,
               "context": {"ip": "10.0.0.1"}})
    };
    f.send_batch(json!([
        track("t1", "Viewed"),
        track("t2", "Internal"),
        track("t3", "Broken"),
        {"type": "identify", "userId": "u1", "messageId": "i1"},
        track("t4", "Paid"),
        track("t5", "Flaky"),
    ]))
    .await;
    f.wait_settled("hook").await;
    let messages = receiver.messages();
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap())
        .collect();
    // t5 threw RetryError once: tried again, then sent.
    assert_eq!(ids, ["t1", "t4", "t5"], "the user's order is kept");
    let retried = f
        .stderr()
        .iter()
        .any(|l| l.contains("insert function failed; will retry"));
    assert!(retried);
    assert_eq!(messages[0]["properties"]["seen"], 1);
    assert_eq!(messages[2]["properties"]["seen"], 3);
    assert!(messages[0].get("context").is_none(), "{}", messages[0]);
    let letters = f.dead_letters("hook").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message"]["messageId"], "t3");
    assert_eq!(letters[0]["reason"], "insert_function");
    let response = letters[0]["response"].as_str().unwrap();
    assert!(
        response.starts_with("InvalidEventPayload: no amount"),
        "{response}"
    );
    let skipped = f
        .metric(
            "fanout_deliveries_total",
            &[("destination", "hook"), ("outcome", "skipped")],
        )
        .await;
    assert_eq!(skipped, Some(2.0), "t2 (null) and i1 (no onIdentify)");
    // The file destination without one gets every message unchanged.
    let all = f.wait_delivered(6).await;
    assert_eq!(all.len(), 6);
    assert_eq!(all[0]["context"]["ip"], "10.0.0.1");
}

#[tokio::test]
async fn a_reload_runs_the_changed_file_and_refuses_a_syntax_error() {
    let receiver = Receiver::start().await;
    let version = |n: u32| {
        format!(
            "async function onTrack(e) {{ await fetch('https://api.example.com/v{n}', \
             {{ method: 'POST', body: e.messageId }}); }}"
        )
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("functions")).unwrap();
    std::fs::write(dir.join("functions/f.js"), version(1)).unwrap();
    let section = format!(
        "[[destinations]]\nname = \"fn\"\nkind = \"function\"\nfile = \"functions/f.js\"\n\
         fetch_hosts = {{ \"api.example.com\" = \"http://127.0.0.1:{}\" }}\n",
        receiver.port()
    );
    let settings = Settings::default()
        .section(&section)
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", "fn-admin-token");
    let f = Fanout::start_in(tmp, settings);
    let track =
        |id: &str| json!([{"type": "track", "userId": "u1", "event": "A", "messageId": id}]);
    f.send_batch(track("a")).await;
    f.wait_settled("fn").await;

    std::fs::write(dir.join("functions/f.js"), version(2)).unwrap();
    let (status, body) = common::post_reload(&f, "fn-admin-token", "").await;
    assert_eq!(status, 200, "{body}");
    f.send_batch(track("b")).await;
    let requests = receiver
        .wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    let paths: Vec<String> = requests.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1", "/v2"]);

    std::fs::write(
        dir.join("functions/f.js"),
        "function onTrack(e) {\n  return ) ;\n}",
    )
    .unwrap();
    let (status, body) = common::post_reload(&f, "fn-admin-token", "").await;
    assert_ne!(status, 200, "{body}");
    assert!(
        body.to_string().contains("functions/f.js:2: SyntaxError"),
        "{body}"
    );
    // The running function is the last good one.
    f.send_batch(track("c")).await;
    let requests = receiver
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].path, "/v2");
}

/// What an insert function returns is stored output like any message: one line each,
/// even when it puts line separators in (serde_json writes U+2028/2029 raw).
#[tokio::test]
async fn what_an_insert_function_returns_stays_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(
        tmp.path().join("functions/note.js"),
        "function onTrack(event) { event.properties = { note: 'a\\u2028b\\u2029c\\u0085d' }; return event; }\n",
    )
    .unwrap();
    let path = tmp.path().join("noted.jsonl");
    let section = format!(
        "[[destinations]]\nname = \"noted\"\nkind = \"file\"\npath = \"{}\"\n\
         insert_function = \"functions/note.js\"\n",
        path.display()
    );
    let f = Fanout::start_in(tmp, Settings::default().section(&section));
    let track = |id: &str| json!({"type": "track", "userId": "u1", "event": "E", "messageId": id});
    f.send_batch(json!([track("n1"), track("n2")])).await;
    let lines = common::wait_file_lines(&path, 2).await;
    f.wait_settled("noted").await;
    let raw = std::fs::read_to_string(&path).unwrap();
    assert_eq!(raw.lines().count(), 2, "{raw:?}");
    assert!(!raw.contains(['\u{2028}', '\u{2029}', '\u{85}']), "{raw:?}");
    assert_eq!(lines[0]["properties"]["note"], "a\u{2028}b\u{2029}c\u{85}d");
}

/// A source function: a Stripe-like webhook turned into an identify and a track, and one
/// way out per `?mode=`.
const WEBHOOK: &str = r#"
function onRequest(request, settings) {
  const mode = request.url.searchParams.get('mode');
  if (mode === 'invalid') throw new ValidationError('no customer in the webhook');
  if (mode === 'unsupported') throw new EventNotSupported('ping is not supported');
  if (mode === 'loop') { for (;;) {} }
  if (mode === 'throw') { const missing = null; return missing.id; }
  if (mode === 'bad') {
    Segment.track({ userId: 'u1', event: 'Fine' });
    Segment.track({ userId: 'u1', event: 'Broken', properties: 'not an object' });
    return;
  }
  const body = request.json();
  const invoice = body.data.object;
  Segment.identify({ userId: invoice.customer, traits: { email: invoice.customer_email } });
  Segment.track({
    userId: invoice.customer,
    event: 'Invoice Paid',
    properties: { amount: invoice.amount_paid / 100, kind: body.type,
                  signature: request.headers.get('Stripe-Signature'), account: settings.account },
  });
  Segment.set({ collection: 'invoices', id: invoice.id, properties: {} });
}
"#;

/// fanout whose `test` source runs `WEBHOOK`, its `account` setting from the environment.
fn start_source_function() -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(tmp.path().join("functions/stripe.js"), WEBHOOK).unwrap();
    let settings = Settings::default()
        .source(
            "function = \"functions/stripe.js\"\n\
             function_settings = { account_env = \"STRIPE_ACCOUNT\" }",
        )
        .env("STRIPE_ACCOUNT", "acct_42");
    Fanout::start_in(tmp, settings)
}

fn webhook(f: &Fanout, query: &str) -> reqwest::RequestBuilder {
    common::client().post(f.url(&format!("/v1/functions/{}{query}", common::WRITE_KEY)))
}

#[tokio::test]
async fn a_source_function_turns_a_webhook_into_messages_of_its_source() {
    let f = start_source_function();
    let stripe = json!({
        "id": "evt_1", "type": "invoice.paid",
        "data": { "object": { "id": "in_1", "customer": "cus_9",
                              "customer_email": "ada@example.com", "amount_paid": 4200 } }
    });
    let response = webhook(&f, "")
        .header("Stripe-Signature", "t=1,v1=abc")
        .json(&stripe)
        .send()
        .await
        .unwrap();
    assert_success(response).await;
    let delivered = f.wait_delivered(2).await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    let identify = delivered.iter().find(|m| m["type"] == "identify").unwrap();
    assert_eq!(identify["userId"], "cus_9");
    assert_eq!(identify["traits"]["email"], "ada@example.com");
    let track = delivered.iter().find(|m| m["type"] == "track").unwrap();
    assert_eq!(track["event"], "Invoice Paid");
    assert_eq!(track["properties"]["amount"], 42);
    assert_eq!(track["properties"]["kind"], "invoice.paid");
    assert_eq!(track["properties"]["signature"], "t=1,v1=abc");
    assert_eq!(track["properties"]["account"], "acct_42");
    // Ingested as a batch of the source: a messageId and receivedAt each.
    for m in &delivered {
        assert!(
            m["messageId"].as_str().is_some_and(|id| !id.is_empty()),
            "{m}"
        );
        assert!(m["receivedAt"].is_string(), "{m}");
    }

    // Basic auth names the source too, whatever the path's key.
    let response = common::client()
        .post(f.url("/v1/functions/not-a-key"))
        .header("Authorization", common::basic(common::WRITE_KEY))
        .json(&stripe)
        .send()
        .await
        .unwrap();
    assert_success(response).await;
    assert_eq!(f.wait_delivered(4).await.len(), 4);
}

#[tokio::test]
async fn a_source_function_answers_each_way_it_can_end() {
    let f = start_source_function();
    let body = common::expect_error(
        webhook(&f, "?mode=invalid")
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "validation_error",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no customer in the webhook"), "{body}");

    // GET too, for senders that use it.
    common::expect_error(
        common::client()
            .get(f.url(&format!("/v1/functions/{}?mode=invalid", common::WRITE_KEY)))
            .send()
            .await
            .unwrap(),
        400,
        "validation_error",
    )
    .await;

    common::expect_error(
        webhook(&f, "?mode=unsupported")
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "event_not_supported",
    )
    .await;

    // The batch path's own error, naming the emitted message; nothing of it is stored.
    let body = common::expect_error(
        webhook(&f, "?mode=bad").body("{}").send().await.unwrap(),
        400,
        "invalid_field",
    )
    .await;
    assert_eq!(body["error"]["index"], 1, "{body}");
    assert_eq!(body["error"]["field"], "properties", "{body}");

    common::expect_error(
        webhook(&f, "?mode=throw").body("{}").send().await.unwrap(),
        500,
        "internal",
    )
    .await;

    common::expect_error(
        webhook(&f, "?mode=loop").body("{}").send().await.unwrap(),
        504,
        "function_timeout",
    )
    .await;
    // The function's thread and the server go on.
    common::expect_error(
        webhook(&f, "?mode=invalid")
            .body("{}")
            .send()
            .await
            .unwrap(),
        400,
        "validation_error",
    )
    .await;
    assert_success(
        f.post("/v1/track")
            .json(&json!({"userId": "u", "event": "E"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let delivered = f.wait_delivered(1).await;
    assert_eq!(delivered.len(), 1, "only the plain track: {delivered:?}");
    assert_eq!(delivered[0]["event"], "E");
}

#[tokio::test]
async fn a_source_function_refuses_an_unknown_key() {
    let f = start_source_function();
    common::expect_error(
        common::client()
            .post(f.url("/v1/functions/wk_unknown"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
}

#[test]
fn check_names_the_file_and_line_of_a_source_functions_syntax_error() {
    let stderr = check_refuses_source_function(
        "function onRequest(request) {\n  Segment.track({ ;\n}\n",
        "",
    );
    assert!(stderr.contains("sources[0].function"), "{stderr}");
    assert!(
        stderr.contains("functions/src.js:2: SyntaxError"),
        "{stderr}"
    );
}

#[test]
fn check_names_a_source_functions_setting_whose_variable_is_unset() {
    let stderr = check_refuses_source_function(
        "function onRequest(request, settings) {}\n",
        "function_settings = { api_key_env = \"FANOUT_TEST_UNSET_API_KEY\" }\n",
    );
    assert!(
        stderr.contains("sources[0].function_settings")
            && stderr.contains("FANOUT_TEST_UNSET_API_KEY"),
        "{stderr}"
    );
}

/// `fanout check` on a source running `script` (as functions/src.js) with `extra` keys;
/// it must refuse the config. Returns what it said.
fn check_refuses_source_function(script: &str, extra: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(tmp.path().join("functions/src.js"), script).unwrap();
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\
             function = \"functions/src.js\"\n{extra}"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("FANOUT_TEST_UNSET_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    stderr
}

/// `fanout fn test` on `script` (as f.js) with `input` (as input.json) and `args` after
/// the file; its exit code and each line it printed, as JSON.
fn fn_test(script: &str, input: &Value, args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f.js"), script).unwrap();
    std::fs::write(tmp.path().join("input.json"), input.to_string()).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command.current_dir(tmp.path()).args(["fn", "test", "f.js"]);
    for arg in args {
        command.arg(arg.replace("INPUT", "input.json"));
    }
    let out = command.output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), lines, stderr)
}

#[test]
fn fn_test_prints_what_an_event_handler_returned() {
    let script = "function onTrack(event, settings) {\n\
                  event.properties.plan = settings.plan;\n  return event;\n}\n";
    let message = json!({"type": "track", "event": "Signed Up", "userId": "u1", "properties": {}});
    let (code, lines, stderr) = fn_test(
        script,
        &message,
        &["--event", "INPUT", "--settings", "plan=pro"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["returned"]["properties"]["plan"], "pro");
    assert_eq!(lines[0]["returned"]["event"], "Signed Up");
}

#[test]
fn fn_test_prints_what_a_source_function_emitted() {
    let script = "async function onRequest(request, settings) {\n\
                  const body = request.json();\n\
                  Segment.track({ event: body.kind, userId: body.user,\n\
                    properties: { source: request.headers.get('x-from') } });\n}\n";
    let request = json!({
        "method": "POST", "url": "https://hooks.example.com/in?x=1",
        "headers": {"x-from": "stripe"}, "body": {"kind": "Charge Succeeded", "user": "u9"}
    });
    let (code, lines, stderr) = fn_test(script, &request, &["--request", "INPUT"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let emitted = &lines[0]["emitted"];
    assert_eq!(emitted["type"], "track");
    assert_eq!(emitted["event"], "Charge Succeeded");
    assert_eq!(emitted["userId"], "u9");
    assert_eq!(emitted["properties"]["source"], "stripe");
}

#[test]
fn fn_test_prints_what_a_handler_threw_and_exits_1() {
    let script = "function onIdentify(event) {\n  throw new ValidationError('no email');\n}\n";
    let message = json!({"type": "identify", "userId": "u1"});
    let (code, lines, stderr) = fn_test(script, &message, &["--event", "INPUT"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["threw"]["name"], "ValidationError");
    assert_eq!(lines[0]["threw"]["message"], "no email");
    assert!(lines[0]["threw"]["stack"]
        .as_str()
        .unwrap()
        .contains("f.js:2"));
}

#[test]
fn fn_test_refuses_bad_arguments_with_exit_2() {
    let message = json!({"type": "nope"});
    let (code, _, stderr) = fn_test("function onTrack(e) {}\n", &message, &["--event", "INPUT"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`type`"), "{stderr}");
    let track = json!({"type": "track"});
    let (code, _, stderr) = fn_test("", &track, &["--event", "INPUT", "--settings", "novalue"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("KEY=VALUE"), "{stderr}");
}

/// `fn_test` on a blocking thread, so that a receiver in this runtime can answer it.
async fn fn_test_beside(
    script: String,
    input: Value,
    args: Vec<String>,
) -> (Option<i32>, Vec<Value>, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fn_test(&script, &input, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fn_test_prints_each_fetch_with_where_it_went_and_how_it_ended() {
    let receiver = Receiver::start().await;
    receiver.push_reply(Reply::status(201));
    let script = format!(
        "async function onTrack(event) {{\n\
           const a = await fetch('https://api.example.com/hook?x=1', {{ method: 'post', body: 'hi' }});\n\
           const b = await fetch(new Request('{direct}'));\n\
           try {{ await fetch('https://blocked.example.com/'); }} catch (e) {{}}\n\
           try {{ await fetch('http://127.0.0.1:1/closed'); }} catch (e) {{}}\n\
           return [a.status, b.status];\n\
         }}\n",
        direct = receiver.url("/direct")
    );
    let remap = format!("api.example.com={}", receiver.url("/base"));
    let args = [
        "--event",
        "INPUT",
        "--allow-host",
        "127.0.0.1",
        "--fetch-host",
        &remap,
    ];
    let message = json!({"type": "track", "userId": "u1", "event": "E"});
    let (code, lines, stderr) = fn_test_beside(
        script,
        message,
        args.iter().map(|a| a.to_string()).collect(),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(
        lines[0],
        json!({"fetched": {"method": "POST", "url": "https://api.example.com/hook?x=1",
                           "sent_to": receiver.url("/base/hook?x=1"), "status": 201}})
    );
    assert_eq!(
        lines[1],
        json!({"fetched": {"method": "GET", "url": receiver.url("/direct"), "status": 200}})
    );
    let refused = &lines[2]["fetched"];
    assert_eq!(refused["url"], "https://blocked.example.com/");
    assert!(
        refused["refused"]
            .as_str()
            .unwrap()
            .contains("not in allow_hosts"),
        "{refused}"
    );
    let failed = &lines[3]["fetched"];
    assert_eq!(failed["url"], "http://127.0.0.1:1/closed");
    assert!(
        failed["error"].as_str().unwrap().contains("cannot connect"),
        "{failed}"
    );
    assert_eq!(lines[4], json!({"returned": [201, 200]}));
    let paths: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/base/hook", "/direct"]);

    // A source function's fetches come before what it emitted; a throw still shows them.
    let script = "async function onRequest(request) {\n\
                    const r = await fetch('https://api.example.com/lookup');\n\
                    Segment.track({ userId: 'u', event: 'Looked Up', properties: { status: r.status } });\n\
                    throw new RetryError('later');\n\
                  }\n";
    let request = json!({"method": "POST", "url": "https://hooks.example.com/in", "body": "{}"});
    let args = ["--request", "INPUT", "--fetch-host", &remap];
    let (code, lines, stderr) = fn_test_beside(
        script.to_string(),
        request,
        args.iter().map(|a| a.to_string()).collect(),
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["fetched"]["sent_to"], receiver.url("/base/lookup"));
    assert_eq!(lines[0]["fetched"]["status"], 200);
    assert_eq!(lines[1]["threw"]["name"], "RetryError");
}

#[test]
fn fn_test_refuses_a_fetch_host_that_is_not_an_http_url() {
    let message = json!({"type": "track"});
    let (code, _, stderr) = fn_test(
        "function onTrack(e) {}\n",
        &message,
        &[
            "--event",
            "INPUT",
            "--fetch-host",
            "api.example.com=ftp://x",
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--fetch-host api.example.com"), "{stderr}");
    let (code, _, stderr) = fn_test(
        "function onTrack(e) {}\n",
        &message,
        &["--event", "INPUT", "--fetch-host", "api.example.com"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("HOST=URL"), "{stderr}");
}

#[tokio::test]
async fn metrics_count_each_functions_calls_by_outcome_and_time_them() {
    let receiver = Receiver::start().await;
    let script = "function onTrack(event) {\n\
                  if (event.event === 'Bad') throw new ValidationError('bad');\n\
                  return event.messageId;\n}\n";
    let f = start(script, &receiver, "");
    f.send_batch(json!([
        {"type": "track", "userId": "u1", "event": "Good", "messageId": "a"},
        {"type": "track", "userId": "u1", "event": "Bad", "messageId": "b"},
        {"type": "track", "userId": "u1", "event": "Good", "messageId": "c"},
    ]))
    .await;
    f.wait_settled("fn").await;
    let calls = |outcome: &'static str| {
        let f = &f;
        async move {
            f.metric(
                "fanout_function_calls_total",
                &[("function", "functions/f.js"), ("outcome", outcome)],
            )
            .await
        }
    };
    assert_eq!(calls("returned").await, Some(2.0));
    assert_eq!(calls("invalid").await, Some(1.0));
    assert_eq!(calls("timeout").await, Some(0.0));
    let timed = f
        .metric(
            "fanout_function_call_duration_seconds_count",
            &[("function", "functions/f.js")],
        )
        .await;
    assert_eq!(timed, Some(3.0));
}
