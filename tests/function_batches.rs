//! `kind = "function"` with batches, run by a real fanout process against a real receiver
//! on loopback (`api.example.com` mapped to it with `fetch_hosts`): `onBatch` settling
//! each event by the status it returns (delivered, retried alone, dead-lettered), `onBatch`
//! throwing, a thrown `EventNotSupported` counted as skipped, and per-message handlers in
//! a batch whose retried message does not send the delivered ones again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{Fanout, Settings};
use serde_json::{json, Value};

/// Batches of up to 10 messages: the few of one `/v1/batch` go together.
const BATCHED: &str = "batch = { max_events = 10, linger = \"300ms\" }";

/// fanout with destination `fn` running `script`, `extra` keys added to it.
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
    Fanout::start_in(tmp, Settings::default().section(&section))
}

fn tracks(ids: &[(&str, &str)]) -> Value {
    ids.iter()
        .map(|(user, id)| json!({"type": "track", "userId": user, "event": "E", "messageId": id}))
        .collect()
}

/// Each request's `id` and `size` (of the batch the function was called with) and the
/// status the receiver gave it.
fn seen(receiver: &Receiver) -> Vec<(String, u64, u16)> {
    receiver
        .requests()
        .iter()
        .map(|r| {
            let body = r.json().unwrap();
            let id = body["id"].as_str().unwrap().to_string();
            (id, body["size"].as_u64().unwrap_or(0), r.status)
        })
        .collect()
}

fn expected(rows: &[(&str, u64, u16)]) -> Vec<(String, u64, u16)> {
    rows.iter()
        .map(|&(id, size, status)| (id.to_string(), size, status))
        .collect()
}

/// Posts each event on its own and answers with the receiver's status per event.
const PER_EVENT_STATUSES: &str = r#"
async function onBatch(events, settings) {
  const results = [];
  for (const e of events) {
    const res = await fetch('https://api.example.com/e', {
      method: 'POST',
      body: JSON.stringify({ id: e.messageId, size: events.length }),
    });
    if (res.ok) results.push({ status: res.status });
    else results.push({ status: res.status, errormessage: (await res.json()).error });
  }
  return results;
}
"#;

