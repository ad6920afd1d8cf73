use chrono::{DateTime, TimeZone, Utc};

use super::catalog::{column_type, ddl, quote, Needs, Tables};
use super::load::{insert, lay_out, needs, Cell, TableLoad};
use super::schema::{ColumnType, Name, Row, Value};
use super::*;
use crate::destinations::KindSettings;

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_765_000_000 + secs, 0).unwrap()
}

fn parse_err(toml_text: &str) -> KeyError {
    let table: toml::Table = toml::from_str(toml_text).unwrap();
    match DestinationConfig::from_table(table) {
        Ok(d) => d.validate().unwrap_err(),
        Err(e) => e,
    }
}

#[test]
fn config_keys_are_checked_by_name() {
    let ok: DestinationConfig =
        toml::from_str("name = \"w\"\nkind = \"postgres\"\nurl_env = \"WH_URL\"\n").unwrap();
    ok.validate().unwrap();
    let KindSettings::Postgres(own) = &ok.settings else {
        panic!("not postgres")
    };
    assert_eq!(own.schema, "{source}");
    let limits = ok.batch_limits();
    assert_eq!(limits.max_events, 10_000);
    assert_eq!(limits.linger, Duration::from_secs(5));
    // Two loads at once, without per-user order unless asked for: rows are keyed by id.
    assert_eq!(ok.concurrency(), 2);
    assert!(!ok.ordering());
    let ordered: DestinationConfig =
        toml::from_str("name = \"w\"\nkind = \"postgres\"\nurl_env = \"U\"\nordering = true\n")
            .unwrap();
    assert!(ordered.ordering());

    let e = parse_err("name = \"w\"\nkind = \"postgres\"\n");
    assert_eq!(e.key, "url_env");
    let e = parse_err("name = \"w\"\nkind = \"postgres\"\nurl_env = \"U\"\nschema = \"Web App\"\n");
    assert_eq!(e.key, "schema");
    assert!(e.message.contains("web_app"), "{e}");
    let e = parse_err("name = \"w\"\nkind = \"postgres\"\nurl_env = \"U\"\ntable = \"x\"\n");
    assert_eq!(e.key, "table");
    let fixed: DestinationConfig = toml::from_str(
        "name = \"w\"\nkind = \"postgres\"\nurl_env = \"U\"\nschema = \"segment_events\"\n",
    )
    .unwrap();
    fixed.validate().unwrap();
}

#[test]
fn a_url_that_is_no_postgres_url_is_named_by_its_variable_not_quoted() {
    let config: DestinationConfig =
        toml::from_str("name = \"w\"\nkind = \"postgres\"\nurl_env = \"FANOUT_TEST_PG_BAD_URL\"\n")
            .unwrap();
    std::env::set_var("FANOUT_TEST_PG_BAD_URL", "postgres://u:s3cret@[::1/");
    let e = config.try_build().expect_err("refused").to_string();
    assert!(e.contains("FANOUT_TEST_PG_BAD_URL"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
    std::env::set_var(
        "FANOUT_TEST_PG_BAD_URL",
        "postgres://u:s3cret@127.0.0.1:1/db",
    );
    config.try_build().expect("built without connecting");
}

#[test]
fn source_names_become_snake_case_schemas() {
    for (source, schema) in [
        ("web", "web"),
        ("iOS-App", "i_os_app"),
        ("backend.prod", "backend_prod"),
    ] {
        assert_eq!(source_schema(source), schema, "{source}");
    }
}

fn row(table: &str, upsert: bool, columns: Vec<(&str, Value)>) -> Row {
    Row {
        table: table.into(),
        columns: columns
            .into_iter()
            .map(|(n, v)| (Name::from(n.to_owned()), v))
            .collect::<Vec<_>>()
            .into(),
        upsert,
    }
}

#[test]
fn ddl_creates_new_tables_whole_and_adds_only_missing_columns() {
    let mut needs = Needs::new();
    needs.insert(
        "signed_up".into(),
        vec![
            ("id".into(), ColumnType::Text),
            ("plan".into(), ColumnType::Text),
            ("seats".into(), ColumnType::BigInt),
        ],
    );
    needs.insert(
        "tracks".into(),
        vec![
            ("id".into(), ColumnType::Text),
            ("received_at".into(), ColumnType::Timestamp),
        ],
    );
    needs.insert("pages".into(), vec![("id".into(), ColumnType::Text)]);
    let mut tables = Tables::new();
    tables.insert(
        "tracks".into(),
        [("id".to_owned(), ColumnType::Text)].into_iter().collect(),
    );
    tables.insert(
        "pages".into(),
        [("id".to_owned(), ColumnType::Text)].into_iter().collect(),
    );
    assert_eq!(
        ddl("web", &tables, &needs),
        [
            "CREATE TABLE IF NOT EXISTS \"web\".\"signed_up\" (id text PRIMARY KEY, \
             \"plan\" text, \"seats\" bigint)",
            "ALTER TABLE \"web\".\"tracks\" ADD COLUMN IF NOT EXISTS \"received_at\" timestamptz",
        ]
    );
    assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    assert_eq!(
        column_type("timestamp with time zone"),
        ColumnType::Timestamp
    );
    assert_eq!(column_type("integer"), ColumnType::BigInt);
    assert_eq!(column_type("jsonb"), ColumnType::Text);
}

#[test]
fn needs_types_each_column_by_its_first_value() {
    let rows = [
        row(
            "t",
            false,
            vec![("id", Value::Text("1".into())), ("n", Value::BigInt(1))],
        ),
        row(
            "t",
            false,
            vec![("id", Value::Text("2".into())), ("n", Value::Double(1.5))],
        ),
    ];
    let needs = needs(rows.iter());
    assert_eq!(
        needs["t"],
        [
            (Name::from("id"), ColumnType::Text),
            (Name::from("n"), ColumnType::BigInt)
        ]
    );
}

fn cells(load: &TableLoad<'_>) -> Vec<Vec<Option<Value>>> {
    load.rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| match c {
                    Cell::Null => None,
                    Cell::Row(v) => Some((*v).clone()),
                    Cell::Made(v) => Some(v.clone()),
                })
                .collect()
        })
        .collect()
}

