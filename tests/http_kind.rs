//! `kind = "http"` end to end: a destination described in TOML, through the running
//! server, into a receiver on loopback: mappings, actions, batching, auth helpers, the
//! answer policy (retries, dead letters), `fanout route` and `fanout check`.

mod common;

use std::time::Duration;

use common::receiver::{bodies, ReceivedRequest, Receiver, Reply};
use common::{assert_success, Fanout, Settings};
use serde_json::{json, Value};

const FAST_RETRY: &str = r#"retry = { initial_backoff = "100ms", max_backoff = "1s" }"#;
const WAIT: Duration = Duration::from_secs(15);

async fn send(f: &Fanout, messages: &[Value]) {
    let body = json!({ "batch": messages });
    assert_success(f.post("/v1/batch").json(&body).send().await.unwrap()).await;
}

fn identify(id: &str, user: &str, email: &str) -> Value {
    json!({"type": "identify", "messageId": id, "userId": user,
           "timestamp": "2024-03-01T12:00:00Z",
           "traits": {"email": email, "plan": null}})
}

fn track(id: &str, user: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": "Order Completed",
           "properties": {"total": "19.99"}})
}

/// The issue's example: PUT per user, bearer token from a template, identify only,
/// a typed body, and many messages per request in a `contacts` envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_end_to_end() {
    let r = Receiver::start().await;
    let settings = Settings::default()
        .env("HTTP_KIND_CRM_TOKEN", "crm-token")
        .section(&format!(
            r#"[[destinations]]
name = "crm"
kind = "http"
url = "{}/v2/contacts/{{{{ userId }}}}"
method = "PUT"
headers = {{ Authorization = "Bearer {{{{ env.HTTP_KIND_CRM_TOKEN }}}}" }}
when = {{ types = ["identify"] }}
body = {{ email = "{{{{ traits.email }}}}", plan = "{{{{ traits.plan | default('free') }}}}", seen = "{{{{ timestamp | unix }}}}" }}
batch = {{ max_events = 100, body = {{ contacts = "{{{{ batch }}}}" }} }}
{FAST_RETRY}
"#,
            r.url("")
        ));
    let f = Fanout::start_with(settings);
    send(
        &f,
        &[
            identify("i-1", "u1", "a@example.com"),
            track("t-1", "u1"),
            identify("i-2", "u2", "b@example.com"),
            identify("i-3", "u1", "c@example.com"),
        ],
    )
    .await;
    let requests = r
        .wait_until(WAIT, |rs| {
            let contacts = |path| -> usize {
                bodies(rs, path)
                    .iter()
                    .map(|b| b["contacts"].as_array().unwrap().len())
                    .sum()
            };
            contacts("/v2/contacts/u1") == 2 && contacts("/v2/contacts/u2") == 1
        })
        .await;
    for request in &requests {
        assert_eq!(request.method, "PUT");
        assert_eq!(request.header("authorization"), Some("Bearer crm-token"));
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let u1: Vec<Value> = bodies(&requests, "/v2/contacts/u1")
        .into_iter()
        .flat_map(|b| b["contacts"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        u1,
        [
            json!({"email": "a@example.com", "plan": "free", "seen": 1709294400}),
            json!({"email": "c@example.com", "plan": "free", "seen": 1709294400}),
        ]
    );
    assert!(
        requests.iter().all(|r| !r.path.contains("t-1")),
        "the track message is not for this destination"
    );
}

/// Several messages to one place go in one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_body_carries_many_messages_per_request() {
    let r = Receiver::start().await;
    let f = Fanout::start_with(Settings::default().section(&format!(
        r#"[[destinations]]
name = "bulk"
kind = "http"
url = "{}"
body = {{ id = "{{{{ messageId }}}}" }}
batch = {{ max_events = 10, linger = "1s", body = {{ events = "{{{{ batch }}}}", count = "{{{{ batch | length }}}}" }} }}
"#,
        r.url("/bulk")
    )));
    let messages: Vec<Value> = (0..5).map(|i| track(&format!("b-{i}"), "u")).collect();
    send(&f, &messages).await;
    let requests = r
        .wait_until(WAIT, |rs| {
            bodies(rs, "/bulk")
                .iter()
                .map(|b| b["events"].as_array().unwrap().len())
                .sum::<usize>()
                == 5
        })
        .await;
    let bulk = bodies(&requests, "/bulk");
    let ids: Vec<Value> = bulk
        .iter()
        .flat_map(|b| b["events"].as_array().unwrap().clone())
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, ["b-0", "b-1", "b-2", "b-3", "b-4"]);
    for body in &bulk {
        assert_eq!(body["count"], body["events"].as_array().unwrap().len());
    }
    assert!(bulk.len() < 5, "messages shared requests: {bulk:?}");
}

