//! Per-destination routing through the running server: `sources`, `filter`,
//! `drop_fields`, the message's `integrations`; and `fanout route`, which shows the
//! same decisions without sending.

mod common;

use std::path::Path;

use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

const APP_KEY: &str = "wk_app";

/// Beside the harness's `test` source and catch-all `out` file: a source `app`, and two
/// file destinations with their own rules, writing into `dir`.
fn routed(dir: &Path) -> Settings {
    Settings::default().section(&format!(
        r#"[[sources]]
name = "app"
write_keys = ["{APP_KEY}"]

[[destinations]]
name = "web_only"
kind = "file"
path = "{web}"
sources = ["test"]
drop_fields = ["context.ip"]
filter = {{ types = ["track", "identify"] }}

[[destinations]]
name = "orders"
kind = "file"
path = "{orders}"
filter = {{ types = ["track"], events = ["Order *"] }}
"#,
        web = dir.join("web.jsonl").display(),
        orders = dir.join("orders.jsonl").display(),
    ))
}

#[tokio::test]
async fn each_destination_gets_what_its_rules_and_the_message_allow() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fanout::start_with(routed(tmp.path()));
    let ctx = json!({"ip": "203.0.113.9", "locale": "en-US"});
    let sends = [
        (
            common::WRITE_KEY,
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "messageId": "t-order", "context": ctx, "properties": {"total": 5}}),
        ),
        (
            common::WRITE_KEY,
            "/v1/identify",
            json!({"userId": "u1", "messageId": "t-identify", "context": ctx, "traits": {"plan": "pro"}}),
        ),
        (
            common::WRITE_KEY,
            "/v1/page",
            json!({"userId": "u1", "messageId": "t-page", "name": "Home", "context": ctx}),
        ),
        (
            common::WRITE_KEY,
            "/v1/track",
            json!({"userId": "u1", "event": "Signed Up", "messageId": "t-signup", "context": ctx}),
        ),
        (
            APP_KEY,
            "/v1/track",
            json!({"userId": "u2", "event": "Order Placed", "messageId": "a-order", "context": ctx}),
        ),
        (
            APP_KEY,
            "/v1/identify",
            json!({"userId": "u2", "messageId": "a-identify", "context": ctx}),
        ),
        // Go-style lowercase `all`, and only `orders` switched on.
        (
            common::WRITE_KEY,
            "/v1/track",
            json!({"userId": "u3", "event": "Order Refunded", "messageId": "t-only-orders", "context": ctx, "integrations": {"all": false, "orders": true}}),
        ),
    ];
    for (key, path, body) in &sends {
        assert_success(f.post_as(key, path).json(body).send().await.unwrap()).await;
    }
    // A batch whose batch-level integrations turn `web_only` off for every item.
    let batch = json!({"batch": [
        {"type": "track", "userId": "u4", "event": "Order Completed", "messageId": "b-order"},
        {"type": "identify", "userId": "u4", "messageId": "b-identify"},
    ], "integrations": {"web_only": false}, "context": ctx});
    assert_success(f.post("/v1/batch").json(&batch).send().await.unwrap()).await;

    let (web_path, orders_path) = (
        tmp.path().join("web.jsonl"),
        tmp.path().join("orders.jsonl"),
    );
    f.wait_delivered(8).await;
    common::wait_file_lines(&web_path, 3).await;
    common::wait_file_lines(&orders_path, 4).await;
    // Everything settled everywhere: what should not have come would have by now.
    for destination in ["out", "web_only", "orders"] {
        f.wait_settled(destination).await;
    }
    let (out, web, orders) = (
        f.delivered(),
        common::file_lines(&web_path),
        common::file_lines(&orders_path),
    );

    assert_eq!(
        common::receiver::ids(&out),
        [
            "t-order",
            "t-identify",
            "t-page",
            "t-signup",
            "a-order",
            "a-identify",
            "b-order",
            "b-identify"
        ],
        "the catch-all gets everything but what `all: false` turned off"
    );
    assert_eq!(
        common::receiver::ids(&web),
        ["t-order", "t-identify", "t-signup"]
    );
    assert_eq!(
        common::receiver::ids(&orders),
        ["t-order", "a-order", "t-only-orders", "b-order"]
    );

    for m in &web {
        assert!(m["context"].get("ip").is_none(), "context.ip dropped: {m}");
        assert_eq!(
            m["context"]["locale"], "en-US",
            "the rest of context kept: {m}"
        );
    }
    for m in orders.iter().chain(&out) {
        assert_eq!(m["context"]["ip"], "203.0.113.9", "context.ip kept: {m}");
    }
    assert_eq!(web[1]["traits"]["plan"], "pro");
}

