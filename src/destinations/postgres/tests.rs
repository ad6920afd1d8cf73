use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};

use bytes::Bytes;

use super::assemble::needs;
use super::buffers::Buffers;
use super::catalog::{column_type, ddl, quote, Needs, Tables};
use super::encoded::Encoded;
use super::load::{moves, TableLoad};
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
    let encoded = messages(&rows);
    let needs = needs(&encoded);
    assert_eq!(
        needs["t"],
        [
            (Name::from("id"), ColumnType::Text),
            (Name::from("n"), ColumnType::BigInt)
        ]
    );
}

/// Each row its own message, as `check` would have encoded it.
fn messages(rows: &[Row]) -> Vec<Encoded> {
    rows.iter()
        .map(|row| Encoded::of_rows(std::slice::from_ref(row)))
        .collect()
}

/// `assemble::tables`, with buffers of its own.
fn assemble(
    messages: &[&Encoded],
    needs: &Needs,
    tables: &Tables,
    loaded_at: DateTime<Utc>,
    mismatches: &mut Vec<load::Mismatch>,
) -> BTreeMap<String, TableLoad> {
    let buffers = Buffers::default();
    super::assemble::tables(messages, needs, tables, loaded_at, &buffers, mismatches)
}

/// The tables' COPY data of `rows`, each row its own message.
fn lay_out(
    rows: &[Row],
    tables: &Tables,
    loaded_at: DateTime<Utc>,
    mismatches: &mut Vec<load::Mismatch>,
) -> BTreeMap<String, TableLoad> {
    let encoded = messages(rows);
    let encoded: Vec<&Encoded> = encoded.iter().collect();
    let needs = needs(encoded.iter().copied());
    assemble(&encoded, &needs, tables, loaded_at, mismatches)
}

/// Binary COPY data read back: per row, each field's bytes (`None`: NULL).
pub fn copy_rows(data: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
    assert_eq!(&data[..19], super::assemble::HEADER, "header");
    let mut at = 19;
    let mut take = |n: usize| {
        at += n;
        &data[at - n..at]
    };
    let mut rows = Vec::new();
    loop {
        let width = i16::from_be_bytes(take(2).try_into().unwrap());
        if width == -1 {
            break;
        }
        let row = (0..width)
            .map(|_| {
                let length = i32::from_be_bytes(take(4).try_into().unwrap());
                (length >= 0).then(|| take(length as usize).to_vec())
            })
            .collect();
        rows.push(row);
    }
    assert_eq!(at, data.len(), "bytes after the trailer");
    rows
}

