//! The live view: `GET /debugger/events` (Server-Sent Events) behind the admin token,
//! what it shows of ingest and delivery, its filters, a viewer that does not read losing
//! events (and being told) without slowing ingest, and the `/debugger` page in a real
//! headless Chromium.

mod common;

use std::time::{Duration, Instant};

use common::sse::Sse;
use common::{client, Fanout, Settings, WRITE_KEY};
use serde_json::{json, Value};

const TOKEN: &str = "live-view-admin-token";

fn with_admin() -> Fanout {
    with_admin_settings(TOKEN, "")
}

/// `[admin]` with `token` and the further `lines`.
fn with_admin_settings(token: &str, lines: &str) -> Fanout {
    Fanout::start_with(
        Settings::default()
            .section(&format!(
                "[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n{lines}\n"
            ))
            .env("FANOUT_ADMIN_TOKEN", token),
    )
}

/// `POST /debugger/session` with `token` (and an `Origin`): the `name=value` of the
/// cookie it sets, after checking its attributes.
async fn session_cookie(f: &Fanout, token: &str, origin: Option<&str>) -> String {
    let mut request = client().post(f.url("/debugger/session")).bearer_auth(token);
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 204);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let attributes: Vec<&str> = set.split("; ").collect();
    for wanted in ["Path=/debugger", "HttpOnly", "SameSite=Strict"] {
        assert!(attributes.contains(&wanted), "{set}");
    }
    let secure = origin.is_some_and(|o| o.starts_with("https://"));
    assert_eq!(attributes.contains(&"Secure"), secure, "{set}");
    attributes[0].to_string()
}

