//! The official Segment libraries, Python (segment-analytics-python) and Node
//! (@segment/analytics-node), driven against a running fanout by the scripts in
//! `../shared/clients`. `scripts/test` installs them into `target/segclients` (or
//! `FANOUT_CLIENTS_DIR`); without them these tests fail, they never skip.
//!
//! Each run sends track, identify, page, screen, group, alias and an anonymous track whose
//! `messageId` is `fixed-msg-id-{i}`, `--count` times.

mod common;

use serde_json::{json, Value};

use common::clients::{run_node, run_python};
use common::Fanout;

/// The call types one round of the scripts sends, in order.
const ROUND: [&str; 7] = [
    "track", "identify", "page", "screen", "group", "alias", "track",
];

/// Waits for `n` delivered messages and for the destination to have settled everything
/// (so no more can arrive).
async fn delivered_exactly(f: &Fanout, n: usize) -> Vec<Value> {
    let lines = f.wait_delivered(n).await;
    assert!(
        lines.len() >= n,
        "only {} of {n} messages delivered: {lines:#?}",
        lines.len()
    );
    f.wait_settled("out").await;
    let lines = f.delivered();
    let ids: Vec<&str> = lines
        .iter()
        .map(|m| m["messageId"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(lines.len(), n, "messages delivered more than once? {ids:?}");
    let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), n, "duplicate messageIds: {ids:?}");
    lines
}

/// The library's own name and its fixed screen timestamp as the client formats it.
struct Library {
    name: &'static str,
    screen_timestamp: &'static str,
}

const PYTHON: Library = Library {
    name: "analytics-python",
    screen_timestamp: "2024-01-02T03:04:05.678+00:00",
};

const NODE: Library = Library {
    name: "@segment/analytics-node",
    screen_timestamp: "2024-01-02T03:04:05.678Z",
};

fn time(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Checks `count` rounds of the script's seven calls, delivered in order.
fn check_rounds(lines: &[Value], count: usize, lib: &Library) {
    assert_eq!(lines.len(), 7 * count);
    for (n, m) in lines.iter().enumerate() {
        let (round, call) = (n / 7, n % 7);
        let at = format!("round {round} call {call}: {m}");
        assert_eq!(m["type"], ROUND[call], "{at}");
        assert_eq!(m["context"]["library"]["name"], lib.name, "{at}");
        assert!(m.get("writeKey").is_none(), "{at}");
        for key in ["messageId", "timestamp", "receivedAt", "sentAt"] {
            assert!(m[key].is_string(), "{key} missing: {at}");
        }
        let timestamp = m["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() == 24 && timestamp.ends_with('Z'),
            "timestamp is RFC 3339 millis Z: {at}"
        );
        if call == 6 {
            assert_eq!(m["messageId"], format!("fixed-msg-id-{round}"), "{at}");
            assert_eq!(m["anonymousId"], "anon-123", "{at}");
            assert_eq!(m["event"], "Signed Up", "{at}");
            assert_eq!(m["properties"], json!({"k": "v"}), "{at}");
        } else {
            assert_eq!(m["userId"], "user-1", "{at}");
        }
        match call {
            0 => {
                assert_eq!(m["event"], "Order Completed", "{at}");
                assert_eq!(m["properties"]["revenue"], 42.5, "{at}");
                assert_eq!(m["properties"]["currency"], "USD", "{at}");
                assert_eq!(m["properties"]["i"], round, "{at}");
                assert_eq!(m["context"]["ip"], "203.0.113.9", "{at}");
                assert_eq!(
                    m["integrations"],
                    json!({"All": true, "Mixpanel": false}),
                    "{at}"
                );
            }
            1 => assert_eq!(
                m["traits"],
                json!({"email": "u1@example.com", "plan": "pro"}),
                "{at}"
            ),
            2 => {
                assert_eq!(m["name"], "Quickstart", "{at}");
                assert_eq!(m["category"], "Docs", "{at}");
                assert_eq!(
                    m["properties"]["url"], "https://example.com/docs/qs",
                    "{at}"
                );
            }
            3 => {
                assert_eq!(m["name"], "Profile", "{at}");
                assert_eq!(m["category"], "Settings", "{at}");
                assert_eq!(m["properties"]["tab"], "privacy", "{at}");
                assert_eq!(m["originalTimestamp"], lib.screen_timestamp, "{at}");
                // Skew correction moves the event time only by the send delay.
                let fixed = time(&json!("2024-01-02T03:04:05.678Z"));
                let drift = (time(&m["timestamp"]) - fixed).num_milliseconds().abs();
                assert!(drift < 10_000, "screen timestamp {drift} ms off: {at}");
            }
            4 => {
                assert_eq!(m["groupId"], "group-9", "{at}");
                assert_eq!(
                    m["traits"],
                    json!({"name": "Acme", "employees": 12}),
                    "{at}"
                );
            }
            5 => assert_eq!(m["previousId"], "anon-123", "{at}"),
            _ => {}
        }
    }
}

async fn python_run(extra: &[&str], count: usize) {
    let f = Fanout::start();
    run_python(&f, extra).await;
    let lines = delivered_exactly(&f, 7 * count).await;
    check_rounds(&lines, count, &PYTHON);
    for m in &lines {
        let id = m["messageId"].as_str().unwrap();
        assert!(
            id.starts_with("fixed-msg-id-") || uuid_like(id),
            "python messageIds are UUIDs: {m}"
        );
    }
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[tokio::test]
async fn python_default() {
    python_run(&[], 1).await;
}

#[tokio::test]
async fn python_gzip() {
    python_run(&["--gzip"], 1).await;
}

#[tokio::test]
async fn python_three_rounds() {
    python_run(&["--count", "3"], 3).await;
}

#[tokio::test]
async fn node_default() {
    let f = Fanout::start();
    run_node(&f, &[]).await;
    let lines = delivered_exactly(&f, 7).await;
    check_rounds(&lines, 1, &NODE);
    for (n, m) in lines.iter().enumerate() {
        if n < 6 {
            assert!(
                m["messageId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("node-next-")),
                "node messageIds start with node-next-: {m}"
            );
        }
        assert_eq!(
            m["_metadata"]["jsRuntime"], "node",
            "_metadata is kept: {m}"
        );
        assert!(m["_metadata"]["nodeVersion"].is_string(), "{m}");
    }
}
