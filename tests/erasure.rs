//! Privacy deletions (`Destination::erase`, what a `suppress_with_delete` regulation asks
//! of each destination) against real receivers on loopback: Klaviyo's deletion jobs (the
//! test receiver, with Klaviyo's documented limits and every body checked by Klaviyo's
//! SDK models), a real PostgreSQL, a signed webhook, a function's `onDelete`, and the
//! kinds that cannot delete; first each destination on its own, then all of them behind a
//! running fanout, asked through `POST /admin/regulations`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::klaviyo::{self, error_body, Klaviyo, API_KEY, CURRENT, KEY_ENV};
use common::postgres::PgServer;
use common::receiver::{Receiver, Reply};
use common::{Fanout, Settings};
use fanout::clock::Clock;
use fanout::destinations::{
    hmac_sha256_signature, AnyDestination, Check, DestinationConfig, Erasure, Outgoing, Subject,
};

/// The destination `toml_text` describes, its files read from `dir`.
fn destination(toml_text: &str, dir: Option<&Path>) -> AnyDestination {
    let mut config: DestinationConfig = toml::from_str(toml_text).unwrap();
    if let Some(dir) = dir {
        config.load_files(dir).unwrap();
    }
    config.build(None, Clock::system()).unwrap()
}

fn subject(user: Option<&str>, anonymous: Option<&str>, email: Option<&str>) -> Subject {
    Subject {
        user_id: user.map(str::to_string),
        anonymous_id: anonymous.map(str::to_string),
        email: email.map(str::to_string),
        phone: None,
    }
}

fn done(outcome: Result<Erasure, fanout::destinations::EraseError>) -> String {
    match outcome {
        Ok(Erasure::Done { detail }) => detail,
        other => panic!("not done: {other:?}"),
    }
}

fn klaviyo_destination(k: &Klaviyo) -> AnyDestination {
    std::env::set_var(KEY_ENV, API_KEY);
    destination(
        &format!(
            "name = \"klaviyo\"\nkind = \"klaviyo\"\napi_key_env = \"{KEY_ENV}\"\n\
             base_url = \"{}\"\n",
            k.base_url()
        ),
        None,
    )
}

/// The identifier each deletion job named: `email`, `phone_number` or `id`, and its value.
fn deletions(k: &Klaviyo) -> Vec<(String, String)> {
    k.requests()
        .iter()
        .filter(|r| r.method == "POST" && klaviyo::path_of(r) == klaviyo::DELETION_JOBS)
        .map(|r| {
            let profile = r.json().unwrap()["data"]["attributes"]["profile"]["data"].clone();
            match profile["id"].as_str() {
                Some(id) => ("id".to_string(), id.to_string()),
                None => {
                    let (key, value) = profile["attributes"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .next()
                        .unwrap();
                    (key.clone(), value.as_str().unwrap().to_string())
                }
            }
        })
        .collect()
}

#[tokio::test]
async fn klaviyo_deletes_by_email_else_phone_else_the_profile_found_by_user_id() {
    let k = Klaviyo::start(CURRENT).await;
    k.add_profile(json!({"external_id": "u-3", "email": "c@example.com"}));
    let d = klaviyo_destination(&k);

    let with_all = Subject {
        phone: Some("+15555550101".into()),
        ..subject(Some("u-1"), Some("a-1"), Some("a@example.com"))
    };
    assert_eq!(
        done(d.erase(&with_all).await),
        "deletion job accepted, by email"
    );
    let phone_only = Subject {
        phone: Some("+15555550102".into()),
        ..subject(Some("u-2"), None, None)
    };
    assert_eq!(
        done(d.erase(&phone_only).await),
        "deletion job accepted, by phone number"
    );
    assert_eq!(
        done(d.erase(&subject(Some("u-3"), None, None)).await),
        "deletion job accepted for profile 01P-u-3 (found by external_id)"
    );
    assert!(k.profile_state("u-3").is_none(), "the profile is deleted");
    assert_eq!(
        done(d.erase(&subject(Some("u-4"), None, None)).await),
        "no profile in Klaviyo"
    );
    let anonymous = d
        .erase(&subject(None, Some("a-5"), None))
        .await
        .unwrap_err();
    assert!(!anonymous.retry, "{anonymous:?}");
    assert!(
        anonymous.message.contains("only an anonymousId"),
        "{anonymous:?}"
    );

    assert_eq!(
        deletions(&k),
        [
            ("email".to_string(), "a@example.com".to_string()),
            ("phone_number".to_string(), "+15555550102".to_string()),
            ("id".to_string(), "01P-u-3".to_string()),
        ]
    );
    let lookups: Vec<String> = k
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| {
            let query = r.query.clone().unwrap_or_default();
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "filter")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        lookups,
        [
            r#"equals(external_id,"u-3")"#,
            r#"equals(external_id,"u-4")"#
        ]
    );
    assert_eq!(k.too_many(), 0, "{}", k.summary());
    k.assert_valid().await;
}