#[test]
fn values_are_converted_to_the_columns_types_or_stored_null_with_a_mismatch() {
    let rows = [row(
        "orders",
        false,
        vec![
            ("id", Value::Text("m1".into())),
            ("total", Value::BigInt(3)),
            ("flag", Value::Text("not a bool".into())),
            ("uuid_ts", Value::Timestamp(at(0))),
        ],
    )];
    let mut tables = Tables::new();
    tables.insert(
        "orders".into(),
        [
            ("id".to_owned(), ColumnType::Text),
            ("total".to_owned(), ColumnType::Double),
            ("flag".to_owned(), ColumnType::Bool),
            ("uuid_ts".to_owned(), ColumnType::Timestamp),
        ]
        .into_iter()
        .collect(),
    );
    let mut mismatches = Vec::new();
    let laid = lay_out(rows.iter(), &tables, at(60), &mut mismatches);
    assert_eq!(
        cells(&laid["orders"]),
        [[
            Some(Value::Text("m1".into())),
            Some(Value::Double(3.0)),
            None,
            // Load time, not the time `check` mapped the message.
            Some(Value::Timestamp(at(60))),
        ]]
    );
    assert_eq!(
        mismatches,
        [load::Mismatch {
            table: "orders".into(),
            column: "flag".into(),
            column_type: Some(ColumnType::Bool),
            value_type: ColumnType::Text,
        }]
    );
}

/// The binary COPY data of a table: header, each row's field count then each field's
/// length and bytes (-1 for NULL) in Postgres's binary formats, the trailer.
#[test]
fn copy_data_is_postgres_binary_format() {
    let id = Value::Text("m1".into());
    let load = TableLoad {
        upsert: false,
        columns: vec![
            ("id".into(), ColumnType::Text),
            ("n".into(), ColumnType::BigInt),
            ("x".into(), ColumnType::Double),
            ("b".into(), ColumnType::Bool),
            ("t".into(), ColumnType::Timestamp),
        ],
        rows: vec![vec![
            Cell::Row(&id),
            Cell::Made(Value::BigInt(3)),
            Cell::Null,
            Cell::Made(Value::Bool(true)),
            // Postgres counts microseconds from 2000-01-01.
            Cell::Made(Value::Timestamp(
                Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap(),
            )),
        ]],
    };
    let mut mismatches = Vec::new();
    let data = copy::encode("t", &load, &mut mismatches);
    let mut want = b"PGCOPY\n\xff\r\n\0".to_vec();
    want.extend([0; 8]);
    want.extend(5i16.to_be_bytes());
    want.extend(2i32.to_be_bytes());
    want.extend(b"m1");
    want.extend(8i32.to_be_bytes());
    want.extend(3i64.to_be_bytes());
    want.extend((-1i32).to_be_bytes());
    want.extend(1i32.to_be_bytes());
    want.push(1);
    want.extend(8i32.to_be_bytes());
    want.extend(1_000_000i64.to_be_bytes());
    want.extend((-1i16).to_be_bytes());
    assert_eq!(&data[..], &want[..]);
    assert!(mismatches.is_empty());
}

