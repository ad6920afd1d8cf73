//! `kind = "postgres"`: a real fanout loading a real PostgreSQL (Debian's, started by
//! `common::postgres` in a temporary directory on a free loopback port) in Segment's
//! warehouse schema: tables, columns and types from the official Python client's calls,
//! the `users` upsert, new columns, type conflicts, exactly once through retries,
//! replays, a server down and back and an instance killed mid-load, and a permission
//! error dead-lettering the batch.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use common::clients::run_python;
use common::postgres::PgServer;
use common::{assert_success, Fanout, Settings};

const TOKEN: &str = "warehouse-admin-token";

/// fanout with a `warehouse` destination loading `pg` as `user` into `schema` (default
/// one per source: the harness's source is `test`), plus `extra` keys for it.
fn with_warehouse(pg: &PgServer, user: &str, extra: &str) -> Fanout {
    with_warehouse_at(&pg.url_as(user, "postgres"), extra, &[])
}

/// The same with the URL given, and more environment for fanout.
fn with_warehouse_at(url: &str, extra: &str, env: &[(&str, &str)]) -> Fanout {
    let mut settings = Settings::default()
        .server("retention = \"1h\"")
        .section(&format!(
            "[[destinations]]\nname = \"warehouse\"\nkind = \"postgres\"\n\
             url_env = \"WAREHOUSE_URL\"\nretry = {{ initial_backoff = \"50ms\", \
             max_backoff = \"300ms\" }}\n{extra}\n"
        ))
        .section("[admin]\ntoken_env = \"FANOUT_ADMIN_TOKEN\"\n")
        .env("FANOUT_ADMIN_TOKEN", TOKEN)
        .env("WAREHOUSE_URL", url);
    for (key, value) in env {
        settings = settings.env(key, value);
    }
    Fanout::start_with(settings)
}

async fn send(f: &Fanout, batch: Vec<Value>) {
    assert_success(
        f.post("/v1/batch")
            .json(&json!({ "batch": batch }))
            .send()
            .await
            .unwrap(),
    )
    .await;
}

fn track(id: &str, event: &str, properties: Value) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u1", "event": event,
           "properties": properties})
}

/// `table`'s columns and their types, in name order.
async fn columns(pg: &PgServer, schema: &str, table: &str) -> BTreeMap<String, String> {
    let client = pg.connect("postgres").await;
    client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &table],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn tables(pg: &PgServer, schema: &str) -> Vec<String> {
    let client = pg.connect("postgres").await;
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
             ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.get(0))
        .collect()
}

async fn count(pg: &PgServer, table: &str) -> i64 {
    let client = pg.connect("postgres").await;
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Polls until `table` (schema-qualified) has `n` rows, or 30 s pass (then panics).
async fn wait_rows(pg: &PgServer, table: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = pg.connect("postgres").await;
        let got: Option<i64> = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .ok()
            .map(|row| row.get(0));
        if got == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table} has {got:?} rows, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `name type` pairs, for comparing with `columns`.
fn typed(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, ty)| (name.to_string(), ty.to_string()))
        .collect()
}

const TS: &str = "timestamp with time zone";

/// The standard columns of every event table, plus `context_*` of the Python client.
fn standard(extra: &[(&'static str, &'static str)]) -> BTreeMap<String, String> {
    let mut all = vec![
        ("id", "text"),
        ("user_id", "text"),
        ("received_at", TS),
        ("sent_at", TS),
        ("timestamp", TS),
        ("original_timestamp", TS),
        ("uuid_ts", TS),
        ("context_library_name", "text"),
        ("context_library_version", "text"),
    ];
    all.extend_from_slice(extra);
    typed(&all)
}