#[tokio::test]
async fn klaviyo_deletions_keep_to_3_a_second_and_60_a_minute() {
    let k = Klaviyo::start(CURRENT).await;
    let d = klaviyo_destination(&k);
    // Twice the burst: without the bucket, the receiver's 1 s window would answer 429.
    for i in 0..6 {
        let email = format!("user{i}@example.com");
        done(d.erase(&subject(None, None, Some(&email))).await);
    }
    assert_eq!(deletions(&k).len(), 6);
    assert_eq!(k.too_many(), 0, "{}", k.summary());
    k.assert_valid().await;
}

#[tokio::test]
async fn klaviyo_429_and_5xx_are_retried_and_other_4xx_fail_with_klaviyos_detail() {
    let k = Klaviyo::start(CURRENT).await;
    let d = klaviyo_destination(&k);
    let who = subject(Some("u-1"), None, Some("a@example.com"));

    k.receiver.push_reply(
        klaviyo::reply(
            429,
            &error_body(429, "throttled", "Throttled.", "Request was throttled.", ""),
        )
        .header("Retry-After", "1"),
    );
    let throttled = d.erase(&who).await.unwrap_err();
    assert!(throttled.retry, "{throttled:?}");
    assert!(
        throttled.message.contains("retry after 1s"),
        "{throttled:?}"
    );
    // The endpoint's bucket holds the next request until Klaviyo's Retry-After passed.
    done(d.erase(&who).await);
    let requests = k.requests();
    assert!(
        requests[1].at.duration_since(requests[0].at) >= Duration::from_secs(1),
        "{}",
        k.summary()
    );

    k.receiver.push_reply(klaviyo::reply(
        503,
        &error_body(503, "error", "Down.", "Down.", ""),
    ));
    assert!(d.erase(&who).await.unwrap_err().retry);

    k.receiver.push_reply(klaviyo::reply(
        403,
        &error_body(
            403,
            "permission_denied",
            "You do not have permission to perform this action.",
            "The key is missing the data-privacy:write scope.",
            "",
        ),
    ));
    let refused = d.erase(&who).await.unwrap_err();
    assert!(!refused.retry, "{refused:?}");
    assert_eq!(
        refused.message,
        "Klaviyo: HTTP 403 (permission_denied): The key is missing the data-privacy:write scope."
    );
}

/// Loads `messages` from the source `source` through the destination, as delivery does.
async fn load(d: &AnyDestination, source: &str, messages: &[Value]) {
    let jsons: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect();
    let prepared: Vec<_> = jsons
        .iter()
        .map(|json| match d.check(json) {
            Check::Send(prepared) => prepared,
            _ => panic!("not sent: {}", String::from_utf8_lossy(json)),
        })
        .collect();
    let batch: Vec<Outgoing<'_>> = jsons
        .iter()
        .zip(&prepared)
        .map(|(json, prepared)| Outgoing {
            source,
            json,
            prepared: prepared.as_ref(),
        })
        .collect();
    d.send(&batch).await.unwrap();
}