#[tokio::test]
async fn on_batch_settles_each_event_by_the_status_it_returns() {
    let receiver = Receiver::start().await;
    let m2_seen = AtomicUsize::new(0);
    receiver.respond_with(move |r| match r.json()?["id"].as_str()? {
        "m2" if m2_seen.fetch_add(1, Ordering::SeqCst) == 0 => {
            Some(Reply::json(503, r#"{"error":"busy"}"#))
        }
        "m3" => Some(Reply::json(400, r#"{"error":"bad email"}"#)),
        _ => None,
    });
    let f = start(PER_EVENT_STATUSES, &receiver, BATCHED);
    f.send_batch(tracks(&[("u1", "m1"), ("u2", "m2"), ("u3", "m3")]))
        .await;
    f.wait_settled("fn").await;

    // One call with the three; then m2 alone: m1 (delivered) is not sent again, nor m3.
    assert_eq!(
        seen(&receiver),
        expected(&[
            ("m1", 3, 200),
            ("m2", 3, 503),
            ("m3", 3, 400),
            ("m2", 1, 200)
        ])
    );
    let letters = f.dead_letters("fn").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message"]["messageId"], "m3");
    assert_eq!(letters[0]["reason"], "rejected");
    assert_eq!(letters[0]["status"], 400);
    assert_eq!(letters[0]["response"], "bad email");
    assert_eq!(f.deliveries("fn", "ok").await, 2.0);
    assert_eq!(f.deliveries("fn", "dead_lettered").await, 1.0);
    assert_eq!(f.deliveries("fn", "retried").await, 1.0);
}

#[tokio::test]
async fn on_batch_throwing_retry_error_sends_the_whole_batch_again() {
    let receiver = Receiver::start().await;
    receiver.push_reply(Reply::status(500));
    let script = r#"
async function onBatch(events, settings) {
  const res = await fetch('https://api.example.com/batch', {
    method: 'POST',
    body: JSON.stringify({ id: events.map(e => e.messageId).join(','), size: events.length }),
  });
  if (res.status >= 500) throw new RetryError('upstream answered ' + res.status);
}
"#;
    let f = start(script, &receiver, BATCHED);
    f.send_batch(tracks(&[("u1", "m1"), ("u2", "m2"), ("u1", "m3")]))
        .await;
    f.wait_settled("fn").await;
    assert_eq!(
        seen(&receiver),
        expected(&[("m1,m2,m3", 3, 500), ("m1,m2,m3", 3, 200)])
    );
    assert!(f.dead_letters("fn").await.is_empty());
    assert_eq!(f.deliveries("fn", "ok").await, 3.0);
    assert_eq!(f.deliveries("fn", "retried").await, 3.0);
}

#[tokio::test]
async fn on_batch_returning_the_wrong_number_of_statuses_dead_letters_the_batch() {
    let receiver = Receiver::start().await;
    let script = "function onBatch(events) { return [{ status: 200 }]; }";
    let f = start(script, &receiver, BATCHED);
    f.send_batch(tracks(&[("u1", "m1"), ("u2", "m2")])).await;
    let letters = f.wait_dead_letters("fn", 2, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let response = letters[0]["response"].as_str().unwrap();
    assert!(
        response.starts_with("onBatch returned 1 results for 2 events"),
        "{response}"
    );
    assert_eq!(f.deliveries("fn", "ok").await, 0.0);
}

#[tokio::test]
async fn event_not_supported_thrown_by_a_handler_is_counted_skipped() {
    let receiver = Receiver::start().await;
    let script = r#"
async function onTrack(event) {
  if (event.event === 'Ignored') throw new EventNotSupported('not this one');
  await fetch('https://api.example.com/e', { method: 'POST', body: JSON.stringify({ id: event.messageId }) });
}
"#;
    // One message per call (the default), as most destination functions run.
    let f = start(script, &receiver, "");
    let messages = json!([
        {"type": "track", "userId": "u1", "event": "Ignored", "messageId": "m1"},
        {"type": "track", "userId": "u1", "event": "Kept", "messageId": "m2"},
    ]);
    f.send_batch(messages).await;
    f.wait_settled("fn").await;
    assert_eq!(f.deliveries("fn", "skipped").await, 1.0);
    assert_eq!(f.deliveries("fn", "ok").await, 1.0);
    assert_eq!(seen(&receiver), expected(&[("m2", 0, 200)]));
    assert!(f.dead_letters("fn").await.is_empty());
}

#[tokio::test]
async fn a_retried_message_of_a_batch_does_not_send_the_delivered_ones_again() {
    let receiver = Receiver::start().await;
    let m2_seen = AtomicUsize::new(0);
    receiver.respond_with(move |r| {
        (r.json()?["id"] == "m2" && m2_seen.fetch_add(1, Ordering::SeqCst) == 0)
            .then(|| Reply::status(502))
    });
    let script = r#"
async function onTrack(event) {
  const res = await fetch('https://api.example.com/e', {
    method: 'POST', body: JSON.stringify({ id: event.messageId }) });
  if (res.status >= 500) throw new RetryError('upstream answered ' + res.status);
}
"#;
    let f = start(script, &receiver, BATCHED);
    f.send_batch(tracks(&[
        ("u1", "m1"),
        ("u2", "m2"),
        ("u2", "m3"),
        ("u3", "m4"),
    ]))
    .await;
    f.wait_settled("fn").await;
    // m1 went once; m2 again, then what came after it in the batch, in order.
    assert_eq!(
        seen(&receiver),
        expected(&[
            ("m1", 0, 200),
            ("m2", 0, 502),
            ("m2", 0, 200),
            ("m3", 0, 200),
            ("m4", 0, 200)
        ])
    );
    assert_eq!(f.deliveries("fn", "ok").await, 4.0);
    assert!(f.dead_letters("fn").await.is_empty());
}

#[tokio::test]
async fn on_batch_throwing_validation_error_dead_letters_the_batch_in_one_call() {
    let receiver = Receiver::start().await;
    let script = r#"
async function onBatch(events) {
  await fetch('https://api.example.com/calls', {
    method: 'POST', body: JSON.stringify({ id: 'call', size: events.length }) });
  throw new ValidationError('no such list');
}
"#;
    let f = start(script, &receiver, BATCHED);
    f.send_batch(tracks(&[("u1", "m1"), ("u2", "m2")])).await;
    f.wait_settled("fn").await;
    // Not split to find a culprit: the function settled the batch as a whole.
    assert_eq!(seen(&receiver), expected(&[("call", 2, 200)]));
    let letters = f.dead_letters("fn").await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["status"], 400);
        let response = letter["response"].as_str().unwrap();
        assert!(
            response.starts_with("ValidationError: no such list"),
            "{response}"
        );
    }
}