#[tokio::test]
async fn the_python_clients_calls_land_in_segments_tables_and_columns() {
    let pg = PgServer::start();
    let f = with_warehouse(&pg, "postgres", "");
    run_python(&f, &[]).await;
    wait_rows(&pg, "test.tracks", 2).await;
    f.wait_settled("warehouse").await;

    assert_eq!(
        tables(&pg, "test").await,
        [
            "aliases",
            "groups",
            "identifies",
            "order_completed",
            "pages",
            "screens",
            "signed_up",
            "tracks",
            "users"
        ]
    );
    let track = [("event", "text"), ("event_text", "text")];
    assert_eq!(columns(&pg, "test", "tracks").await, {
        let mut c = standard(&[("anonymous_id", "text"), ("context_ip", "text")]);
        c.extend(typed(&track));
        c
    });
    let mut order = standard(&[
        ("context_ip", "text"),
        ("revenue", "double precision"),
        ("currency", "text"),
        ("i", "bigint"),
    ]);
    order.extend(typed(&track));
    assert_eq!(columns(&pg, "test", "order_completed").await, order);
    let mut signed_up = standard(&[("anonymous_id", "text"), ("k", "text")]);
    signed_up.extend(typed(&track));
    signed_up.remove("user_id");
    assert_eq!(columns(&pg, "test", "signed_up").await, signed_up);
    assert_eq!(
        columns(&pg, "test", "identifies").await,
        standard(&[("email", "text"), ("plan", "text")])
    );
    assert_eq!(
        columns(&pg, "test", "users").await,
        typed(&[
            ("id", "text"),
            ("received_at", TS),
            ("uuid_ts", TS),
            ("email", "text"),
            ("plan", "text")
        ]),
        "users: no anonymous_id"
    );
    assert_eq!(
        columns(&pg, "test", "pages").await,
        standard(&[("name", "text"), ("category", "text"), ("url", "text")])
    );
    assert_eq!(
        columns(&pg, "test", "screens").await,
        standard(&[("name", "text"), ("category", "text"), ("tab", "text")])
    );
    assert_eq!(
        columns(&pg, "test", "groups").await,
        standard(&[
            ("group_id", "text"),
            ("name", "text"),
            ("employees", "bigint")
        ])
    );
    assert_eq!(
        columns(&pg, "test", "aliases").await,
        standard(&[("previous_id", "text")])
    );

    let client = pg.connect("postgres").await;
    let row = client
        .query_one(
            "SELECT o.event, o.event_text, revenue, currency, i, o.context_ip \
             FROM test.order_completed o JOIN test.tracks USING (id, event, event_text)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "order_completed");
    assert_eq!(row.get::<_, String>(1), "Order Completed");
    assert_eq!(row.get::<_, f64>(2), 42.5);
    assert_eq!(row.get::<_, String>(3), "USD");
    assert_eq!(row.get::<_, i64>(4), 0);
    assert_eq!(row.get::<_, String>(5), "203.0.113.9");
    let id: String = client
        .query_one("SELECT id FROM test.signed_up", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "fixed-msg-id-0", "id is the messageId");
    let user = client
        .query_one("SELECT id, email, plan FROM test.users", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            user.get::<_, String>(0),
            user.get::<_, String>(1),
            user.get::<_, String>(2)
        ),
        ("user-1".into(), "u1@example.com".into(), "pro".into())
    );
    for table in ["identifies", "pages", "screens", "groups", "aliases"] {
        assert_eq!(count(&pg, &format!("test.{table}")).await, 1, "{table}");
    }
}