#[tokio::test]
async fn the_stream_needs_the_admin_token_in_any_of_three_places() {
    let f = with_admin();
    let url = f.url("/debugger/events");
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(client().get(&url).send().await.unwrap()), 401);
    assert_eq!(
        status(
            client()
                .get(&url)
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap()
        ),
        401
    );
    let cookie = session_cookie(&f, TOKEN, None).await;
    for request in [
        client().get(&url).bearer_auth(TOKEN),
        client().get(format!("{url}?token={TOKEN}")),
        client()
            .get(&url)
            .header("cookie", format!("theme=dark; {cookie}")),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
    }
    let without = Fanout::start();
    let r = client()
        .get(without.url("/debugger/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "no admin token configured: as the other admin routes"
    );
    assert_eq!(
        client()
            .get(without.url("/debugger"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn accepted_delivered_duplicate_and_refused_are_shown() {
    let f = with_admin();
    let mut sse = Sse::open(&f, TOKEN, "").await;
    let track = json!({"type": "track", "messageId": "live-1", "userId": "u", "event": "Live",
                       "properties": {"n": 1}});
    let ok = f.post("/v1/track").json(&track).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    // Both come, in either order: delivery may read the message before ingest has told
    // the view it was stored (the page takes them either way).
    let mut events = sse
        .until(|e| e["kind"] == "delivered" && e["messageId"] == "live-1")
        .await;
    if !events.iter().any(|e| e["kind"] == "accepted") {
        events.extend(sse.until(|e| e["kind"] == "accepted").await);
    }
    let accepted = events
        .iter()
        .find(|e| e["kind"] == "accepted")
        .expect("accepted");
    let delivered = events
        .iter()
        .find(|e| e["kind"] == "delivered")
        .expect("delivered");
    assert_eq!(accepted["messageId"], "live-1");
    assert_eq!(accepted["source"], "test");
    assert_eq!(accepted["type"], "track");
    assert_eq!(accepted["event"], "Live");
    assert_eq!(accepted["message"]["properties"]["n"], 1);
    assert_eq!(delivered["destination"], "out");
    assert_eq!(delivered["payload"]["messageId"], "live-1");

    f.post("/v1/track").json(&track).send().await.unwrap();
    sse.until(|e| e["kind"] == "duplicate" && e["messageId"] == "live-1")
        .await;

    let bad = json!({"type": "track", "userId": "u"});
    let refused = f.post("/v1/track").json(&bad).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let events = sse.until(|e| e["kind"] == "refused").await;
    let refusal = events.last().unwrap();
    assert_eq!(refusal["status"], 400);
    assert_eq!(refusal["field"], "event");
    assert!(!refusal.to_string().contains(WRITE_KEY), "{refusal}");
}

#[tokio::test]
async fn filters_pick_source_destination_and_type() {
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section("[[sources]]\nname = \"elsewhere\"\nwrite_keys = [\"wk_elsewhere\"]\n"),
    );
    let mut identifies = Sse::open(&f, TOKEN, "type=identify&destination=out").await;
    let track = json!({"type": "track", "messageId": "f-1", "userId": "u", "event": "Skip me"});
    let identify = json!({"type": "identify", "messageId": "f-2", "userId": "u", "traits": {}});
    f.post("/v1/track").json(&track).send().await.unwrap();
    f.post("/v1/identify").json(&identify).send().await.unwrap();
    let first = identifies
        .next(Duration::from_secs(10))
        .await
        .expect("an event");
    assert_eq!(first["messageId"], "f-2", "{first}");
    assert_eq!(
        first["kind"], "delivered",
        "only destination events match a destination"
    );
    let mut other_source = Sse::open(&f, TOKEN, "source=elsewhere").await;
    f.post("/v1/track")
        .json(&json!({"type": "track", "messageId": "f-3", "userId": "u", "event": "E"}))
        .send()
        .await
        .unwrap();
    // Then one from `elsewhere`: f-3's events (accepted, delivered) come before this
    // one's, so by its delivery any of them that passed the filter would have shown.
    f.post_as("wk_elsewhere", "/v1/track")
        .json(&json!({"type": "track", "messageId": "f-4", "userId": "u", "event": "E"}))
        .send()
        .await
        .unwrap();
    let seen = other_source
        .until(|e| e["kind"] == "delivered" && e["messageId"] == "f-4")
        .await;
    assert!(seen.iter().all(|e| e["source"] == "elsewhere"), "{seen:#?}");
}

/// A viewer that does not read loses events once it is `admin.viewer_buffer_bytes`
/// behind, and is told how many; ingest meanwhile answers every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_falls_behind_is_told_what_it_lost_and_ingest_goes_on() {
    const RING: usize = 64 * 1024;
    let f = with_admin_settings(TOKEN, &format!("viewer_buffer_bytes = {RING}"));
    let mut slow = Sse::open(&f, TOKEN, "").await;
    // Before the server's ring, the stalled viewer's events fill the sockets between: at
    // most the kernel's largest receive and send buffers (and HTTP buffers far smaller).
    // Twice that and the ring, and it must have lost some, whatever the machine. Each
    // message of ~1.2 KB makes two events that carry it (accepted, delivered): ≥ 2 KiB.
    let sockets = kernel_max("tcp_rmem") + kernel_max("tcp_wmem");
    let batches = (2 * (sockets + RING)).div_ceil(100 * 2048);
    post_padded_batches(&f, "slow", batches, |i| format!("u{i}")).await;
    f.wait_delivered(batches * 100).await;
    let events = slow.until(|e| e["kind"] == "dropped").await;
    let dropped = events.last().unwrap();
    assert!(dropped["count"].as_u64().unwrap() > 0, "{dropped}");
}

/// The most bytes the kernel lets a TCP socket buffer grow to (`tcp_rmem` or `tcp_wmem`,
/// their third field): what autotuning reaches without `SO_RCVBUF`/`SO_SNDBUF`.
fn kernel_max(sysctl: &str) -> usize {
    let path = format!("/proc/sys/net/ipv4/{sysctl}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .nth(2)
        .and_then(|max| max.parse().ok())
        .unwrap_or_else(|| panic!("{path}: {text}"))
}

/// A destination's routing that passes a message over says which rule did.
#[tokio::test]
async fn a_message_routed_elsewhere_is_shown_skipped_with_the_rule() {
    let out = tempfile::tempdir().unwrap();
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section(&format!(
                "[[destinations]]\nname = \"orders\"\nkind = \"file\"\npath = \"{}\"\n\
                 filter = {{ events = [\"Order *\"] }}\n",
                out.path().join("orders.jsonl").display()
            )),
    );
    let mut sse = Sse::open(&f, TOKEN, "destination=orders").await;
    let track =
        json!({"type": "track", "messageId": "not-an-order", "userId": "u", "event": "Viewed"});
    f.post("/v1/track").json(&track).send().await.unwrap();
    let events = sse.until(|e| e["kind"] == "skipped").await;
    let skipped = events.last().unwrap();
    assert_eq!(skipped["messageId"], "not-an-order");
    assert!(
        skipped["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{skipped}"
    );
}

/// A user outside a destination's `sample` is shown skipped, reason `sampled`.
#[tokio::test]
async fn a_user_outside_the_sample_is_shown_skipped_as_sampled() {
    let out = tempfile::tempdir().unwrap();
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section(&format!(
                "[[destinations]]\nname = \"tenth\"\nkind = \"file\"\npath = \"{}\"\n\
                 sample = 0.1\n",
                out.path().join("tenth.jsonl").display()
            )),
    );
    let mut sse = Sse::open(&f, TOKEN, "destination=tenth").await;
    // Of 20 users, a tenth are in the sample: the others are skipped.
    let batch: Vec<Value> = (0..20)
        .map(|n| json!({"type": "identify", "messageId": format!("s{n}"), "userId": format!("user-{n}")}))
        .collect();
    f.send_batch(json!(batch)).await;
    let events = sse.until(|e| e["kind"] == "skipped").await;
    let skipped = events.last().unwrap();
    assert_eq!(skipped["reason"], "sampled", "{skipped}");
}

/// For Klaviyo the live view shows the translated request bodies as the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_klaviyo_outcome_carries_the_translated_bodies() {
    use common::klaviyo::{Klaviyo, API_KEY, BULK, CURRENT, KEY_ENV};
    let k = Klaviyo::start(CURRENT).await;
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section(&format!(
                "[[destinations]]\nname = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\n\
                 base_url = \"{}\"\n",
                k.base_url()
            ))
            .env(KEY_ENV, API_KEY),
    );
    let mut sse = Sse::open(&f, TOKEN, "destination=kl").await;
    let track = json!({"type": "track", "messageId": "kl-live", "userId": "u", "event": "Bought",
                       "properties": {"revenue": 5}});
    f.post("/v1/track").json(&track).send().await.unwrap();
    let events = sse.until(|e| e["kind"] == "delivered").await;
    let payload = &events.last().unwrap()["payload"];
    assert_eq!(payload[0]["path"], BULK, "{payload}");
    let body = payload[0]["body"].to_string();
    assert!(
        body.contains("Bought") && body.contains("kl-live"),
        "{body}"
    );
}