fn message(kind: &str, id: &str, user: Option<&str>, anonymous: Option<&str>) -> Value {
    let mut m = json!({"type": kind, "messageId": id, "receivedAt": "2026-12-01T10:00:00.000Z",
                       "timestamp": "2026-12-01T09:59:59.000Z"});
    if let Some(user) = user {
        m["userId"] = json!(user);
    }
    if let Some(anonymous) = anonymous {
        m["anonymousId"] = json!(anonymous);
    }
    match kind {
        "track" => m["event"] = json!("Signed Up"),
        "identify" => m["traits"] = json!({"email": "u1@example.com", "plan": "pro"}),
        _ => {}
    }
    m
}

async fn count(pg: &PgServer, table: &str, condition: &str) -> i64 {
    let client = pg.connect("postgres").await;
    client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE {condition}"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{table}: {e:?}"))
        .get(0)
}

#[tokio::test]
async fn postgres_deletes_the_subjects_rows_of_every_table_found_in_the_catalog() {
    let pg = PgServer::start();
    std::env::set_var("ERASURE_PG_URL", pg.url("postgres"));
    let config = "name = \"warehouse\"\nkind = \"postgres\"\nurl_env = \"ERASURE_PG_URL\"\n";
    let loader = destination(config, None);
    load(
        &loader,
        "web",
        &[
            message("track", "t1", Some("u1"), Some("a1")),
            message("track", "t2", Some("u2"), Some("a2")),
            message("page", "p1", None, Some("a1")),
            message("identify", "i1", Some("u1"), Some("a1")),
            message("identify", "i2", Some("u2"), None),
        ],
    )
    .await;
    load(&loader, "ios", &[message("screen", "s1", Some("u1"), None)]).await;
    // A source since removed from the config, and a table fanout never made (no uuid_ts
    // in its schema): the first is searched, the second is not fanout's to touch.
    pg.execute(
        "postgres",
        "CREATE SCHEMA old_app; \
         CREATE TABLE old_app.tracks (id text PRIMARY KEY, user_id text, uuid_ts timestamptz); \
         INSERT INTO old_app.tracks VALUES ('o1', 'u1', now()), ('o2', 'u2', now()); \
         CREATE SCHEMA crm; CREATE TABLE crm.contacts (id text PRIMARY KEY, user_id text); \
         INSERT INTO crm.contacts VALUES ('c1', 'u1')",
    )
    .await;

    // A destination that loaded nothing (as after a restart) finds the tables itself.
    let eraser = destination(config, None);
    let detail = done(eraser.erase(&subject(Some("u1"), Some("a1"), None)).await);
    assert!(
        detail.starts_with("deleted 7 rows"),
        "t1 in tracks and signed_up, p1, i1 in identifies and users, s1, o1: {detail}"
    );
    for table in [
        "web.tracks 1",
        "web.signed_up 1",
        "web.users 1",
        "old_app.tracks 1",
    ] {
        assert!(detail.contains(table), "{table}: {detail}");
    }
    for table in [
        "web.tracks",
        "web.signed_up",
        "web.identifies",
        "ios.screens",
        "old_app.tracks",
    ] {
        assert_eq!(
            count(&pg, table, "user_id = 'u1'").await,
            0,
            "{table}: {detail}"
        );
    }
    assert_eq!(count(&pg, "web.pages", "anonymous_id = 'a1'").await, 0);
    assert_eq!(count(&pg, "web.users", "id = 'u1'").await, 0);
    // Everyone else's rows stay.
    assert_eq!(count(&pg, "web.tracks", "user_id = 'u2'").await, 1);
    assert_eq!(count(&pg, "web.users", "id = 'u2'").await, 1);
    assert_eq!(count(&pg, "old_app.tracks", "user_id = 'u2'").await, 1);
    assert_eq!(count(&pg, "crm.contacts", "user_id = 'u1'").await, 1);

    // Done again: nothing left, still done.
    let again = done(eraser.erase(&subject(Some("u1"), Some("a1"), None)).await);
    assert!(again.starts_with("deleted 0 rows"), "{again}");
    let email_only = eraser
        .erase(&subject(None, None, Some("u1@example.com")))
        .await
        .unwrap_err();
    assert!(!email_only.retry, "{email_only:?}");
}