/// `load`'s rows read back as values of its columns' types.
fn cells(load: &TableLoad) -> Vec<Vec<Option<Value>>> {
    let value = |ty: ColumnType, bytes: Vec<u8>| match ty {
        ColumnType::Text => Value::Text(String::from_utf8(bytes).unwrap()),
        ColumnType::BigInt => Value::BigInt(i64::from_be_bytes(bytes.try_into().unwrap())),
        ColumnType::Double => Value::Double(f64::from_be_bytes(bytes.try_into().unwrap())),
        ColumnType::Bool => Value::Bool(bytes == [1]),
        ColumnType::Timestamp => {
            let micros = i64::from_be_bytes(bytes.try_into().unwrap());
            let epoch = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
            Value::Timestamp(epoch + chrono::TimeDelta::microseconds(micros))
        }
    };
    copy_rows(&load.data)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .zip(&load.columns)
                .map(|(field, (_, ty))| field.map(|bytes| value(*ty, bytes)))
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
    let laid = lay_out(&rows, &tables, at(60), &mut mismatches);
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
    // `n` converted from text, `x` absent: NULL.
    let row = row(
        "t",
        false,
        vec![
            ("id", Value::Text("m1".into())),
            ("n", Value::Text("3".into())),
            ("b", Value::Bool(true)),
            // Postgres counts microseconds from 2000-01-01.
            (
                "t",
                Value::Timestamp(Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 1).unwrap()),
            ),
        ],
    );
    let columns: Vec<(Name, ColumnType)> = vec![
        ("id".into(), ColumnType::Text),
        ("n".into(), ColumnType::BigInt),
        ("x".into(), ColumnType::Double),
        ("b".into(), ColumnType::Bool),
        ("t".into(), ColumnType::Timestamp),
    ];
    let tables: Tables = [(
        "t".to_owned(),
        columns.iter().map(|(n, ty)| (n.to_string(), *ty)).collect(),
    )]
    .into_iter()
    .collect();
    let needs: Needs = [("t".to_owned(), columns)].into_iter().collect();
    let encoded = Encoded::of_rows(&[row]);
    let mut mismatches = Vec::new();
    let laid = assemble(&[&encoded], &needs, &tables, at(0), &mut mismatches);
    let data = &laid["t"].data;
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
fn tracks_rows_are_taken_from_the_event_tables_staging_rows_where_they_are_the_same() {
    let track = |id: &str, event: &str| {
        format!(
            r#"{{"type":"track","event":"{event}","messageId":"{id}","userId":"u",
            "receivedAt":"2026-01-01T00:00:00Z","context":{{"ip":"203.0.113.7"}},
            "properties":{{"plan":"pro"}}}}"#
        )
    };
    let texts = [
        track("m1", "Signed Up"),
        track("m2", "Order Done"),
        track("m3", "Signed Up"),
    ];
    let encoded: Vec<Encoded> = texts
        .iter()
        .map(|t| Encoded::of(t.as_bytes()).unwrap())
        .collect();
    let encoded: Vec<&Encoded> = encoded.iter().collect();
    let needs = needs(encoded.iter().copied());
    let mut tables: Tables = needs
        .iter()
        .map(|(table, columns)| {
            let columns = columns.iter().map(|(n, ty)| (n.to_string(), *ty));
            (table.clone(), columns.collect())
        })
        .collect();
    // Another type in `order_done` than in `tracks`: its rows are not those of `tracks`.
    let ip = tables["order_done"]["context_ip"];
    assert_eq!(ip, ColumnType::Text);
    tables
        .get_mut("order_done")
        .unwrap()
        .insert("context_ip".into(), ColumnType::BigInt);
    let laid = assemble(&encoded, &needs, &tables, at(0), &mut Vec::new());
    let tracks = &laid["tracks"];
    let ids = |load: &TableLoad| -> Vec<Option<Vec<u8>>> {
        let rows = rows_by_name(&load.columns, &load.data);
        rows.into_iter()
            .map(|mut row| row.remove("id").flatten())
            .collect()
    };
    assert_eq!((tracks.rows, ids(tracks)), (1, vec![Some(b"m2".to_vec())]));
    assert_eq!(ids(&laid["signed_up"]).len(), 2);
    let every: Vec<Name> = tracks.columns.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(tracks.also, vec![("signed_up".to_string(), every)]);
    assert!(laid["signed_up"].also.is_empty() && laid["order_done"].also.is_empty());
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
    let laid = lay_out(&rows, &tables, at(60), &mut Vec::new());
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
fn moves_skip_known_ids_and_upsert_users_unless_stored_row_is_later() {
    let load = TableLoad {
        upsert: false,
        columns: vec![
            ("id".into(), ColumnType::Text),
            ("plan".into(), ColumnType::Text),
        ],
        data: Bytes::new(),
        rows: 1,
        also: vec![
            ("signed_up".into(), vec!["id".into(), "plan".into()]),
            ("unstaged".into(), vec!["id".into()]),
        ],
    };
    let stage_of = |table: &str| (table == "signed_up").then_some("s9");
    assert_eq!(
        moves("web", "tracks", &load, Some("s0"), stage_of),
        [
            "INSERT INTO \"web\".\"tracks\" AS t (\"id\", \"plan\") SELECT \"id\", \"plan\" \
             FROM s0 ON CONFLICT (id) DO NOTHING",
            "INSERT INTO \"web\".\"tracks\" (\"id\", \"plan\") SELECT \"id\", \"plan\" \
             FROM s9 ON CONFLICT (id) DO NOTHING"
        ]
    );
    // No rows of its own: only what the other staging tables give.
    assert_eq!(moves("web", "tracks", &load, None, stage_of).len(), 1);
    let users = TableLoad {
        upsert: true,
        columns: vec![
            ("id".into(), ColumnType::Text),
            ("received_at".into(), ColumnType::Timestamp),
        ],
        data: Bytes::new(),
        rows: 1,
        also: Vec::new(),
    };
    assert_eq!(
        moves("web", "users", &users, Some("s1"), |_| None),
        [
            "INSERT INTO \"web\".\"users\" AS t (\"id\", \"received_at\") SELECT \"id\", \
         \"received_at\" FROM s1 ORDER BY id ON CONFLICT (id) DO UPDATE SET \"received_at\" = \
         COALESCE(EXCLUDED.\"received_at\", t.\"received_at\") WHERE t.received_at IS NULL \
         OR EXCLUDED.received_at IS NULL OR EXCLUDED.received_at >= t.received_at"
        ]
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
        Check::Send(Some(Prepared::Postgres(encoded)))
            if encoded.rows().next().is_some_and(|row| row.table == "aliases")
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

/// Each value is written as tokio-postgres's `ToSql` writes it for its column's type,
/// and reads back as it was.
#[test]
fn values_are_encoded_as_tokio_postgres_writes_them() {
    use tokio_postgres::types::{ToSql, Type};
    let to_sql = |value: &dyn ToSql, ty: &Type| {
        let mut out = bytes::BytesMut::new();
        value.to_sql_checked(ty, &mut out).unwrap();
        let mut field = i32::try_from(out.len()).unwrap().to_be_bytes().to_vec();
        field.extend_from_slice(&out);
        field
    };
    let leap = crate::timestamp::parse("2016-12-31T23:59:60.5Z").unwrap();
    let values = [
        (Value::Text("é\"x".into()), to_sql(&"é\"x", &Type::TEXT)),
        (Value::Text(String::new()), to_sql(&"", &Type::TEXT)),
        (Value::Json("[1]".into()), to_sql(&"[1]", &Type::TEXT)),
        (Value::BigInt(-3), to_sql(&-3i64, &Type::INT8)),
        (Value::Double(-0.5), to_sql(&-0.5f64, &Type::FLOAT8)),
        (Value::Bool(true), to_sql(&true, &Type::BOOL)),
        (Value::Bool(false), to_sql(&false, &Type::BOOL)),
        (Value::Timestamp(leap), to_sql(&leap, &Type::TIMESTAMPTZ)),
    ];
    for (value, want) in values {
        let mut field = Vec::new();
        encoded::encode(&value.as_scalar(), &mut field);
        assert_eq!(field, want, "{value:?}");
        let row = row("t", false, vec![("c", value.clone())]);
        let message = Encoded::of_rows(&[row]);
        let first = message.rows().next().unwrap().columns.start;
        assert_eq!(message.field(first), want);
        assert_eq!(message.value(first), Some(value));
    }
}

proptest::proptest! {
    /// Timestamps of any year fanout keeps, before and after 2000, to the nanosecond.
    #[test]
    fn timestamps_are_encoded_as_tokio_postgres_writes_them(
        seconds in -62_167_219_200i64..253_402_300_799,
        nanos in 0u32..1_000_000_000,
    ) {
        use tokio_postgres::types::{ToSql, Type};
        let t = DateTime::from_timestamp(seconds, nanos).unwrap();
        let mut want = bytes::BytesMut::new();
        t.to_sql(&Type::TIMESTAMPTZ, &mut want).unwrap();
        let mut field = Vec::new();
        encoded::encode(&super::schema::Scalar::Timestamp(t), &mut field);
        proptest::prop_assert_eq!(&field[..4], &8i32.to_be_bytes()[..]);
        proptest::prop_assert_eq!(&field[4..], &want[..]);
    }
}

/// Messages whose properties and traits share keys with values of every type (so that
/// columns get values of other types, converted or not), users of few ids received at
/// odd instants, timestamps before 2000 and to the nanosecond.
fn batch() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    use proptest::prelude::*;
    let values = prop::sample::select(vec![
        "\"pro\"",
        "3",
        "-7",
        "2.5",
        "3.0",
        "1e300",
        "9223372036854775807",
        "18446744073709551615",
        "true",
        "false",
        "\"true\"",
        "\"3\"",
        "\"2.5\"",
        "\"inf\"",
        "\"2024-05-01T12:00:00.123456789Z\"",
        "\"1999-12-31T23:59:59.9999995Z\"",
        "\"2016-12-31T23:59:60.5Z\"",
        "\"0001-01-01T00:00:00Z\"",
        "[1,\"a\"]",
        "[]",
        "null",
        "{\"deep\":{\"er\":1}}",
        "\"\"",
        "\"é\\u0000\"",
    ]);
    let keys = prop::sample::select(vec![
        "plan",
        "seats",
        "when",
        "flag",
        "accountType",
        "account_type",
        "list",
        "deep",
        "id",
        "event",
        "name",
        "context_x",
        "uuid_ts",
        "received_at",
        "user_id",
        "Plan",
    ]);
    let times = prop::sample::select(vec![
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00.0000001Z",
        "2025-12-31T23:59:59.999Z",
        "1999-12-31T23:59:59.9999995Z",
    ]);
    let message = (
        prop::sample::select(vec![
            "track", "identify", "page", "screen", "group", "alias",
        ]),
        prop::sample::select(vec![
            "\"Signed Up\"",
            "\"tracks\"",
            "\"!!!\"",
            "\"Order Done\"",
            "3",
        ]),
        prop::sample::select(vec!["\"u1\"", "\"u2\"", "7", "null", "\"\""]),
        prop::sample::select(vec!["m1", "m2", "m3"]),
        times.clone(),
        prop::option::of(times),
        prop::collection::vec((keys, values), 0..8),
        crate::json::testgen::object(false),
    );
    let message = message.prop_map(|(kind, event, user, id, received, sent, custom, context)| {
        let custom: Vec<String> = custom.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let custom = custom.join(",");
        let sent = sent.map_or(String::new(), |t| format!(",\"sentAt\":\"{t}\""));
        format!(
            "{{\"type\":\"{kind}\",\"event\":{event},\"userId\":{user},\"messageId\":\"{id}\",\
             \"receivedAt\":\"{received}\"{sent},\"name\":{event},\"context\":{context},\
             \"properties\":{{{custom}}},\"traits\":{{{custom}}}}}"
        )
    });
    prop::collection::vec(message, 1..12)
}

/// Each table's rows read back: per row, each column's field by the column's name.
fn rows_by_name(
    columns: &[(Name, ColumnType)],
    data: &[u8],
) -> Vec<BTreeMap<String, Option<Vec<u8>>>> {
    copy_rows(data)
        .into_iter()
        .map(|row| {
            let names = columns.iter().map(|(n, _)| n.to_string());
            names.zip(row).collect()
        })
        .collect()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

    /// The COPY data assembled from what `check` encoded holds exactly the rows the first
    /// way made (owned rows laid out and encoded by `ToSql`: `oracle`), whatever the
    /// warehouse's columns' types, columns it lacks included; the same values are counted
    /// as mismatches.
    #[test]
    fn assembled_copy_data_is_what_the_owned_rows_made(
        batch in batch(),
        changes in proptest::collection::vec(0usize..10, 64),
        as_needed in proptest::prelude::any::<bool>(),
    ) {
        use proptest::prop_assert_eq;
        let loaded_at = at(60);
        let mut rows = Vec::new();
        let mut encoded = Vec::new();
        for text in &batch {
            let message = schema::node::parse(text.as_bytes()).unwrap();
            let owned = schema::message_rows(&message, at(0));
            let made = Encoded::of(text.as_bytes());
            prop_assert_eq!(owned.is_ok(), made.is_ok(), "{}", text);
            if let (Ok(owned), Ok(made)) = (owned, made) {
                rows.extend(owned);
                encoded.push(made);
            }
        }
        let encoded: Vec<&Encoded> = encoded.iter().collect();
        let wanted = oracle::needs(rows.iter());
        let needs = needs(encoded.iter().copied());
        prop_assert_eq!(&needs, &wanted);

        // The warehouse as it is: some columns of another type, some missing.
        let types = [
            ColumnType::Text, ColumnType::BigInt, ColumnType::Double, ColumnType::Bool,
            ColumnType::Timestamp,
        ];
        let mut change = changes.iter().cycle();
        let tables: Tables = needs
            .iter()
            .map(|(table, columns)| {
                let columns = columns.iter().filter_map(|(name, ty)| {
                    let ty = match change.next().unwrap() {
                        _ if as_needed => *ty,
                        0 if name != "id" => return None,
                        c @ 1..=3 => types[*c + 1],
                        _ => *ty,
                    };
                    Some((name.to_string(), ty))
                });
                (table.clone(), columns.collect())
            })
            .collect();

        let mut want_mismatches = Vec::new();
        let laid = oracle::lay_out(rows.iter(), &tables, loaded_at, &mut want_mismatches);
        let mut mismatches = Vec::new();
        let assembled = assemble(&encoded, &needs, &tables, loaded_at, &mut mismatches);
        prop_assert_eq!(laid.keys().collect::<Vec<_>>(), assembled.keys().collect::<Vec<_>>());
        for (table, load) in &laid {
            let want = oracle::encode(table, load, &mut want_mismatches);
            let got = &assembled[table];
            prop_assert_eq!(load.upsert, got.upsert);
            if load.columns == got.columns && got.also.is_empty() {
                prop_assert_eq!(&want[..], &got.data[..], "{}", table);
            }
            let mut columns = got.columns.clone();
            columns.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            let mut want_columns = load.columns.clone();
            want_columns.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            prop_assert_eq!(columns, want_columns);
            // Rows taken from other tables' staging rows are those rows' columns, as
            // `moves` selects them; the table's own come first.
            let mut got_rows = rows_by_name(&got.columns, &got.data);
            prop_assert_eq!(got_rows.len(), got.rows);
            for (whole, columns) in &got.also {
                let source = &assembled[whole];
                for row in rows_by_name(&source.columns, &source.data) {
                    let taken = got.columns.iter().map(|(name, _)| {
                        let field = columns.contains(name).then(|| row[name.as_str()].clone());
                        (name.to_string(), field.flatten())
                    });
                    got_rows.push(taken.collect());
                }
            }
            let mut want_rows = rows_by_name(&load.columns, &want);
            if !got.also.is_empty() {
                got_rows.sort();
                want_rows.sort();
            }
            prop_assert_eq!(got_rows, want_rows, "{}", table);
        }
        let sorted = |list: &[load::Mismatch]| {
            let mut list: Vec<String> = list.iter().map(|m| format!("{m:?}")).collect();
            list.sort();
            list
        };
        prop_assert_eq!(sorted(&mismatches), sorted(&want_mismatches));
    }
}