/// `fanout tap` prints the stream as JSON lines, filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_tap_prints_the_stream_as_json_lines() {
    use std::io::BufRead;
    let f = with_admin();
    let mut tap = f.command();
    tap.args(["tap", "--url", &f.url(""), "--type", "identify"])
        .stdout(std::process::Stdio::piped());
    let mut child = tap.spawn().expect("fanout tap");
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .and_then(Result::ok)
    });
    // Until the tap is connected, sends may go unseen: keep sending fresh ones.
    for n in 0..100 {
        let track =
            json!({"type": "track", "messageId": format!("t-{n}"), "userId": "u", "event": "E"});
        let identify =
            json!({"type": "identify", "messageId": format!("i-{n}"), "userId": "u", "traits": {}});
        f.post("/v1/track").json(&track).send().await.unwrap();
        f.post("/v1/identify").json(&identify).send().await.unwrap();
        if first.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = first.await.unwrap().expect("a line from fanout tap");
    let _ = child.kill();
    let _ = child.wait();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "identify", "{event}");
    assert!(event["messageId"].as_str().unwrap().starts_with("i-"));
}

/// The page's cookie comes from `POST /debugger/session` with the token: `HttpOnly`,
/// `SameSite=Strict`, `Secure` when the page was loaded over https, and not the token
/// itself; a wrong token gets none, and a cookie of the token itself is refused.
#[tokio::test]
async fn the_page_s_cookie_is_set_by_the_server_http_only_and_strict() {
    let f = with_admin();
    let plain = session_cookie(&f, TOKEN, Some(&f.url(""))).await;
    let behind_https = session_cookie(&f, TOKEN, Some("https://fanout.example.com")).await;
    assert_eq!(plain, behind_https, "one value for the token");
    assert!(
        plain.starts_with("fanout_admin=") && !plain.contains(TOKEN),
        "{plain}"
    );
    let events = f.url("/debugger/events");
    let with_cookie = |cookie: String| client().get(&events).header("cookie", cookie).send();
    assert_eq!(with_cookie(plain).await.unwrap().status(), 200);
    let raw = with_cookie(format!("fanout_admin={TOKEN}")).await.unwrap();
    assert_eq!(raw.status(), 401);
    let wrong = client()
        .post(f.url("/debugger/session"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
}

/// Past `admin.max_viewers` a new viewer gets 429 with a JSON error naming the setting;
/// once one leaves there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_past_max_viewers_are_refused_with_429() {
    let f = with_admin_settings(TOKEN, "max_viewers = 2");
    let first = Sse::open(&f, TOKEN, "").await;
    let _second = Sse::open(&f, TOKEN, "").await;
    let third = client()
        .get(f.url("/debugger/events"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_viewers", "{body}");
    assert_eq!(body["error"]["field"], "admin.max_viewers", "{body}");
    drop(first);
    // The server learns the first left when writing to it: keep giving it events.
    for n in 0..100 {
        let track = json!({"type": "track", "messageId": format!("mv-{n}"), "userId": "u",
                           "event": "E"});
        f.post("/v1/track").json(&track).send().await.unwrap();
        let again = client()
            .get(f.url("/debugger/events"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        if again.status() == 200 {
            return;
        }
        assert_eq!(again.status(), 429);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no room for a viewer after one left");
}

/// A viewer that does not read (a small receive window, so the sockets between hold
/// little) holds no more than `admin.viewer_buffer_bytes` of events in the server; the
/// rest it loses, which `/metrics` counts and the viewer is told when it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_viewer_holds_at_most_viewer_buffer_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BUDGET: usize = 256 * 1024;
    let f = with_admin_settings(TOKEN, &format!("viewer_buffer_bytes = {BUDGET}"));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = f.url("").trim_start_matches("http://").to_string();
    let mut stalled = socket.connect(address.parse().unwrap()).await.unwrap();
    stalled
        .write_all(
            format!(
                "GET /debugger/events HTTP/1.1\r\nhost: {address}\r\n\
                 authorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // 120 batches of 100 messages of ~1.2 KB: ~30 MB of events, far past the budget and
    // what the server's send buffer (4 MB at most here) and the small window hold.
    post_padded_batches(&f, "stall", 120, |_| "u".to_string()).await;
    f.wait_delivered(12_000).await;
    let f = &f;
    let metric = |name: &'static str| async move {
        f.metric(name, &[])
            .await
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(metric("fanout_live_viewers").await, 1.0);
    let held = metric("fanout_live_buffered_bytes").await;
    // The newest event always stays, whatever its size: a little over, at most.
    assert!(held <= (BUDGET + 8 * 1024) as f64, "{held}");
    // Lost events are counted when the viewer reads again: read until it is told.
    let mut seen = Vec::new();
    let mut piece = vec![0u8; 64 * 1024];
    let told = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut piece))
            .await
            .expect("the stream went quiet before a dropped event")
            .unwrap();
        assert!(n > 0, "the stream ended");
        seen.extend_from_slice(&piece[..n]);
        let text = String::from_utf8_lossy(&seen);
        let marker = "{\"kind\":\"dropped\",\"count\":";
        if let Some(at) = text.find(marker) {
            let digits: String = text[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if text[at + marker.len() + digits.len()..].starts_with('}') {
                break digits.parse::<u64>().unwrap();
            }
        }
        // Keep only the tail a marker could straddle.
        let keep = seen.len().saturating_sub(64);
        seen.drain(..keep);
    };
    assert!(told > 0);
    let lost = metric("fanout_live_events_lost_total").await;
    assert!(lost >= told as f64, "{lost} < {told}");
}

/// A `retried` event names the message's source, as every other event of a message does
/// (the page keys its rows by source and messageId).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_names_its_source() {
    // Nothing listens there: every attempt fails and is retried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section(&format!(
                "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{url}\"\n"
            )),
    );
    let mut sse = Sse::open(&f, TOKEN, "destination=hook").await;
    let track = json!({"type": "track", "messageId": "retry-me", "userId": "u", "event": "E"});
    f.post("/v1/track").json(&track).send().await.unwrap();
    let events = sse.until(|e| e["kind"] == "retried").await;
    let retried = events.last().unwrap();
    assert_eq!(retried["messageId"], "retry-me", "{retried}");
    assert_eq!(retried["source"], "test", "{retried}");
}

/// Runs tests/browser/debugger.cjs on `/debugger#token=<fragment_token>`, sending a
/// track with `message_id(n)` from each of `keys` until `wait_rows` rows show the id
/// being waited for (`wait_for`) with an outcome; the driver's JSON line.
async fn drive_debugger(
    f: &Fanout,
    fragment_token: &str,
    keys: &[&str],
    message_id: impl Fn(u32) -> String,
    wait_for: &str,
    wait_rows: usize,
) -> Value {
    drive_debugger_until(f, fragment_token, keys, message_id, wait_for, wait_rows, "").await
}

/// `drive_debugger`, the driver also waiting for the clicked row's detail to show
/// `wait_detail` (when not empty): outcomes of several destinations arrive one by one.
async fn drive_debugger_until(
    f: &Fanout,
    fragment_token: &str,
    keys: &[&str],
    message_id: impl Fn(u32) -> String,
    wait_for: &str,
    wait_rows: usize,
    wait_detail: &str,
) -> Value {
    let deps = common::required_path("FANOUT_BROWSER_DEPS");
    let chromium = common::required_path("FANOUT_CHROMIUM");
    let shots = tempfile::tempdir().unwrap();
    let screenshot = shots.path().join("debugger.png");
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/debugger.cjs");
    let mut child = std::process::Command::new("node")
        .arg(driver)
        .env("FANOUT_BROWSER_DEPS", &deps)
        .env("FANOUT_CHROMIUM", &chromium)
        .env(
            "PAGE_URL",
            f.url(&format!("/debugger#token={fragment_token}")),
        )
        .env("WAIT_FOR", wait_for)
        .env("WAIT_ROWS", wait_rows.to_string())
        .env("WAIT_DETAIL", wait_detail)
        .env("SCREENSHOT", &screenshot)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run node");
    // Once the page's stream is open ("live"), send until the page has shown them (the
    // driver prints its result then).
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let live = tokio::task::block_in_place(|| lines.recv_timeout(Duration::from_secs(30)));
    let live = live.unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut result = None;
    for n in 0.. {
        if live != "live" {
            break;
        }
        let track = json!({"type": "track", "messageId": message_id(n), "userId": "u",
                           "event": "Seen"});
        for key in keys {
            f.post_as(key, "/v1/track")
                .json(&track)
                .send()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(line) = lines.try_recv() {
            result = Some(line);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    reader.join().unwrap();
    let result = result.or_else(|| lines.try_recv().ok()).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&status.stderr).to_string();
    assert!(
        status.status.success(),
        "driver failed: {live} {result}\n{stderr}"
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 0);
    serde_json::from_str(&result).unwrap_or_else(|_| panic!("{result}\n{stderr}"))
}

/// The page in a real Chromium: opened with the token in its fragment, it shows a message
/// sent afterwards, with its destination's outcome, under a strict Content-Security-Policy
/// that it does not violate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debugger_page_shows_messages_live_in_chromium() {
    let f = with_admin();
    let result = drive_debugger(&f, TOKEN, &[WRITE_KEY], |n| format!("page-{n}"), "page-", 1).await;
    assert!(
        result["row"].as_str().unwrap().contains("page-"),
        "{result}"
    );
    assert!(result["row"].as_str().unwrap().contains("out"), "{result}");
    assert_eq!(result["status"], "live");
    assert!(
        !result["url"].as_str().unwrap().contains(TOKEN),
        "the token left the address bar"
    );
    let csp = result["csp"].as_str().unwrap_or_default();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
    ] {
        assert!(csp.contains(directive), "{result}");
    }
    assert_eq!(result["violations"], json!([]), "{result}");
    assert_eq!(result["consoleErrors"], json!([]), "{result}");
    assert_eq!(result["failedRequests"], json!([]), "{result}");
}

/// A base64 admin token (`+`, `/`, `=`) pasted as it is into the fragment works end to
/// end; the cookie the page gets is HttpOnly and SameSite=Strict, out of the script's
/// reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base64_admin_token_works_in_the_debugger_page() {
    let token = "Zm9v+YmFy/YmF6==";
    let f = with_admin_settings(token, "");
    let result = drive_debugger(&f, token, &[WRITE_KEY], |n| format!("b64-{n}"), "b64-", 1).await;
    assert_eq!(result["status"], "live", "{result}");
    let cookie = &result["cookie"];
    assert_eq!(cookie["httpOnly"], true, "{result}");
    assert_eq!(cookie["sameSite"], "Strict", "{result}");
    assert_eq!(cookie["path"], "/debugger", "{result}");
    assert!(
        !result["documentCookie"]
            .as_str()
            .unwrap()
            .contains("fanout_admin"),
        "{result}"
    );
}