#[test]
fn users_rows_of_one_id_merge_latest_received_over_earlier() {
    let user = |received: i64, columns: Vec<(&str, Value)>| {
        let mut all = vec![
            ("id", Value::Text("u1".into())),
            ("received_at", Value::Timestamp(at(received))),
        ];
        all.extend(columns);
        row("users", true, all)
    };
    let rows = [
        user(10, vec![("plan", Value::Text("pro".into()))]),
        user(
            5,
            vec![
                ("plan", Value::Text("free".into())),
                ("age", Value::BigInt(30)),
            ],
        ),
        user(20, vec![("email", Value::Text("a@b.c".into()))]),
    ];
    let mut tables = Tables::new();
    tables.insert(
        "users".into(),
        ["id", "received_at", "plan", "age", "email"]
            .into_iter()
            .zip([
                ColumnType::Text,
                ColumnType::Timestamp,
                ColumnType::Text,
                ColumnType::BigInt,
                ColumnType::Text,
            ])
            .map(|(n, t)| (n.to_owned(), t))
            .collect(),
    );
    let laid = lay_out(rows.iter(), &tables, at(60), &mut Vec::new());
    let users = &laid["users"];
    assert!(users.upsert);
    let names: Vec<&str> = users.columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["id", "received_at", "plan", "age", "email"]);
    assert_eq!(
        cells(users),
        [[
            Some(Value::Text("u1".into())),
            Some(Value::Timestamp(at(20))),
            Some(Value::Text("pro".into())),
            Some(Value::BigInt(30)),
            Some(Value::Text("a@b.c".into())),
        ]]
    );
}

#[test]
fn insert_skips_known_ids_and_upserts_users_unless_stored_row_is_later() {
    let load = TableLoad {
        upsert: false,
        columns: vec![
            ("id".into(), ColumnType::Text),
            ("plan".into(), ColumnType::Text),
        ],
        rows: Vec::new(),
    };
    assert_eq!(
        insert("web", "tracks", &load, "s0", "\"id\", \"plan\""),
        "INSERT INTO \"web\".\"tracks\" AS t (\"id\", \"plan\") SELECT \"id\", \"plan\" \
         FROM s0 ON CONFLICT (id) DO NOTHING"
    );
    let users = TableLoad {
        upsert: true,
        columns: vec![
            ("id".into(), ColumnType::Text),
            ("received_at".into(), ColumnType::Timestamp),
        ],
        rows: Vec::new(),
    };
    assert_eq!(
        insert("web", "users", &users, "s1", "\"id\", \"received_at\""),
        "INSERT INTO \"web\".\"users\" AS t (\"id\", \"received_at\") SELECT \"id\", \
         \"received_at\" FROM s1 ORDER BY id ON CONFLICT (id) DO UPDATE SET \"received_at\" = \
         COALESCE(EXCLUDED.\"received_at\", t.\"received_at\") WHERE t.received_at IS NULL \
         OR EXCLUDED.received_at IS NULL OR EXCLUDED.received_at >= t.received_at"
    );
}

#[test]
fn route_shows_the_tables_and_typed_columns_a_message_lands_in() {
    let own = PostgresConfig {
        url_env: "U".into(),
        schema: PER_SOURCE.into(),
    };
    let message = br#"{"type":"track","event":"Signed Up","userId":"u1","messageId":"m1",
        "receivedAt":"2026-01-01T00:00:00Z","properties":{"seats":3,"tags":["a"]}}"#;
    let Preview::Send(shown) = own.preview(message, Clock::system()).unwrap() else {
        panic!("not sent")
    };
    assert_eq!(shown["schema"], "{source}");
    let Preview::Send(shown) = own
        .preview_from("iOS-App", message, Clock::system())
        .unwrap()
    else {
        panic!("not sent")
    };
    assert_eq!(
        shown["schema"], "i_os_app",
        "route names the source's own schema"
    );
    let tables: Vec<&str> = shown["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["tracks", "signed_up"]);
    let columns = shown["rows"][1]["columns"].as_array().unwrap();
    let seats = columns.iter().find(|c| c["name"] == "seats").unwrap();
    assert_eq!(seats["type"], "bigint");
    assert_eq!(seats["value"], 3);
    let tags = columns.iter().find(|c| c["name"] == "tags").unwrap();
    assert_eq!(
        (&tags["type"], &tags["value"]),
        (&json!("text"), &json!("[\"a\"]"))
    );

    let refused = own.preview(br#"{"type":"track","messageId":"m1"}"#, Clock::system());
    assert!(
        matches!(refused.unwrap(), Preview::Refuse(why) if why.contains("receivedAt") || why.contains("event"))
    );
}

#[test]
fn a_message_that_maps_to_no_row_is_refused_alone() {
    let config: DestinationConfig = toml::from_str(
        "name = \"w\"\nkind = \"postgres\"\nurl_env = \"FANOUT_TEST_PG_CHECK_URL\"\n",
    )
    .unwrap();
    std::env::set_var("FANOUT_TEST_PG_CHECK_URL", "postgres://u@127.0.0.1:1/db");
    let destination = config.build(None, Clock::system()).unwrap();
    let ok = br#"{"type":"alias","messageId":"m1","previousId":"a","userId":"u",
        "receivedAt":"2026-01-01T00:00:00Z"}"#;
    assert!(matches!(
        destination.check(ok),
        Check::Send(Some(Prepared::Postgres(rows))) if rows[0].table == "aliases"
    ));
    let no_event = br#"{"type":"track","messageId":"m2","receivedAt":"2026-01-01T00:00:00Z"}"#;
    match destination.check(no_event) {
        Check::Refuse { code, detail } => {
            assert_eq!(code, "unmappable");
            assert!(detail.contains("`event`"), "{detail}");
        }
        _ => panic!("not refused"),
    }
}