/// Actions pick the request per message; each auth helper sends what it should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_and_auth_helpers() {
    let r = Receiver::start().await;
    let section = |name: &str, auth: &str| {
        format!(
            r#"[[destinations]]
name = "{name}"
kind = "http"
url = "{base}/{name}/events"
{auth}
[[destinations.actions]]
name = "people"
when = {{ types = ["identify"] }}
url = "{base}/{name}/people/{{{{ userId }}}}"
method = "PATCH"
body = {{ email = "{{{{ traits.email | sha256 }}}}" }}
[[destinations.actions]]
name = "orders"
when = {{ types = ["track"], events = ["Order *"] }}
query = {{ user = "{{{{ userId }}}}" }}
body = {{ total = "{{{{ properties.total | number }}}}" }}
"#,
            base = r.url("")
        )
    };
    let settings = Settings::default()
        .env("HTTP_KIND_PASSWORD", "pw")
        .env("HTTP_KIND_BEARER", "bt")
        .env("HTTP_KIND_KEY", "k-1")
        .env("HTTP_KIND_SIGNING", "sign-secret")
        .section(&section(
            "basic",
            r#"basic = { user = "me", password_env = "HTTP_KIND_PASSWORD" }"#,
        ))
        .section(&section("bearer", r#"bearer_env = "HTTP_KIND_BEARER""#))
        .section(&section(
            "apikey",
            r#"api_key = { header = "X-Api-Key", env = "HTTP_KIND_KEY" }"#,
        ))
        .section(&section(
            "signed",
            r#"signing_secret_env = "HTTP_KIND_SIGNING""#,
        ));
    let f = Fanout::start_with(settings);
    send(
        &f,
        &[
            identify("i-1", "u1", " Jane@Example.com "),
            track("t-1", "u1"),
        ],
    )
    .await;
    let requests = r.wait_until(WAIT, |rs| rs.len() >= 8).await;
    assert_eq!(requests.len(), 8, "{requests:#?}");
    for name in ["basic", "bearer", "apikey", "signed"] {
        let people: Vec<&ReceivedRequest> = requests
            .iter()
            .filter(|r| r.path == format!("/{name}/people/u1"))
            .collect();
        assert_eq!(people.len(), 1, "{name}");
        assert_eq!(people[0].method, "PATCH");
        assert_eq!(
            people[0].json().unwrap(),
            json!({"email": fanout_sha256("jane@example.com")})
        );
        let orders: Vec<&ReceivedRequest> = requests
            .iter()
            .filter(|r| r.path == format!("/{name}/events"))
            .collect();
        assert_eq!(orders.len(), 1, "{name}");
        assert_eq!(orders[0].method, "POST");
        assert_eq!(orders[0].query.as_deref(), Some("user=u1"));
        assert_eq!(orders[0].json().unwrap(), json!({"total": 19.99}));
        for request in people.iter().chain(&orders) {
            let authorization = request.header("authorization");
            match name {
                "basic" => assert_eq!(authorization, Some("Basic bWU6cHc=")),
                "bearer" => assert_eq!(authorization, Some("Bearer bt")),
                "apikey" => assert_eq!(request.header("x-api-key"), Some("k-1")),
                _ => assert_eq!(
                    request.header("x-fanout-signature"),
                    Some(
                        fanout::destinations::hmac_sha256_signature(b"sign-secret", &request.body)
                            .as_str()
                    )
                ),
            }
        }
    }
}

fn fanout_sha256(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 429 and 5xx are retried (honouring Retry-After); a 4xx dead-letters the message with
/// the receiver's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_go_through_the_retry_and_dead_letter_policy() {
    let r = Receiver::start().await;
    r.push_reply(Reply::status(429).header("retry-after", "1"));
    r.push_reply(Reply::status(503));
    let f = Fanout::start_with(Settings::default().section(&format!(
        "[[destinations]]\nname = \"api\"\nkind = \"http\"\nurl = \"{}\"\n\
         body = {{ id = \"{{{{ messageId }}}}\" }}\n{FAST_RETRY}\n",
        r.url("/api")
    )));
    send(&f, &[track("retried", "u")]).await;
    let requests = r.wait_until(WAIT, |rs| rs.iter().any(|r| r.ok())).await;
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 503, 200]);
    assert!(requests
        .iter()
        .all(|r| r.json() == Some(json!({"id": "retried"}))));
    assert!(
        requests[1].at - requests[0].at >= Duration::from_millis(900),
        "Retry-After held the retry"
    );

    let answer = r#"{"error":"invalid_email","detail":"no"}"#;
    r.push_reply(Reply::json(422, answer));
    send(&f, &[track("refused", "u")]).await;
    let rows = f.wait_dead_letters("api", 1, WAIT).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["reason"], "rejected");
    assert_eq!(rows[0]["status"], 422);
    assert_eq!(rows[0]["response"], answer);
    assert_eq!(rows[0]["attempts"], 1);
}

/// `fanout route` prints the request, secrets masked; `fanout check` names a bad
/// template by key and line.
#[tokio::test]
async fn route_previews_and_check_names_bad_templates() {
    let section = r#"[[destinations]]
name = "crm"
kind = "http"
url = "https://crm.example.com/v2/contacts/{{ userId }}"
headers = { Authorization = "Bearer {{ env.HTTP_KIND_UNSET_TOKEN }}" }
api_key = { header = "X-Key", env = "HTTP_KIND_UNSET_KEY" }
body = { email = "{{ traits.email | lower }}" }
"#;
    let f = Fanout::start_with(
        Settings::default()
            .env("HTTP_KIND_UNSET_TOKEN", "t")
            .env("HTTP_KIND_UNSET_KEY", "k")
            .section(section),
    );
    let mut command = f.command();
    command.arg("route");
    let input = identify("r-1", "u9", "Jane@Example.com").to_string();
    let (code, out, err) = common::run_with_stdin(command, input.into_bytes());
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("\"t\"") && !out.contains("\"k\""), "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let entry = report["messages"][0]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "crm")
        .unwrap()
        .clone();
    assert_eq!(
        entry["payload"]["requests"][0],
        json!({
            "action": "request",
            "method": "POST",
            "url": "https://crm.example.com/v2/contacts/u9",
            "headers": {"authorization": "Bearer ***", "x-key": "***"},
            "body": {"email": "jane@example.com"},
        })
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let bad = std::fs::read_to_string(f.config_path())
        .unwrap()
        .replace("{{ traits.email | lower }}", "{{ traits.email | lower }");
    std::fs::write(&path, bad).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`destinations[1].body.email` (line ")
            && stderr.contains("template error on line 1"),
        "{stderr}"
    );
}