#[tokio::test]
async fn users_are_upserted_new_properties_add_columns_and_conflicts_store_null() {
    let pg = PgServer::start();
    let f = with_warehouse(&pg, "postgres", "schema = \"events\"");
    let identify = |id: &str, user: &str, traits: Value| json!({"type": "identify", "messageId": id, "userId": user, "traits": traits});
    send(
        &f,
        vec![
            identify("i1", "u2", json!({"plan": "free", "age": 30})),
            track("t1", "Plan Changed", json!({"seats": 3})),
        ],
    )
    .await;
    wait_rows(&pg, "events.plan_changed", 1).await;
    send(
        &f,
        vec![
            identify("i2", "u2", json!({"plan": "pro"})),
            // Another user's trait in the same batch must not blank u2's.
            identify("i3", "u3", json!({"age": 40})),
            track(
                "t2",
                "Plan Changed",
                json!({"seats": "many", "color": "red"}),
            ),
            track("t3", "Plan Changed", json!({"seats": 4.0})),
        ],
    )
    .await;
    wait_rows(&pg, "events.plan_changed", 3).await;
    f.wait_settled("warehouse").await;

    let client = pg.connect("postgres").await;
    let users = client
        .query(
            "SELECT id, plan, age FROM events.users WHERE id = 'u2'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(users.len(), 1, "one row per user_id");
    assert_eq!(count(&pg, "events.users").await, 2);
    assert_eq!(users[0].get::<_, String>(1), "pro", "the latest traits");
    assert_eq!(
        users[0].get::<_, i64>(2),
        30,
        "traits not sent again are kept"
    );
    assert_eq!(count(&pg, "events.identifies").await, 3);

    let plan_changed = columns(&pg, "events", "plan_changed").await;
    assert_eq!(plan_changed["seats"], "bigint", "typed by the first value");
    assert_eq!(
        plan_changed["color"], "text",
        "a new property added a column"
    );
    let seats: Vec<(String, Option<i64>)> = client
        .query("SELECT id, seats FROM events.plan_changed ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        seats,
        [
            ("t1".to_string(), Some(3)),
            ("t2".to_string(), None),
            ("t3".to_string(), Some(4))
        ],
        "\"many\" does not convert to bigint: NULL; 4.0 does"
    );
    f.wait_metric(
        "fanout_warehouse_schema_warnings_total",
        &[
            ("destination", "warehouse"),
            ("table", "plan_changed"),
            ("column", "seats"),
        ],
        |n| n == 1.0,
    )
    .await;
    assert_eq!(f.dead_letters("warehouse").await.len(), 0);
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_replay_and_a_server_down_and_back_add_no_row_twice() {
    let pg = PgServer::start();
    let mut pg = pg;
    let f = with_warehouse(&pg, "postgres", "");
    let t0 = common::next_second().await;
    let first: Vec<Value> = (0..20)
        .map(|i| track(&format!("a{i}"), "Signed Up", json!({"n": i})))
        .collect();
    send(&f, first).await;
    wait_rows(&pg, "test.signed_up", 20).await;
    f.wait_settled("warehouse").await;

    // The server goes away: batches fail (retried) until it is back.
    pg.stop();
    let second: Vec<Value> = (0..20)
        .map(|i| track(&format!("b{i}"), "Signed Up", json!({"n": i})))
        .collect();
    send(&f, second).await;
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "warehouse"), ("outcome", "retried")],
        |n| n >= 20.0,
    )
    .await;
    pg.restart();
    wait_rows(&pg, "test.signed_up", 40).await;
    f.wait_settled("warehouse").await;

    // Everything since t0 sent again: the same ids, no new rows.
    let answer = f
        .cli(&[
            "replay",
            "--destination",
            "warehouse",
            "--since",
            &rfc3339(t0),
            "--url",
            &f.url(""),
        ])
        .await;
    let answer: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(answer["messages"], 40, "{answer}");
    f.wait_metric(
        "fanout_deliveries_total",
        &[("destination", "warehouse"), ("outcome", "ok")],
        |n| n >= 80.0,
    )
    .await;
    f.wait_settled("warehouse").await;
    assert_eq!(count(&pg, "test.signed_up").await, 40);
    assert_eq!(count(&pg, "test.tracks").await, 40);
    assert_eq!(f.dead_letters("warehouse").await.len(), 0);
}

