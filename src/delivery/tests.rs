//! The engine on tokio's paused time, with a fake destination: batching and linger,
//! retries and `Retry-After`, per-user holds, poison isolation, per-message outcomes of a
//! batch (refused, skipped, retried alone), and where the cursor is saved through all of
//! it. Queue, cursors and dead letters are the real ones, in a
//! temporary directory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::time::Instant;

use super::*;
use crate::destinations::{Destination, Outgoing, Refusal, RefusalKind, SendError, Sending};
use crate::message::{MessageType, Tag};
use crate::queue::{LocalQueue, QueueWriter, RecordBatch};

/// What the fake destination saw and how it answers.
#[derive(Default)]
struct Fake {
    /// Each send: when (tokio time) and the messages' JSON.
    sent: Mutex<Vec<(Instant, Vec<Value>)>>,
    /// Answers to give first, in order; then every send succeeds, except:
    script: Mutex<VecDeque<Result<u64, SendError>>>,
    /// A batch holding a message with this userId fails (retryable) while set.
    failing_user: Mutex<Option<String>>,
    /// A batch holding a message with this event is refused (400).
    poison_event: Option<String>,
}

struct FakeDestination(Arc<Fake>);

impl Destination for FakeDestination {
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        let messages: Vec<Value> = batch
            .iter()
            .map(|m| serde_json::from_slice(m.json).unwrap())
            .collect();
        let fake = &self.0;
        let answer = (|| {
            if let Some(answer) = fake.script.lock().unwrap().pop_front() {
                return answer;
            }
            let failing = fake.failing_user.lock().unwrap().clone();
            if messages
                .iter()
                .any(|m| failing.is_some() && m["userId"] == failing.as_deref().unwrap())
            {
                return Err(retryable(None));
            }
            if let Some(poison) = &fake.poison_event {
                if messages.iter().any(|m| m["event"] == poison.as_str()) {
                    return Err(SendError::Rejected {
                        status: 400,
                        detail: "HTTP 400".into(),
                        answer: Some("poison".into()),
                    });
                }
            }
            Ok(0)
        })();
        fake.sent.lock().unwrap().push((Instant::now(), messages));
        Box::pin(async move { answer })
    }
}

fn retryable(retry_after: Option<Duration>) -> SendError {
    SendError::Retryable {
        status: Some(500),
        retry_after,
        detail: "HTTP 500".into(),
        answer: None,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    queue: Queue,
    log: LocalQueue,
    _writer: QueueWriter,
    deliveries: Deliveries,
    dead_letters: Arc<DeadLetters>,
    fake: Arc<Fake>,
}

/// A queue, and a webhook-shaped destination named `hook` with `extra` config keys
/// whose sends go to the fake.
async fn setup(extra: &str, fake: Fake) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer) = LocalQueue::open(dir.path(), 1 << 20, 1 << 30, Clock::system()).unwrap();
    let queue = Queue::from(log.clone());
    let bounds = crate::queue::dead_letters::Bounds {
        max_bytes: 1 << 30,
        retention: Duration::from_secs(3600),
    };
    let dead_letters = Arc::new(DeadLetters::open_local(dir.path(), bounds).unwrap());
    let clock = Clock::following_tokio(start());
    let mut deliveries = Deliveries::start(
        &[],
        &queue,
        &dead_letters,
        tokio::runtime::Handle::current(),
        clock,
        None,
        super::Privacy::default(),
    )
    .await
    .unwrap();
    let config: DestinationConfig = toml::from_str(&format!(
        "name = \"hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n{extra}"
    ))
    .unwrap();
    let fake = Arc::new(fake);
    let sends = fake.clone();
    deliveries
        .launch_with(&config, |_| Ok(Box::new(FakeDestination(sends))))
        .await
        .unwrap();
    Setup {
        _dir: dir,
        queue,
        log,
        _writer: writer,
        deliveries,
        dead_letters,
        fake,
    }
}

/// The clock's start: wall time in these tests follows tokio's paused clock from it.
fn start() -> DateTime<Utc> {
    "2030-01-01T00:00:00Z".parse().unwrap()
}

impl Setup {
    /// Appends tracks `(userId, event)`, durably; returns the log's end after them.
    async fn append(&self, messages: &[(&str, &str)]) -> u64 {
        let mut batch = RecordBatch::with_capacity(256);
        for (n, (user, event)) in messages.iter().enumerate() {
            let json = serde_json::json!({"type": "track", "userId": user, "event": event, "n": n});
            batch
                .push_with("web", MessageType::Track, |buf| {
                    serde_json::to_writer(&mut *buf, &json).unwrap();
                    Ok::<_, ()>(Tag::default())
                })
                .unwrap();
        }
        self.queue.append(batch).await.unwrap();
        self.log.end()
    }

    /// Bytes between `hook`'s saved cursor and the end of the log.
    fn lag(&self) -> u64 {
        self.queue.lag_bytes("hook").unwrap()
    }

    fn sends(&self) -> Vec<(Instant, Vec<Value>)> {
        self.fake.sent.lock().unwrap().clone()
    }

