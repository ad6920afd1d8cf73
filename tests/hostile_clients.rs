//! Clients that hold on to what they get: bodies trickled a byte at a time, headers never
//! finished, idle connections by the hundred, more connections than file descriptors,
//! and a client that sends its whole (too large) body before reading the answer. Each
//! gets a bounded share, and normal clients keep being served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{basic, Fanout, Settings, WRITE_KEY};
use serde_json::json;

async fn track_status(f: &Fanout, id: &str) -> u16 {
    f.post("/v1/track")
        .json(&json!({"userId": "u", "event": "Normal", "messageId": id}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Headers of a POST to /v1/batch declaring `length` bytes of body.
fn post_head(length: usize) -> String {
    format!(
        "POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n",
        basic(WRITE_KEY)
    )
}

/// A connection that sends a POST's headers, then one byte of body every `every` until
/// told to stop or the server closes; returns the answer's status, if any came.
fn trickle(addr: SocketAddr, every: Duration, stop: Arc<AtomicBool>) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    s.write_all(post_head(100_000).as_bytes()).ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(b" ").is_err() {
            break;
        }
        let until = Instant::now() + every;
        while Instant::now() < until {
            match s.read(&mut buf) {
                Ok(0) => return status_of(&answer),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
            if status_of(&answer).is_some() {
                return status_of(&answer);
            }
        }
    }
    status_of(&answer)
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(answer).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_cannot_keep_normal_clients_out() {
    let f = Fanout::start_with(Settings::default().server("max_in_flight = 8"));
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..12)
        .map(|_| {
            let (addr, stop) = (f.addr, stop.clone());
            std::thread::spawn(move || trickle(addr, Duration::from_millis(300), stop))
        })
        .collect();
    // Every slot is held by a body that has been arriving for over a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..20 {
        assert_eq!(
            track_status(&f, &format!("normal-{i}")).await,
            200,
            "request {i}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<Option<u16>> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
    // The slow ones were cut (408) to make room, or refused at once (429).
    assert!(answers.contains(&Some(408)), "{answers:?}");
    assert!(
        answers.iter().all(|a| matches!(a, Some(408 | 429) | None)),
        "{answers:?}"
    );
    assert_eq!(f.wait_delivered(20).await.len(), 20);
}

#[tokio::test]
async fn a_body_that_trickles_steadily_meets_its_deadline() {
    let f = Fanout::start_with(Settings::default().server("body_deadline = \"2s\""));
    let addr = f.addr;
    let started = Instant::now();
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(post_head(1000).as_bytes()).unwrap();
        // A byte every 200 ms: never a gap near body_timeout (30 s).
        let mut writer = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..100 {
                if writer.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        common::read_response(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("body_deadline"), "{body}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
}

/// Whether the server closes `stream` within `within` (a read sees the end).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream
        .set_read_timeout(Some(within + Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

const TRACK: &str = r#"{"userId":"u","event":"E"}"#;

fn track_request() -> String {
    format!(
        "POST /v1/track HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: {}\r\n\r\n{TRACK}",
        basic(WRITE_KEY),
        TRACK.len()
    )
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let f = Fanout::start_with(
        Settings::default().server("header_timeout = \"1s\"\nidle_timeout = \"2s\""),
    );
    let addr = f.addr;
    tokio::task::spawn_blocking(move || {
        // Connected, nothing sent: the headers' clock runs from the connect.
        let mut silent = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut silent, Duration::from_secs(2)));
        assert!(started.elapsed() >= Duration::from_millis(900));

        // Headers a byte at a time: closed as well, however steadily they come.
        let mut slow = TcpStream::connect(addr).unwrap();
        let mut writer = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in "POST /v1/track HTTP/1.1\r\nhost: x\r\nx-pad: "
                .bytes()
                .cycle()
                .take(100)
            {
                if writer.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        assert!(closed_within(&mut slow, Duration::from_secs(2)));

        // Kept alive: a second request after 1.5 s (past the headers' timeout, within
        // the idle one) is served; after 2 s of idling the connection is closed.
        let mut kept = TcpStream::connect(addr).unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        kept.write_all(track_request().as_bytes()).unwrap();
        assert_eq!(common::read_response(&mut kept).0, 200);
        std::thread::sleep(Duration::from_millis(1500));
        kept.write_all(track_request().as_bytes()).unwrap();
        assert_eq!(common::read_response(&mut kept).0, 200);
        let idle_from = Instant::now();
        assert!(closed_within(&mut kept, Duration::from_secs(3)));
        assert!(idle_from.elapsed() >= Duration::from_millis(1900));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_file_limit_leave_room_for_real_clients() {
    // 128 open files: without a cap, 300 idle connections took every descriptor and
    // /health and /v1/track timed out.
    let f = Fanout::start_with(Settings::default().open_files(128));
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(f.addr).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f
        .stderr()
        .iter()
        .any(|l| l.contains("connection cap reached"))
    {
        assert!(Instant::now() < deadline, "the cap was never reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let health = common::client().get(f.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(track_status(&f, "past-the-cap").await, 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = f.stderr();
    assert!(
        log.iter().any(|l| l.contains("connection cap reached")),
        "the cap is logged"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("lowered to fit the open-file limit")),
        "the lowered cap is logged"
    );
    drop(idle);
}

#[tokio::test]
async fn a_client_that_sends_its_whole_body_first_reads_the_413() {
    let f = Fanout::start();
    // Python's urllib writes the whole body before reading the answer. Without a
    // lingering close it saw a broken pipe instead of the 413 (30 MB: far more than
    // the sockets' buffers hold, so the server must read and drop it).
    let script = r#"
import sys, urllib.request, urllib.error
body = b'{"batch":[' + b' ' * (30 * 1024 * 1024) + b']}'
req = urllib.request.Request(sys.argv[1], data=body, method="POST",
    headers={"Authorization": sys.argv[2], "Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=20)
    print("200")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print("error", type(e).__name__, e)
"#;
    let mut python = std::process::Command::new("python3");
    python
        .arg("-c")
        .arg(script)
        .arg(f.url("/v1/batch"))
        .arg(basic(WRITE_KEY));
    let output = tokio::task::spawn_blocking(move || python.output().expect("python3"))
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.starts_with("413 "), "{printed}");
    assert!(printed.contains("request_too_large"), "{printed}");
}
