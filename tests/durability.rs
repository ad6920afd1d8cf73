//! 200 means durable: messages acknowledged before a kill -9 are all delivered after a
//! restart, exactly once in the file destination; a graceful stop finishes in-flight work.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use common::{assert_success, basic, client, Fanout, WRITE_KEY};
use serde_json::json;

/// Sends `requests` batches of `per_request` messages concurrently; ids are `{tag}-{n}`.
async fn send_batches(
    f: &Fanout,
    tag: &str,
    requests: usize,
    per_request: usize,
) -> HashSet<String> {
    let mut handles = Vec::new();
    let mut ids = HashSet::new();
    for r in 0..requests {
        let batch: Vec<_> = (0..per_request)
            .map(|i| {
                let id = format!("{tag}-{}", r * per_request + i);
                ids.insert(id.clone());
                json!({"type": "track", "userId": format!("user-{}", i % 7), "event": "Durable", "messageId": id, "properties": {"r": r, "i": i}})
            })
            .collect();
        let request = f.post("/v1/batch").json(&json!({"batch": batch}));
        handles.push(tokio::spawn(async move {
            assert_success(request.send().await.unwrap()).await
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    ids
}

fn delivered_ids(f: &Fanout) -> Vec<String> {
    f.delivered()
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn kill_9_after_the_last_200_loses_nothing() {
    let mut f = Fanout::start();
    let mut sent = HashSet::new();
    // Several rounds, each killed right after its last 200, often mid-delivery.
    for round in 0..3 {
        sent.extend(send_batches(&f, &format!("round{round}"), 40, 25).await);
        f.kill9();
        f.restart();
    }
    let delivered = f.wait_delivered(sent.len()).await;
    let ids = delivered_ids(&f);
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, sent, "every acknowledged message is delivered");
    assert_eq!(
        ids.len(),
        sent.len(),
        "and the file holds each exactly once"
    );
    assert_eq!(delivered.len(), 3000);
}

#[tokio::test]
async fn torn_queue_tail_is_cut_on_restart() {
    let mut f = Fanout::start();
    let sent = send_batches(&f, "before", 5, 10).await;
    f.wait_delivered(sent.len()).await;
    f.kill9();
    // Half a record, as a crash in the middle of a write leaves it.
    let queue = f.dir().join("data/queue");
    let segment = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{'])
        .unwrap();
    f.restart();
    let more = send_batches(&f, "after", 2, 10).await;
    f.wait_delivered(sent.len() + more.len()).await;
    let ids: HashSet<String> = delivered_ids(&f).into_iter().collect();
    assert_eq!(ids, sent.union(&more).cloned().collect::<HashSet<_>>());
    assert_eq!(f.delivered().len(), 70);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_cleanly() {
    let mut f = Fanout::start();
    let body = serde_json::to_string(&json!({"batch": [{"type": "track", "userId": "u", "event": "in-flight", "messageId": "late-1"}]})).unwrap();
    let (head, tail) = body.split_at(10);
    let mut s = std::net::TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: {}\r\n\r\n{head}", basic(WRITE_KEY), body.len()).as_bytes()).unwrap();
    // The request is in: it holds a slot.
    f.wait_metric("fanout_http_requests_in_flight", &[], |n| n == 1.0)
        .await;
    let pid = f.pid();
    let term = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(term.success());
    // New connections are refused (once the signal is taken) while the old request may
    // finish.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client().get(f.url("/health")).send().await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(tail.as_bytes()).unwrap();
    let (status, answer) = common::read_response(&mut s);
    assert_eq!((status, answer.as_str()), (200, r#"{"success":true}"#));
    drop(s);
    let exit = f.terminate_wait();
    assert!(exit.success(), "{exit:?}");
    f.restart();
    let got = f.wait_delivered(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["messageId"], "late-1");
}

#[tokio::test]
async fn a_second_process_cannot_share_the_data_dir() {
    let f = Fanout::start();
    let config = f.dir().join("config.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another fanout process"),
        "{stderr}"
    );
}