#[tokio::test]
async fn postgres_with_a_fixed_schema_searches_that_schema_only() {
    let pg = PgServer::start();
    std::env::set_var("ERASURE_PG_FIXED_URL", pg.url("postgres"));
    let config = "name = \"warehouse\"\nkind = \"postgres\"\nurl_env = \"ERASURE_PG_FIXED_URL\"\n\
                  schema = \"events\"\n";
    let d = destination(config, None);
    load(&d, "web", &[message("track", "t1", Some("u1"), None)]).await;
    pg.execute(
        "postgres",
        "CREATE SCHEMA other; \
         CREATE TABLE other.tracks (id text PRIMARY KEY, user_id text, uuid_ts timestamptz); \
         INSERT INTO other.tracks VALUES ('o1', 'u1', now())",
    )
    .await;
    let detail = done(d.erase(&subject(Some("u1"), None, None)).await);
    assert!(detail.contains("events.tracks 1"), "{detail}");
    assert_eq!(count(&pg, "events.tracks", "user_id = 'u1'").await, 0);
    assert_eq!(count(&pg, "events.signed_up", "user_id = 'u1'").await, 0);
    assert_eq!(count(&pg, "other.tracks", "user_id = 'u1'").await, 1);
}

#[tokio::test]
async fn a_webhook_gets_a_signed_segment_delete_message() {
    let receiver = Receiver::start().await;
    std::env::set_var("ERASURE_WEBHOOK_SECRET", "s3cret");
    let config = |payload: &str| {
        format!(
            "name = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
             signing_secret_env = \"ERASURE_WEBHOOK_SECRET\"\npayload = \"{payload}\"\n",
            receiver.url("/hook")
        )
    };
    let one = destination(&config("message"), None);
    let detail = done(
        one.erase(&subject(Some("u1"), Some("a1"), Some("u1@example.com")))
            .await,
    );
    assert_eq!(detail, "delete message accepted");
    let array = destination(&config("array"), None);
    done(array.erase(&subject(Some("u2"), None, None)).await);

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(
            r.header("x-fanout-signature"),
            Some(hmac_sha256_signature(b"s3cret", &r.body).as_str())
        );
    }
    let message = requests[0].json().unwrap();
    assert_eq!(message["type"], "delete");
    assert_eq!(message["userId"], "u1");
    assert_eq!(message["anonymousId"], "a1");
    assert!(message["messageId"]
        .as_str()
        .is_some_and(|id| id.len() == 36));
    assert!(message["timestamp"].as_str().is_some());
    assert!(
        !String::from_utf8_lossy(&requests[0].body).contains("u1@example.com"),
        "no traits"
    );
    let batch = requests[1].json().unwrap();
    assert_eq!(batch.as_array().map(Vec::len), Some(1), "{batch}");
    assert_eq!(batch[0]["userId"], "u2");
    assert!(batch[0].get("anonymousId").is_none());

    receiver.push_reply(Reply::json(400, r#"{"error":"unknown user"}"#));
    let refused = one
        .erase(&subject(Some("u3"), None, None))
        .await
        .unwrap_err();
    assert!(!refused.retry);
    assert!(refused.message.ends_with("unknown user"), "{refused:?}");
    receiver.push_reply(Reply::status(503));
    assert!(
        one.erase(&subject(Some("u3"), None, None))
            .await
            .unwrap_err()
            .retry
    );
}

#[tokio::test]
async fn a_function_deletes_through_on_delete_or_cannot() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("deletes.js"),
        "async function onTrack(event) {}\n\
         async function onDelete(event, settings) {\n\
           if (event.userId === 'later') throw new RetryError('try again');\n\
           if (event.userId === 'bad') throw new ValidationError('no such user');\n\
           const r = await fetch('https://api.example.com/forget', {method: 'POST',\n\
             headers: {'content-type': 'application/json'},\n\
             body: JSON.stringify({type: event.type, user: event.userId, key: settings.key})});\n\
           if (!r.ok) throw new RetryError('status ' + r.status);\n\
         }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tracks.js"),
        "async function onTrack(event) {}\n",
    )
    .unwrap();
    let with_on_delete = destination(
        &format!(
            "name = \"fn\"\nkind = \"function\"\nfile = \"deletes.js\"\n\
             settings = {{ key = \"k1\" }}\n\
             fetch_hosts = {{ \"api.example.com\" = \"http://127.0.0.1:{}\" }}\n",
            receiver.port()
        ),
        Some(dir.path()),
    );
    assert_eq!(
        done(with_on_delete.erase(&subject(Some("u1"), None, None)).await),
        "onDelete returned"
    );
    let got = receiver.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json().unwrap(),
        json!({"type": "delete", "user": "u1", "key": "k1"})
    );
    let later = with_on_delete
        .erase(&subject(Some("later"), None, None))
        .await;
    assert!(later.unwrap_err().retry);
    let bad = with_on_delete
        .erase(&subject(Some("bad"), None, None))
        .await
        .unwrap_err();
    assert!(
        !bad.retry && bad.message.contains("no such user"),
        "{bad:?}"
    );

    let without = destination(
        "name = \"fn2\"\nkind = \"function\"\nfile = \"tracks.js\"\n",
        Some(dir.path()),
    );
    assert_eq!(
        without
            .erase(&subject(Some("u1"), None, None))
            .await
            .unwrap(),
        Erasure::NotSupported
    );
}