/// Runs `fanout route ARGS` with `input` on standard input: (exit code, stdout, stderr).
fn route(f: &Fanout, args: &[&str], input: &[u8]) -> (i32, String, String) {
    let mut command = f.command();
    command.arg("route").args(args);
    common::run_with_stdin(command, input.to_vec())
}

/// The report's entry for `destination` of message `index`.
fn entry<'a>(report: &'a Value, index: usize, destination: &str) -> &'a Value {
    report["messages"][index]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == destination)
        .unwrap_or_else(|| panic!("no {destination} in {report:#}"))
}

#[tokio::test]
async fn route_command_shows_each_destination_and_its_payload() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = routed(tmp.path())
        .env("ROUTE_TEST_KLAVIYO_KEY", "pk_test")
        .section(
            "[[destinations]]\nname = \"crm\"\nkind = \"klaviyo\"\napi_key_env = \"ROUTE_TEST_KLAVIYO_KEY\"\n\
             base_url = \"http://127.0.0.1:9\"\nsources = [\"test\"]\nrename = { \"properties.total\" = \"properties.amount\" }\n\
             ecommerce_names = false\n",
        );
    let f = Fanout::start_with(settings);

    let order = json!({"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "r-1",
        "context": {"ip": "203.0.113.9"}, "properties": {"total": 12.5, "currency": "EUR"}});
    let (code, stdout, stderr) = route(&f, &[], order.to_string().as_bytes());
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["source"], "test");
    let stored = &report["messages"][0]["stored"];
    assert_eq!(stored["messageId"], "r-1");
    assert!(
        stored["receivedAt"].is_string(),
        "enriched as ingest stores it: {stored}"
    );

    let out = entry(&report, 0, "out");
    assert_eq!(
        (out["send"].clone(), out["skipped"].clone()),
        (json!(true), Value::Null)
    );
    assert_eq!(out["payload"]["context"]["ip"], "203.0.113.9");
    let web = entry(&report, 0, "web_only");
    assert_eq!(web["send"], true);
    assert!(web["payload"]["context"].get("ip").is_none(), "{web}");
    assert_eq!(entry(&report, 0, "orders")["send"], true);
    let crm = entry(&report, 0, "crm");
    assert_eq!(crm["kind"], "klaviyo");
    assert_eq!(crm["send"], true);
    let request = &crm["payload"][0];
    assert_eq!(request["path"], "/api/event-bulk-create-jobs", "{crm}");
    let job = request["body"].to_string();
    assert!(
        job.contains("Order Completed") && job.contains("\"amount\":12.5"),
        "renamed before translation: {job}"
    );

    // A batch from another source: the source rule and Klaviyo's own alias skip.
    let batch = json!({"batch": [
        {"type": "alias", "userId": "u1", "previousId": "a1"},
        {"type": "page", "userId": "u1", "name": "Home", "integrations": {"All": false, "Klaviyo": true}},
    ]});
    let (code, stdout, stderr) = route(&f, &["--source", "app"], batch.to_string().as_bytes());
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["source"], "app");
    assert_eq!(report["messages"].as_array().unwrap().len(), 2);
    assert_eq!(entry(&report, 0, "crm")["skipped"], "source");
    assert_eq!(entry(&report, 0, "web_only")["skipped"], "source");
    assert_eq!(entry(&report, 0, "orders")["skipped"], "type");
    assert_eq!(entry(&report, 0, "out")["send"], true);
    assert_eq!(entry(&report, 1, "out")["skipped"], "integrations");
    assert_eq!(entry(&report, 1, "crm")["skipped"], "source");
    assert!(entry(&report, 1, "out")["payload"].is_null());

    // Klaviyo's own verdicts, from the translation.
    let alias = json!({"type": "alias", "userId": "u1", "previousId": "a1"});
    let (_, stdout, _) = route(&f, &[], alias.to_string().as_bytes());
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let crm = entry(&report, 0, "crm");
    assert_eq!(
        (crm["send"].clone(), crm["skipped"].clone()),
        (json!(false), json!("alias_not_supported"))
    );

    // Bad input: exit 2 and a reason.
    for (args, input, says) in [
        (&[][..], &b"{\"userId\":\"u\"}"[..], "type"),
        (
            &[][..],
            &b"{\"type\":\"track\",\"userId\":\"u\"}"[..],
            "event",
        ),
        (&[][..], &b"not json"[..], "JSON"),
        (
            &["--source", "nope"][..],
            &b"{\"type\":\"identify\",\"userId\":\"u\"}"[..],
            "nope",
        ),
    ] {
        let (code, stdout, stderr) = route(&f, args, input);
        assert_eq!(code, 2, "{stdout}{stderr}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

/// `consent_categories`, `hash_fields` and `integrations = "ignore"` through the running server: a
/// message denying a category misses the destination that needs it, one without consent
/// data goes everywhere, and an archive that ignores `integrations` gets what
/// `{"All": false}` kept from the others.
#[tokio::test]
async fn consent_and_ignored_integrations_decide_per_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let (ads, archive) = (
        tmp.path().join("ads.jsonl"),
        tmp.path().join("archive.jsonl"),
    );
    let f = Fanout::start_with(Settings::default().section(&format!(
        "[[destinations]]\nname = \"ads\"\nkind = \"file\"\npath = \"{}\"\n\
         consent_categories = [\"Advertising\"]\nhash_fields = [\"properties.email\"]\n\n\
         [[destinations]]\nname = \"archive\"\nkind = \"file\"\npath = \"{}\"\n\
         integrations = \"ignore\"\n",
        ads.display(),
        archive.display()
    )));
    let consent = |advertising: bool| json!({"consent": {"categoryPreferences": {"Advertising": advertising, "Analytics": true}}});
    let sends = [
        json!({"userId": "u", "event": "E", "messageId": "denied", "context": consent(false)}),
        json!({"userId": "u", "event": "E", "messageId": "granted", "context": consent(true),
               "properties": {"email": " Jane@Example.com"}}),
        json!({"userId": "u", "event": "E", "messageId": "no-consent-data"}),
        json!({"userId": "u", "event": "E", "messageId": "all-off", "integrations": {"All": false}}),
    ];
    for body in &sends {
        assert_success(f.post("/v1/track").json(body).send().await.unwrap()).await;
    }
    common::wait_file_lines(&archive, 4).await;
    for destination in ["out", "ads", "archive"] {
        f.wait_settled(destination).await;
    }
    let ads_lines = common::file_lines(&ads);
    assert_eq!(
        common::receiver::ids(&ads_lines),
        ["granted", "no-consent-data"]
    );
    // Hashed for `ads` only (sha256 of "jane@example.com"); the others get it as sent.
    assert_eq!(
        ads_lines[0]["properties"]["email"],
        "8c87b489ce35cf2e2f39f80e282cb2e804932a56a213983eeeb428407d43b52d"
    );
    let archived = common::file_lines(&archive);
    assert_eq!(archived[1]["properties"]["email"], " Jane@Example.com");
    assert_eq!(
        common::receiver::ids(&common::file_lines(&archive)),
        ["denied", "granted", "no-consent-data", "all-off"]
    );
    assert_eq!(
        common::receiver::ids(&f.delivered()),
        ["denied", "granted", "no-consent-data"],
        "the catch-all honours `All: false`"
    );
}

/// `sample = 0.1` through the running server: a tenth of 10 000 users, each with all of
/// their messages, and `fanout route` names the others `sampled`.
#[tokio::test]
async fn a_sample_keeps_a_tenth_of_users_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let sampled = tmp.path().join("sampled.jsonl");
    let f = Fanout::start_with(Settings::default().section(&format!(
        "[[destinations]]\nname = \"sampled\"\nkind = \"file\"\npath = \"{}\"\nsample = 0.1\n",
        sampled.display()
    )));
    let users = 10_000;
    for chunk in (0..users).collect::<Vec<_>>().chunks(250) {
        let batch: Vec<Value> = chunk
            .iter()
            .flat_map(|n| {
                [
                    json!({"type": "track", "event": "E", "userId": format!("u{n}"),
                           "anonymousId": format!("a{n}"), "messageId": format!("t{n}")}),
                    json!({"type": "identify", "userId": format!("u{n}"), "messageId": format!("i{n}")}),
                ]
            })
            .collect();
        f.send_batch(json!(batch)).await;
    }
    f.wait_settled("sampled").await;
    let lines = common::file_lines(&sampled);
    let mut per_user = std::collections::BTreeMap::<String, usize>::new();
    for line in &lines {
        *per_user
            .entry(line["userId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(per_user.values().all(|&n| n == 2), "a user split");
    let kept = per_user.len();
    assert!((800..=1200).contains(&kept), "kept {kept} of {users}");

    let skipped = (0..users)
        .map(|n| format!("u{n}"))
        .find(|user| !per_user.contains_key(user))
        .unwrap();
    let kept_user = per_user.keys().next().unwrap();
    for (user, expect) in [(&skipped, json!("sampled")), (kept_user, Value::Null)] {
        let message = json!({"type": "identify", "userId": user});
        let (code, stdout, stderr) = route(&f, &[], message.to_string().as_bytes());
        assert_eq!(code, 0, "{stderr}");
        let report: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(entry(&report, 0, "sampled")["skipped"], expect, "{report}");
    }
}