/// Two sources that send one messageId get a row each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_with_one_message_id_get_a_row_each_in_the_debugger() {
    let f = Fanout::start_with(
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section("[[sources]]\nname = \"mobile\"\nwrite_keys = [\"wk_mobile\"]\n"),
    );
    let result = drive_debugger(
        &f,
        TOKEN,
        &[WRITE_KEY, "wk_mobile"],
        |_| "shared-id".to_string(),
        "shared-id",
        2,
    )
    .await;
    let rows: Vec<&str> = result["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(rows.len(), 2, "{result}");
    assert!(rows.iter().any(|r| r.contains("test")), "{result}");
    assert!(rows.iter().any(|r| r.contains("mobile")), "{result}");
}

/// Sends `batches` batches of 100 tracks of ~1 KB each (`<prefix>-<batch>-<i>`, user
/// `user_of(i)`), each answered 200.
async fn post_padded_batches(
    f: &Fanout,
    prefix: &str,
    batches: usize,
    user_of: fn(usize) -> String,
) {
    let pad = "x".repeat(1024);
    for b in 0..batches {
        let batch: Vec<Value> = (0..100)
            .map(|i| {
                json!({"type": "track", "messageId": format!("{prefix}-{b}-{i}"),
                       "userId": user_of(i), "event": "E", "properties": {"pad": pad}})
            })
            .collect();
        let r = f
            .post("/v1/batch")
            .json(&json!({"batch": batch}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// fanout with the admin token and destination `cleaned` (a file) whose insert function
/// marks each track `cleaned` and drops the event `Internal`.
fn with_insert_function() -> Fanout {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("functions")).unwrap();
    std::fs::write(
        tmp.path().join("functions/clean.js"),
        "function onTrack(event) {\n\
           if (event.event === 'Internal') return null;\n\
           event.properties = { cleaned: true };\n\
           return event;\n\
         }\n",
    )
    .unwrap();
    let section = format!(
        "[[destinations]]\nname = \"cleaned\"\nkind = \"file\"\npath = \"{}\"\n\
         insert_function = \"functions/clean.js\"\n",
        tmp.path().join("cleaned.jsonl").display()
    );
    Fanout::start_in(
        tmp,
        Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN)
            .section(&section),
    )
}

#[tokio::test]
async fn an_insert_function_s_before_and_after_are_shown() {
    let f = with_insert_function();
    let mut sse = Sse::open(&f, TOKEN, "destination=cleaned").await;
    let track = |id: &str, event: &str| {
        json!({"type": "track", "messageId": id, "userId": "u", "event": event,
               "properties": {"raw": 1}})
    };
    f.post("/v1/track")
        .json(&track("changed", "Viewed"))
        .send()
        .await
        .unwrap();
    let events = sse.until(|e| e["kind"] == "delivered").await;
    let inserted = events
        .iter()
        .find(|e| e["kind"] == "inserted")
        .unwrap_or_else(|| panic!("no inserted event: {events:?}"));
    assert_eq!(inserted["messageId"], "changed", "{inserted}");
    assert_eq!(inserted["source"], "test", "{inserted}");
    assert_eq!(inserted["type"], "track", "{inserted}");
    assert_eq!(
        inserted["before"]["properties"],
        json!({"raw": 1}),
        "{inserted}"
    );
    assert_eq!(
        inserted["after"]["properties"],
        json!({"cleaned": true}),
        "{inserted}"
    );
    let delivered = events.last().unwrap();
    assert_eq!(delivered["payload"]["properties"], json!({"cleaned": true}));

    f.post("/v1/track")
        .json(&track("dropped", "Internal"))
        .send()
        .await
        .unwrap();
    let events = sse.until(|e| e["kind"] == "skipped").await;
    let skipped = events.last().unwrap();
    assert_eq!(skipped["messageId"], "dropped", "{skipped}");
    assert_eq!(skipped["reason"], "insert_function", "{skipped}");
    assert_eq!(
        skipped["payload"]["properties"],
        json!({"raw": 1}),
        "{skipped}"
    );
    assert!(
        !events.iter().any(|e| e["kind"] == "inserted"),
        "a dropped message has no after: {events:?}"
    );
}

/// The page shows the message before and after a destination's insert function.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debugger_page_shows_an_insert_function_s_before_and_after() {
    let f = with_insert_function();
    let result = drive_debugger_until(
        &f,
        TOKEN,
        &[WRITE_KEY],
        |n| format!("ins-{n}"),
        "ins-",
        1,
        "after insert_function",
    )
    .await;
    let detail = result["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("cleaned: before insert_function"),
        "{result}"
    );
    assert!(
        detail.contains("cleaned: after insert_function"),
        "{result}"
    );
    assert!(detail.contains("\"cleaned\": true"), "{result}");
    assert_eq!(result["consoleErrors"], json!([]), "{result}");
}