#[tokio::test]
async fn an_instance_killed_mid_load_leaves_whole_batches_and_loads_the_rest_after() {
    let pg = PgServer::start();
    let mut f = with_warehouse(
        &pg,
        "postgres",
        "batch = { max_events = 200, linger = \"20ms\" }",
    );
    let chunk = |c: i64| -> Vec<Value> {
        (c * 200..(c + 1) * 200)
            .map(|n| {
                track(
                    &format!("k{n}"),
                    "Item Viewed",
                    json!({"n": n, "sku": format!("s{n}")}),
                )
            })
            .collect()
    };
    send(&f, chunk(0)).await;
    wait_rows(&pg, "test.item_viewed", 200).await;

    // A lock on `tracks` holds the next loads mid-transaction: their `item_viewed` rows
    // are inserted (tables go in name order), their `tracks` rows wait.
    let mut holder = pg.connect("postgres").await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE test.tracks IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for c in 1..10 {
        send(&f, chunk(c)).await;
    }
    let observer = pg.connect("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'fanout' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no load waits on the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.kill9();
    lock.rollback().await.unwrap();
    assert_eq!(
        count(&pg, "test.item_viewed").await,
        200,
        "the loads cut short left none of their rows"
    );
    assert_eq!(count(&pg, "test.tracks").await, 200);

    f.restart();
    wait_rows(&pg, "test.item_viewed", 2000).await;
    f.wait_settled("warehouse").await;
    assert_eq!(count(&pg, "test.tracks").await, 2000);
    let client = pg.connect("postgres").await;
    let distinct: i64 = client
        .query_one("SELECT count(DISTINCT n) FROM test.item_viewed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 2000, "every event once");
}

#[tokio::test]
async fn a_permission_error_dead_letters_the_batch_with_postgres_message() {
    let pg = PgServer::start();
    // May log in, but not create a schema in the database.
    pg.execute(
        "postgres",
        "CREATE ROLE loader LOGIN; REVOKE CREATE ON DATABASE postgres FROM PUBLIC",
    )
    .await;
    let f = with_warehouse(&pg, "loader", "");
    send(&f, vec![track("p1", "Signed Up", json!({}))]).await;
    let letters = f
        .wait_dead_letters("warehouse", 1, Duration::from_secs(20))
        .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = letters[0].to_string();
    assert!(letter.contains("42501"), "the SQLSTATE: {letter}");
    assert!(
        letter.contains("permission denied"),
        "Postgres's message: {letter}"
    );
    assert!(tables(&pg, "test").await.is_empty());
}

#[tokio::test]
async fn two_instances_making_the_same_schema_and_table_at_once_both_load() {
    let pg = PgServer::start();
    // Made but not committed: both instances' CREATEs wait on it, then find it made by
    // someone else (a unique violation in the catalog), which must count as success.
    let mut holder = pg.connect("postgres").await;
    let making = holder.transaction().await.unwrap();
    making
        .batch_execute(
            "CREATE SCHEMA shared; CREATE TABLE shared.feature_used (id text PRIMARY KEY)",
        )
        .await
        .unwrap();
    let extra = "schema = \"shared\"";
    let a = with_warehouse(&pg, "postgres", extra);
    let b = with_warehouse(&pg, "postgres", extra);
    let make = |who: &str| -> Vec<Value> {
        (0..50)
            .map(|i| {
                track(
                    &format!("{who}{i}"),
                    "Feature Used",
                    json!({"p": i, "q": "x"}),
                )
            })
            .collect()
    };
    send(&a, make("a")).await;
    send(&b, make("b")).await;
    let observer = pg.connect("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'fanout' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the instances do not wait on the schema"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    making.commit().await.unwrap();
    wait_rows(&pg, "shared.feature_used", 100).await;
    a.wait_settled("warehouse").await;
    b.wait_settled("warehouse").await;
    assert_eq!(count(&pg, "shared.tracks").await, 100);
    let made = columns(&pg, "shared", "feature_used").await;
    assert_eq!((made["p"].as_str(), made["q"].as_str()), ("bigint", "text"));
    assert_eq!(a.dead_letters("warehouse").await.len(), 0);
    assert_eq!(b.dead_letters("warehouse").await.len(), 0);
}

#[tokio::test]
async fn a_load_waiting_on_a_lock_does_not_hold_back_the_same_users_next_batch() {
    let pg = PgServer::start();
    let f = with_warehouse(
        &pg,
        "postgres",
        "batch = { max_events = 1, linger = \"0s\" }",
    );
    send(&f, vec![track("l1", "Signed Up", json!({"plan": "pro"}))]).await;
    wait_rows(&pg, "test.signed_up", 1).await;
    // Someone holds the event table: the next load into it waits for the lock.
    let mut holder = pg.connect("postgres").await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE test.signed_up IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    send(&f, vec![track("l2", "Signed Up", json!({"plan": "team"}))]).await;
    // The same user's next message loads meanwhile: the warehouse keeps no per-user order.
    send(
        &f,
        vec![track("l3", "Order Completed", json!({"total": 3}))],
    )
    .await;
    wait_rows(&pg, "test.order_completed", 1).await;
    let client = pg.connect("postgres").await;
    let loaded: Vec<String> = client
        .query("SELECT id FROM test.tracks ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(loaded, ["l1", "l3"], "l2 waits for the lock, alone");
    lock.rollback().await.unwrap();
    wait_rows(&pg, "test.signed_up", 2).await;
    wait_rows(&pg, "test.tracks", 3).await;
    f.wait_settled("warehouse").await;
    assert_eq!(f.dead_letters("warehouse").await.len(), 0);
}

#[tokio::test]
async fn a_column_or_table_dropped_by_hand_is_made_again() {
    let pg = PgServer::start();
    let f = with_warehouse(&pg, "postgres", "");
    send(&f, vec![track("d1", "Signed Up", json!({"plan": "pro"}))]).await;
    wait_rows(&pg, "test.signed_up", 1).await;
    pg.execute(
        "postgres",
        "ALTER TABLE test.signed_up DROP COLUMN plan; DROP TABLE test.tracks",
    )
    .await;
    send(&f, vec![track("d2", "Signed Up", json!({"plan": "team"}))]).await;
    wait_rows(&pg, "test.signed_up", 2).await;
    wait_rows(&pg, "test.tracks", 1).await;
    f.wait_settled("warehouse").await;
    let client = pg.connect("postgres").await;
    let plan: String = client
        .query_one("SELECT plan FROM test.signed_up WHERE id = 'd2'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(plan, "team");
    assert_eq!(f.dead_letters("warehouse").await.len(), 0);
}

#[tokio::test]
async fn sslmode_require_loads_over_tls_checked_against_the_roots() {
    let mut pg = PgServer::start();
    let ca = pg.enable_tls();
    let url = pg
        .url("postgres")
        .replace("sslmode=disable", "sslmode=require");
    // rustls-native-certs reads the roots from SSL_CERT_FILE when it is set.
    let trusting = with_warehouse_at(&url, "", &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    send(&trusting, vec![track("s1", "Signed Up", json!({}))]).await;
    wait_rows(&pg, "test.signed_up", 1).await;
    let client = pg.connect("postgres").await;
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'fanout' AND ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "fanout's connections use TLS");
    drop(trusting);

    // A server certificate from a CA the system does not trust: not loaded, retried.
    let empty = pg.path().join("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let doubting = with_warehouse_at(&url, "", &[("SSL_CERT_FILE", empty.to_str().unwrap())]);
    send(&doubting, vec![track("s2", "Signed Up", json!({}))]).await;
    doubting
        .wait_metric(
            "fanout_deliveries_total",
            &[("destination", "warehouse"), ("outcome", "retried")],
            |n| n >= 2.0,
        )
        .await;
    assert_eq!(count(&pg, "test.signed_up").await, 1);
    assert_eq!(doubting.dead_letters("warehouse").await.len(), 0);
}