    /// The events sent, batch by batch.
    fn events(&self) -> Vec<Vec<String>> {
        self.sends()
            .into_iter()
            .map(|(_, batch)| {
                batch
                    .iter()
                    .map(|m| m["event"].as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    }

    async fn stop(self) {
        self.deliveries.stop(Duration::from_secs(5)).await;
    }
}

/// Polls `done` while the engine works: in virtual time (which jumps while the engine's
/// blocking file I/O runs) and bounded in real time.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let real = std::time::Instant::now();
    while !done() {
        assert!(
            real.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_waits_for_linger_then_the_cursor_passes_it() {
    let s = setup(
        "batch = { max_events = 10, linger = \"500ms\" }",
        Fake::default(),
    )
    .await;
    let appended_at = Instant::now();
    s.append(&[("u1", "a"), ("u2", "b"), ("u1", "c")]).await;
    until("one batch", || !s.sends().is_empty()).await;
    let (sent_at, batch) = s.sends()[0].clone();
    assert_eq!(batch.len(), 3, "the three messages in one batch");
    assert!(
        sent_at - appended_at >= Duration::from_millis(500),
        "sent after {:?}, before its linger ran out",
        sent_at - appended_at
    );
    until("the cursor at the end", || s.lag() == 0).await;
    assert_eq!(s.sends().len(), 1, "nothing sent twice");
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_keeps_the_cursor_until_it_is_delivered() {
    let fake = Fake::default();
    fake.script
        .lock()
        .unwrap()
        .extend([Err(retryable(None)), Err(retryable(None))]);
    let s = setup(
        "batch = { linger = \"0s\" }\nretry = { initial_backoff = \"1s\", max_backoff = \"1s\" }",
        fake,
    )
    .await;
    let end = s.append(&[("u1", "a"), ("u2", "b")]).await;
    until("the first attempt", || !s.sends().is_empty()).await;
    assert_eq!(
        s.lag(),
        end,
        "nothing settled: the cursor stays at the start"
    );
    until("delivered at the third attempt", || s.sends().len() == 3).await;
    until("the cursor at the end", || s.lag() == 0).await;
    let attempts = s.events();
    assert!(attempts.iter().all(|a| a == &["a", "b"]), "{attempts:?}");
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_holds_the_next_attempt() {
    let fake = Fake::default();
    fake.script
        .lock()
        .unwrap()
        .push_back(Err(retryable(Some(Duration::from_secs(5)))));
    let s = setup(
        "batch = { linger = \"0s\" }\nretry = { initial_backoff = \"10ms\", max_backoff = \"10ms\" }",
        fake,
    ).await;
    s.append(&[("u1", "a")]).await;
    until("two attempts", || s.sends().len() == 2).await;
    let sends = s.sends();
    assert!(
        sends[1].0 - sends[0].0 >= Duration::from_secs(5),
        "tried again after {:?}",
        sends[1].0 - sends[0].0
    );
    until("the cursor at the end", || s.lag() == 0).await;
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_user_holds_only_itself_and_the_cursor_stays_at_it() {
    let fake = Fake::default();
    *fake.failing_user.lock().unwrap() = Some("stuck".into());
    let s = setup(
        "batch = { max_events = 1, linger = \"0s\" }\n\
         retry = { initial_backoff = \"100ms\", max_backoff = \"100ms\" }",
        fake,
    )
    .await;
    let end = s
        .append(&[
            ("stuck", "s1"),
            ("free", "f1"),
            ("stuck", "s2"),
            ("free", "f2"),
        ])
        .await;
    let delivered = |s: &Setup| {
        let failing = s.fake.failing_user.lock().unwrap().is_some();
        s.events()
            .into_iter()
            .filter(|batch| !failing || !batch.iter().any(|e| e.starts_with('s')))
            .flatten()
            .collect::<Vec<_>>()
    };
    until("the free user's messages", || delivered(&s) == ["f1", "f2"]).await;
    // s2 waits behind s1, which keeps failing: it was never sent.
    assert!(s.events().iter().flatten().all(|e| e != "s2"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        s.lag(),
        end,
        "the cursor stays at the first unsettled message (s1)"
    );
    *s.fake.failing_user.lock().unwrap() = None;
    until("the cursor at the end", || s.lag() == 0).await;
    let stuck: Vec<String> = s
        .events()
        .into_iter()
        .flatten()
        .filter(|e| e.starts_with('s'))
        .collect();
    assert_eq!(
        stuck.last().map(String::as_str),
        Some("s2"),
        "s2 after s1: {stuck:?}"
    );
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_message_is_dead_lettered_alone_and_the_cursor_passes_it() {
    let fake = Fake {
        poison_event: Some("poison".into()),
        ..Fake::default()
    };
    let s = setup("batch = { max_events = 10, linger = \"0s\" }", fake).await;
    s.append(&[("u1", "ok1"), ("u2", "poison"), ("u3", "ok2")])
        .await;
    until("the cursor at the end", || s.lag() == 0).await;
    let delivered: Vec<String> = s
        .events()
        .into_iter()
        .filter(|batch| !batch.iter().any(|e| e == "poison"))
        .flatten()
        .collect();
    assert_eq!(delivered, ["ok1", "ok2"]);
    let letters = s
        .dead_letters
        .list(Some("hook"), 0, 10)
        .await
        .unwrap()
        .dead_letters;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "rejected");
    assert_eq!(letters[0].response, "poison");
    // Wall time came from the clock, which follows tokio's paused time from 2030 (the
    // day only: paused time runs on by itself while the test waits on blocking I/O).
    assert!(
        letters[0].dead_at.starts_with("2030-01-01T"),
        "{}",
        letters[0].dead_at
    );
    assert!(letters[0].message.get().contains("poison"));
    s.stop().await;
}

/// The destination's answer settling messages `(index, kind)` of a batch on their own.
fn partly(outcomes: &[(usize, RefusalKind)]) -> Result<u64, SendError> {
    Err(SendError::PartlyRejected {
        refused: outcomes
            .iter()
            .map(|&(index, kind)| Refusal {
                index,
                kind,
                status: Some(500),
                detail: format!("message {index}"),
                answer: Some(format!("answer for {index}")),
            })
            .collect(),
    })
}

const RETRY: RefusalKind = RefusalKind::Retry { retry_after: None };

async fn dead_letters(s: &Setup) -> Vec<crate::queue::dead_letters::DeadLetter> {
    s.dead_letters
        .list(Some("hook"), 0, 10)
        .await
        .unwrap()
        .dead_letters
}

#[tokio::test(start_paused = true)]
async fn each_message_of_a_batch_settles_as_told_and_only_retried_ones_go_again() {
    let fake = Fake::default();
    fake.script.lock().unwrap().push_back(partly(&[
        (0, RefusalKind::Refused),
        (1, RefusalKind::Skipped { reason: "not_here" }),
        (
            3,
            RefusalKind::Retry {
                retry_after: Some(Duration::from_secs(5)),
            },
        ),
    ]));
    let s = setup(
        "batch = { max_events = 10, linger = \"0s\" }\n\
         retry = { initial_backoff = \"10ms\", max_backoff = \"10ms\" }",
        fake,
    )
    .await;
    s.append(&[("u1", "a"), ("u2", "b"), ("u3", "c"), ("u4", "d")])
        .await;
    until("the cursor at the end", || s.lag() == 0).await;
    assert_eq!(s.events(), [vec!["a", "b", "c", "d"], vec!["d"]]);
    let sends = s.sends();
    assert!(
        sends[1].0 - sends[0].0 >= Duration::from_secs(5),
        "a message's Retry-After holds its retry; tried again after {:?}",
        sends[1].0 - sends[0].0
    );
    let letters = dead_letters(&s).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "rejected");
    assert_eq!(letters[0].response, "answer for 0");
    assert!(letters[0].message.get().contains("\"a\""));
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn messages_retried_alone_are_dead_lettered_when_out_of_attempts() {
    let fake = Fake::default();
    // The retry sends [b] alone: its index there is 0.
    fake.script
        .lock()
        .unwrap()
        .extend([partly(&[(1, RETRY)]), partly(&[(0, RETRY)])]);
    let s = setup(
        "batch = { max_events = 10, linger = \"0s\" }\n\
         retry = { initial_backoff = \"10ms\", max_backoff = \"10ms\", max_attempts = 2 }",
        fake,
    )
    .await;
    s.append(&[("u1", "a"), ("u2", "b"), ("u3", "c")]).await;
    until("the cursor at the end", || s.lag() == 0).await;
    assert_eq!(s.events(), [vec!["a", "b", "c"], vec!["b"]]);
    let letters = dead_letters(&s).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "retries_exhausted");
    assert_eq!(letters[0].attempts, 2);
    assert_eq!(letters[0].response, "answer for 0");
    assert!(letters[0].message.get().contains("\"b\""));
    s.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_users_later_message_waits_for_its_retried_one() {
    let fake = Fake::default();
    fake.script.lock().unwrap().push_back(partly(&[(0, RETRY)]));
    let s = setup(
        "batch = { max_events = 2, linger = \"0s\" }\n\
         retry = { initial_backoff = \"1s\", max_backoff = \"1s\" }",
        fake,
    )
    .await;
    s.append(&[("u1", "a1"), ("u2", "b1"), ("u1", "a2"), ("u3", "c1")])
        .await;
    until("the cursor at the end", || s.lag() == 0).await;
    let sent: Vec<String> = s.events().into_iter().flatten().collect();
    let of_u1: Vec<&str> = sent
        .iter()
        .map(String::as_str)
        .filter(|e| e.starts_with('a'))
        .collect();
    assert_eq!(of_u1, ["a1", "a1", "a2"], "sends: {:?}", s.events());
    assert_eq!(
        sent.iter().filter(|e| *e == "b1").count(),
        1,
        "b1 was delivered; not sent again: {:?}",
        s.events()
    );
    s.stop().await;
}