#[tokio::test]
async fn file_stdout_segment_and_http_kinds_cannot_delete() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("ERASURE_SEGMENT_KEY", "wk");
    let configs = [
        format!(
            "name = \"f\"\nkind = \"file\"\npath = \"{}\"\n",
            dir.path().join("out.jsonl").display()
        ),
        "name = \"s\"\nkind = \"stdout\"\n".to_string(),
        "name = \"seg\"\nkind = \"segment\"\nwrite_key_env = \"ERASURE_SEGMENT_KEY\"\n".to_string(),
        "name = \"h\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n".to_string(),
    ];
    for config in configs {
        let d = destination(&config, None);
        assert_eq!(
            d.erase(&subject(Some("u1"), None, None)).await.unwrap(),
            Erasure::NotSupported,
            "{config}"
        );
    }
}

const TOKEN: &str = "erasure-admin-token";

/// Polls `GET /admin/regulations` until no destination of the first regulation is
/// pending (or 30 s pass: then panics); returns its reports by destination.
async fn wait_reports(f: &Fanout) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = common::regulations::list(f, TOKEN).await;
        let reports = all
            .first()
            .map_or(Value::Null, |r| r["destinations"].clone());
        let pending = reports
            .as_object()
            .is_none_or(|all| all.values().any(|r| r["status"] == "pending"));
        if !pending {
            return reports;
        }
        assert!(Instant::now() < deadline, "still pending: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn suppress_with_delete_reaches_every_destination_that_can_delete() {
    let k = Klaviyo::start(CURRENT).await;
    let pg = PgServer::start();
    let hook = Receiver::start().await;
    let forget = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("forget.js");
    std::fs::write(
        &script,
        "async function onTrack(event) {}\n\
         async function onIdentify(event) {}\n\
         async function onDelete(event) {\n\
           await fetch('https://api.example.com/forget', {method: 'POST',\n\
             body: JSON.stringify({user: event.userId})});\n\
         }\n",
    )
    .unwrap();
    let fast = "batch = { linger = \"100ms\" }";
    let settings = Settings::default()
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN)
        .section(&format!(
            "[[destinations]]\nname = \"klaviyo\"\nkind = \"klaviyo\"\n\
             api_key_env = \"{KEY_ENV}\"\nbase_url = \"{}\"\n{fast}\n",
            k.base_url()
        ))
        .env(KEY_ENV, API_KEY)
        .section(&format!(
            "[[destinations]]\nname = \"warehouse\"\nkind = \"postgres\"\n\
             url_env = \"WAREHOUSE_URL\"\n{fast}\n"
        ))
        .env("WAREHOUSE_URL", &pg.url("postgres"))
        .section(&format!(
            "[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\
             payload = \"message\"\n",
            hook.url("/hook")
        ))
        .section(&format!(
            "[[destinations]]\nname = \"fn\"\nkind = \"function\"\nfile = \"{}\"\n\
             fetch_hosts = {{ \"api.example.com\" = \"http://127.0.0.1:{}\" }}\n",
            script.display(),
            forget.port()
        ));
    let f = Fanout::start_with(settings);
    f.send_batch(json!([
        {"type": "identify", "messageId": "i1", "userId": "u1", "anonymousId": "a1",
         "traits": {"email": "u1@example.com"}},
        {"type": "track", "messageId": "t1", "userId": "u1", "event": "Signed Up"},
        {"type": "track", "messageId": "t2", "userId": "u2", "event": "Signed Up"},
    ]))
    .await;
    f.wait_delivered(3).await;
    k.wait(
        "u1's profile and both events",
        Duration::from_secs(30),
        |k| k.profile_state("u1").is_some() && k.events().len() == 2,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg
        .connect("postgres")
        .await
        .query_one("SELECT count(*) FROM test.tracks", &[])
        .await
        .map_or(0, |row| row.get::<_, i64>(0))
        < 2
    {
        assert!(Instant::now() < deadline, "the warehouse did not load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook.wait_for_messages(3, Duration::from_secs(30)).await;

    let body = json!({"type": "suppress_with_delete", "userId": "u1"});
    let (status, made) = common::regulations::post(&f, TOKEN, &body).await;
    assert_eq!(status, 201, "{made}");
    let reports = wait_reports(&f).await;

    // Klaviyo: by the email the identify taught fanout, not by the external_id.
    assert_eq!(reports["klaviyo"]["status"], "done", "{reports}");
    assert_eq!(
        reports["klaviyo"]["detail"], "deletion job accepted, by email",
        "{reports}"
    );
    assert_eq!(
        deletions(&k),
        [("email".to_string(), "u1@example.com".to_string())]
    );
    assert!(k.profile_state("u1").is_none());
    k.assert_valid().await;

    assert_eq!(reports["warehouse"]["status"], "done", "{reports}");
    let detail = reports["warehouse"]["detail"].as_str().unwrap();
    assert!(detail.contains("test.tracks 1"), "{detail}");
    assert!(detail.contains("test.users 1"), "{detail}");
    for table in ["test.tracks", "test.signed_up", "test.identifies"] {
        assert_eq!(count(&pg, table, "user_id = 'u1'").await, 0, "{table}");
    }
    assert_eq!(count(&pg, "test.users", "id = 'u1'").await, 0);
    assert_eq!(count(&pg, "test.tracks", "user_id = 'u2'").await, 1);

    assert_eq!(
        reports["hook"]["detail"], "delete message accepted",
        "{reports}"
    );
    let delete = hook
        .requests()
        .iter()
        .filter_map(|r| r.json())
        .find(|m| m["type"] == "delete")
        .expect("a delete message");
    assert_eq!(delete["userId"], "u1");

    assert_eq!(reports["fn"]["detail"], "onDelete returned", "{reports}");
    assert_eq!(forget.requests()[0].json().unwrap(), json!({"user": "u1"}));

    assert_eq!(reports["out"], json!({"status": "not supported"}));
}
