//! Hostile and broken input: each gets a clear 4xx, and the server keeps serving.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::sse::Sse;
use common::{assert_success, basic, expect_error, gzip, status_json, Fanout, Settings, WRITE_KEY};
use serde_json::json;

async fn still_serving(f: &Fanout) {
    let r = f
        .post("/v1/track")
        .json(&json!({"userId": "u", "event": "alive"}))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
}

async fn post(f: &Fanout, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = f.post(path).body(body).send().await.unwrap();
    status_json(r).await
}

#[tokio::test]
async fn truncated_and_invalid_json() {
    let f = Fanout::start();
    let full =
        br#"{"batch":[{"type":"track","userId":"u","event":"E","properties":{"a":[1,2,3]}}]}"#;
    for cut in [1, 10, 30, full.len() - 1] {
        let (status, err) = post(&f, "/v1/batch", full[..cut].to_vec()).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (400, Some("invalid_json")),
            "cut at {cut}"
        );
    }
    for body in [
        &b""[..],
        b"nul",
        b"{\"userId\":\"u\",}",
        b"{'userId':'u'}",
        b"\x00\x01",
    ] {
        let (status, err) = post(&f, "/v1/track", body.to_vec()).await;
        assert_eq!(status, 400, "{}: {err}", String::from_utf8_lossy(body));
    }
    still_serving(&f).await;
}

#[tokio::test]
async fn invalid_utf8_is_refused() {
    let f = Fanout::start();
    let mut body = br#"{"userId":"u","event":"E","properties":{"name":"caf"#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}}"#);
    let (status, err) = post(&f, "/v1/track", body.clone()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, _) = post(
        &f,
        "/v1/batch",
        [&b"{\"batch\":["[..], &body, b"]}"].concat(),
    )
    .await;
    assert_eq!(status, 400);
    still_serving(&f).await;
    assert_eq!(f.wait_delivered(1).await.len(), 1);
}

#[tokio::test]
async fn wrong_types_everywhere() {
    let f = Fanout::start();
    let bodies = [
        ("/v1/batch", json!({"batch": [{"type": 5, "userId": "u"}]})),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": {"id": 1}, "event": "E"}]}),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": "u", "event": 42}]}),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": "u", "event": "E", "properties": [1]}]}),
        ),
        ("/v1/batch", json!({"batch": [null]})),
        ("/v1/batch", json!({"batch": [], "sentAt": 17})),
        ("/v1/batch", json!([{"type": "track"}])),
        ("/v1/track", json!("a string")),
        ("/v1/track", json!(12)),
        (
            "/v1/track",
            json!({"userId": "u", "event": "E", "timestamp": 1700000000}),
        ),
        ("/v1/group", json!({"userId": "u", "groupId": true})),
    ];
    for (path, body) in bodies {
        let (status, err) = post(&f, path, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(status, 400, "{path} {body}: {err}");
        assert_eq!(err["success"], false);
    }
    still_serving(&f).await;
}

#[tokio::test]
async fn deeply_nested_json_100k_levels() {
    let f = Fanout::start();
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // As a batch item, as the whole body, inside a message: all refused, none crash.
    let cases = [
        ("/v1/batch", format!("{{\"batch\":[{}]}}", deep(100_000))),
        ("/v1/track", deep(100_000)),
        ("/v1/track", format!("{{\"userId\":\"u\",\"event\":\"E\",\"properties\":{{\"a\":{}}}}}", deep(100_000))),
        ("/v1/batch", format!("{{\"batch\":[{{\"type\":\"track\",\"userId\":\"u\",\"event\":\"E\",\"properties\":{{\"a\":{}}}}}]}}", deep(1000))),
        ("/v1/track", format!("{{\"userId\":\"u\",\"event\":\"E\",\"properties\":{{\"a\":{}}}}}", deep(65))),
    ];
    for (path, body) in cases {
        let (status, err) = post(&f, path, body.into_bytes()).await;
        assert_eq!(status, 400, "{path}: {err}");
        let code = err["error"]["code"].as_str().unwrap();
        assert!(
            [
                "invalid_message",
                "too_deep",
                "message_too_large",
                "invalid_json"
            ]
            .contains(&code),
            "{code}"
        );
    }
    // At the depth limit: fine.
    let ok = format!(
        "{{\"userId\":\"u\",\"event\":\"E\",\"properties\":{{\"a\":{}}}}}",
        deep(62)
    );
    let (status, _) = post(&f, "/v1/track", ok.into_bytes()).await;
    assert_eq!(status, 200);
    still_serving(&f).await;
}

#[tokio::test]
async fn gzip_bomb_is_cut_off_at_the_decoded_limit() {
    let f = Fanout::start();
    // 50 MB of zeros inside a JSON string: about 50 KB compressed, under the wire limit.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(br#"{"batch":[],"pad":""#).unwrap();
    let zeros = vec![b'0'; 1 << 20];
    for _ in 0..50 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.write_all(br#""}"#).unwrap();
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 500 * 1024, "bomb is {} bytes", bomb.len());
    let started = std::time::Instant::now();
    let r = f
        .post_encoded("/v1/batch", "gzip", bomb)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "request_too_large").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "decoding stopped at the limit"
    );
    // A small gzip body still works.
    let r = f
        .post_encoded("/v1/batch", "gzip", gzip(br#"{"batch":[]}"#))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    still_serving(&f).await;
}

#[tokio::test]
async fn hundred_megabyte_body_is_refused_unread() {
    let f = Fanout::start();
    // Declared length: refused before a byte of the body is sent.
    let (status, body) = f.raw(format!("POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: 104857600\r\n\r\n", basic(WRITE_KEY)).as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request_too_large"));
    // Chunked, no declared length: cut off once past the limit.
    let addr = f.addr;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ntransfer-encoding: chunked\r\n\r\n", basic(WRITE_KEY)).as_bytes()).unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
        for _ in 0..100 {
            // The server answers and closes once it has seen enough; stop sending then.
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        common::read_response(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(status, 413, "{body}");
    still_serving(&f).await;
}

#[tokio::test]
async fn batch_level_context_cannot_multiply_a_small_request() {
    let f = Fanout::start();
    let item = json!({"type": "identify", "userId": "u"});
    // 40 KB of context, merged into each item, would make each message larger than 32 KB.
    let body = json!({"batch": [item, item], "context": {"pad": "x".repeat(40_000)}});
    let (status, err) = post(&f, "/v1/batch", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("message_too_large")),
        "{err}"
    );
    // 20 KB of context fits each message, but 2 400 copies would be 48 MB from a 25 KB body.
    let items: Vec<_> = (0..2400).map(|_| item.clone()).collect();
    let body = json!({"batch": items, "context": {"pad": "x".repeat(20_000)}});
    let started = std::time::Instant::now();
    let (status, err) = post(&f, "/v1/batch", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("batch_too_large")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // A modest shared context is fine.
    let body = json!({"batch": [item, item], "context": {"library": {"name": "analytics-go"}}});
    let (status, _) = post(&f, "/v1/batch", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(status, 200);
    still_serving(&f).await;
    assert_eq!(f.wait_delivered(3).await.len(), 3);
}

#[tokio::test]
async fn a_stalled_body_times_out_and_frees_its_slot() {
    let f = Fanout::start_with(
        common::Settings::default().server("body_timeout = \"1s\"\nmax_in_flight = 1"),
    );
    let addr = f.addr;
    let (status, body) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: 100\r\n\r\n{{\"batch\":[", basic(WRITE_KEY)).as_bytes()).unwrap();
        common::read_response(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("body_timeout"), "{body}");
    // The only slot is free again.
    still_serving(&f).await;
}

#[tokio::test]
async fn numbers_no_consumer_can_hold_are_refused_by_field() {
    let f = Fanout::start();
    let huge = format!("1{}", "0".repeat(400));
    let track = |properties: &str| {
        format!(r#"{{"userId":"u","event":"E","properties":{properties}}}"#).into_bytes()
    };
    let cases = [
        ("/v1/track", track(r#"{"price":1e999}"#), "properties.price", None),
        (
            "/v1/track",
            track(&format!(r#"{{"items":[{{"qty":-{huge}}}]}}"#)),
            "properties.items[0].qty",
            None,
        ),
        (
            "/v1/batch",
            format!(
                r#"{{"batch":[{{"type":"identify","userId":"u"}},{{"type":"identify","userId":"u","traits":{{"n":{huge}}}}}]}}"#
            )
            .into_bytes(),
            "traits.n",
            Some(1),
        ),
        (
            "/v1/batch",
            br#"{"batch":[{"type":"identify","userId":"u"}],"context":{"screen":{"density":2E+400}}}"#
                .to_vec(),
            "context.screen.density",
            None,
        ),
    ];
    for (path, body, field, index) in cases {
        let (status, err) = post(&f, path, body).await;
        assert_eq!(status, 400, "{path}: {err}");
        assert_eq!(err["error"]["code"], "number_out_of_range", "{err}");
        assert_eq!(err["error"]["field"], field, "{err}");
        assert_eq!(err["error"]["index"].as_u64(), index, "{err}");
    }
    // Large but finite, tiny, and the same text inside a string: all accepted as sent.
    let fine = track(r#"{"a":1e308,"b":1e-400,"c":123456789012345678901234567890,"d":"1e999"}"#);
    let (status, err) = post(&f, "/v1/track", fine).await;
    assert_eq!(status, 200, "{err}");
    let delivered = f.wait_delivered(1).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["properties"]["d"], "1e999");
}

#[tokio::test]
async fn a_byte_order_mark_before_the_json_is_accepted() {
    let f = Fanout::start();
    let bom = |json: &str| [&b"\xEF\xBB\xBF"[..], json.as_bytes()].concat();
    let (status, err) = post(&f, "/v1/track", bom(r#"{"userId":"u","event":"bom-1"}"#)).await;
    assert_eq!(status, 200, "{err}");
    let batch = r#"{"batch":[{"type":"track","userId":"u","event":"bom-2"}]}"#;
    let (status, err) = post(&f, "/v1/batch", bom(batch)).await;
    assert_eq!(status, 200, "{err}");
    let r = f
        .post_encoded("/v1/batch", "gzip", gzip(&bom(batch)))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    assert_eq!(f.wait_delivered(3).await.len(), 3);
}

#[tokio::test]
async fn a_broken_clock_cannot_write_a_year_no_consumer_reads() {
    let f = Fanout::start();
    let body = json!({"userId": "u", "event": "E", "timestamp": "0000-01-01T00:00:00Z",
                      "sentAt": "9999-12-31T23:59:59Z"});
    let (status, err) = post(&f, "/v1/track", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(status, 200, "{err}");
    let delivered = f.wait_delivered(1).await;
    assert_eq!(delivered[0]["timestamp"], "1970-01-01T00:00:00.000Z");
    assert_eq!(delivered[0]["originalTimestamp"], "0000-01-01T00:00:00Z");
    // A date past year 9999 cannot be written in RFC 3339: refused, by field.
    let body = json!({"userId": "u", "event": "E", "sentAt": "+10000-01-01T00:00:00"});
    let (status, err) = post(&f, "/v1/track", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(
        (status, err["error"]["field"].as_str()),
        (400, Some("sentAt")),
        "{err}"
    );
}

/// Characters some reader ends a line at (Python's `str.splitlines()`; a superset of
/// Rust's `lines()` and of Server-Sent Events).
fn breaks_lines(text: &str) -> bool {
    text.contains([
        '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
        '\u{2029}',
    ])
}

/// Line breaks inside nested values (raw `\n`/`\r` between JSON tokens, NEL/LS/PS inside
/// strings) stay inside their message: readers of the file and stdout destinations and of
/// the live view see one message per line, never a line the client wrote.
#[tokio::test]
async fn line_breaks_in_nested_values_cannot_forge_lines() {
    const TOKEN: &str = "forged-lines-admin-token";
    let f = Fanout::start_with(
        Settings::default()
            .capture_stdout()
            .section("[[destinations]]\nname = \"console\"\nkind = \"stdout\"\n")
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", TOKEN),
    );
    let mut live = Sse::open(&f, TOKEN, "").await;
    let forged = r#"{"type":"identify","userId":"victim-42","receivedAt":"2020-01-01T00:00:00Z"}"#;
    // The request of the report, as curl sends it.
    let single =
        format!("{{\"userId\":\"a\",\"event\":\"x\",\"properties\":{{\"x\":\n{forged}\n}}}}");
    let (status, err) = post(&f, "/v1/track", single.into_bytes()).await;
    assert_eq!(status, 200, "{err}");
    // A gzipped batch: bare `\r` between tokens, and a line of its own between line
    // separators inside a string (serde_json leaves those raw).
    let in_string = serde_json::to_string(&format!("\u{2028}{forged}\u{85}\u{2029}")).unwrap();
    let batch = format!(
        "{{\"batch\":[{{\"type\":\"track\",\"userId\":\"a\",\"event\":\"y\",\"properties\":\
         {{\"x\":\r{forged}\r,\"s\":{in_string}}}}}]}}"
    );
    assert!(batch.contains('\u{2028}'));
    let r = f
        .post_encoded("/v1/batch", "gzip", gzip(batch.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_success(r).await;
    still_serving(&f).await;

    // Every message is in the file, each on a line of its own.
    let path = f.dir().join("out.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all = ["x", "y", "alive"].map(|e| text.contains(&format!("\"event\":\"{e}\"")));
        if all.iter().all(|&a| a) || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .split('\n')
        .collect();
    assert_eq!(lines.len(), 3, "{text:?}");
    assert!(!lines.iter().any(|l| breaks_lines(l)), "{text:?}");
    let mut file: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let mut stdout = f.wait_stdout(3).await;
    assert_eq!(stdout.len(), 3, "{stdout:?}");
    let by_event = |a: &serde_json::Value, b: &serde_json::Value| {
        a["event"].as_str().cmp(&b["event"].as_str())
    };
    file.sort_by(by_event);
    stdout.sort_by(by_event);
    assert_eq!(file, stdout, "the stdout destination writes the same lines");
    let events: Vec<_> = file.iter().map(|m| m["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["alive", "x", "y"]);
    // The nested identify is data of a track, as sent; never a message of its own.
    for message in &file[1..] {
        assert_eq!(message["type"], "track");
        assert_eq!(message["properties"]["x"]["userId"], "victim-42");
        assert_ne!(message["receivedAt"], "2020-01-01T00:00:00Z");
    }
    assert_eq!(
        file[2]["properties"]["s"],
        format!("\u{2028}{forged}\u{85}\u{2029}")
    );
    // The live view gets each as one event (`Sse` parses every `data:` line).
    let events = live
        .until(|e| e["kind"] == "accepted" && e["event"] == "alive")
        .await;
    let accepted: Vec<_> = events.iter().filter(|e| e["kind"] == "accepted").collect();
    assert_eq!(accepted.len(), 3, "{events:#?}");
    for (event, name) in accepted[..2].iter().zip(["x", "y"]) {
        assert_eq!(event["event"], name);
        assert_eq!(event["message"]["properties"]["x"]["userId"], "victim-42");
    }
}

#[tokio::test]
async fn an_admin_query_that_does_not_parse_gets_a_json_error_naming_it() {
    let token = "bad-input-admin-token";
    let f = Fanout::start_with(
        common::Settings::default()
            .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
            .env("FANOUT_ADMIN_TOKEN", token),
    );
    let listing = common::client()
        .get(f.url("/admin/dead-letters?limit=lots"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(listing.headers()["content-type"], "application/json");
    let body = expect_error(listing, 400, "invalid_query").await;
    assert_eq!(body["error"]["field"], "limit", "{body}");
    let (status, body) = common::post_reload(&f, token, "?purge=maybe").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    assert_eq!(body["error"]["field"], "purge", "{body}");
    let (status, body) = common::post_replay(&f, token, "destination=out&destination=x").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "destination", "{body}");
    still_serving(&f).await;
}
