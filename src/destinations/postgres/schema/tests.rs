use chrono::TimeZone;
use proptest::prelude::*;
use serde_json::{json, Value as Json};

use super::*;
use crate::json::testgen;

fn at(s: &str) -> DateTime<Utc> {
    crate::timestamp::parse(s).unwrap()
}

/// go-snakecase's own test table (snake_test.go), the facts ported as they are.
#[test]
fn snakecase_matches_go_snakecase() {
    let cases = [
        ("sample text", "sample_text"),
        ("sample-text", "sample_text"),
        ("sample_text", "sample_text"),
        ("sample___text", "sample_text"),
        ("sampleText", "sample_text"),
        (
            "inviteYourCustomersAddInvites",
            "invite_your_customers_add_invites",
        ),
        ("sample 2 Text", "sample_2_text"),
        ("   sample   2    Text   ", "sample_2_text"),
        ("   $#$sample   2    Text   ", "sample_2_text"),
        ("SAMPLE 2 TEXT", "sample_2_text"),
        ("___$$Base64Encode", "base64_encode"),
        ("FOO:BAR$BAZ", "foo_bar_baz"),
        ("FOO#BAR#BAZ", "foo_bar_baz"),
        ("something.com", "something_com"),
        ("$something%", "something"),
        ("•¶§ƒ˚foo˙∆˚¬", "foo"),
        ("CStringRef", "cstring_ref"),
        ("5test", "5test"),
        ("test5", "test5"),
        ("THE5r", "the5r"),
        ("5TEst", "5test"),
        ("_5TEst", "5test"),
        ("@%#&5TEst", "5test"),
        ("edf_6N", "edf_6n"),
        ("f_pX9", "f_p_x9"),
        ("p_z9Rg", "p_z9_rg"),
        ("2FA Enabled", "2fa_enabled"),
        ("Enabled 2FA", "enabled_2fa"),
        ("@49L0S145_¬fwHƒ0TSLNVp", "49l0s145_fw_h_0tslnvp"),
        ("lk0B@bFmjrLQ_Z6YL", "lk0_b_b_fmjr_lq_z6yl"),
        ("samPLE text", "sam_ple_text"),
        (
            "here\nis\na\nmultiline\nstring",
            "here_is_a_multiline_string",
        ),
        ("\"hello world\"", "hello_world"),
        // The warehouse docs' own examples.
        ("accountType", "account_type"),
        ("Signed Up", "signed_up"),
        // Non-ASCII letters separate words, as every byte ≥ 0x80 does in go-snakecase.
        ("Größe", "gr_e"),
        ("", ""),
        ("$%", ""),
    ];
    for (input, want) in cases {
        assert_eq!(snakecase(input), want, "from {input:?}");
    }
}

#[test]
fn track_makes_tracks_and_event_rows() {
    let message = json!({
        "type": "track", "event": "Signed Up", "messageId": "m-1",
        "userId": "u-1", "anonymousId": "a-1",
        "properties": {"accountType": "pro", "userId": "x", "seats": 3},
        "context": {"page": {"url": "https://x.test/"}},
        "timestamp": "2026-01-01T00:00:00.000Z",
        "receivedAt": "2026-01-01T00:00:01.000Z",
    });
    let loaded = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 2).unwrap();
    let rows = rows(&message, loaded).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].table, "tracks");
    assert_eq!(rows[1].table, "signed_up");
    assert_eq!(rows[0].get("account_type"), None);
    assert_eq!(
        rows[1].get("account_type"),
        Some(&Value::Text("pro".into()))
    );
    assert_eq!(rows[1].get("user_id"), Some(&Value::Text("u-1".into())));
    assert_eq!(rows[1].get("seats"), Some(&Value::BigInt(3)));
    assert_eq!(
        rows[0].get("context_page_url"),
        Some(&Value::Text("https://x.test/".into()))
    );
    assert_eq!(
        rows[0].get("original_timestamp"),
        Some(&Value::Timestamp(at("2026-01-01T00:00:00Z")))
    );
    assert_eq!(rows[0].get("uuid_ts"), Some(&Value::Timestamp(loaded)));
}

/// The messages of one capture of an official client's requests, as fanout stores them
/// (through ingest, received at a fixed time).
fn stored_capture(file: &str) -> Vec<Json> {
    use crate::ingest::{segment::parse_batch, LimitsConfig};
    use crate::queue::record::{read_record, ReadOutcome};
    let shared = std::env::var_os("FANOUT_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let path = shared.join("fixtures/captures").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} (set FANOUT_SHARED_DIR): {e}", path.display()));
    let limits = LimitsConfig::default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let request: Json = serde_json::from_str(line).unwrap();
        let Some(body) = request.get("json").filter(|b| b.get("batch").is_some()) else {
            continue;
        };
        let body = body.to_string();
        let records = parse_batch(body.as_bytes(), &limits, at("2026-11-22T15:07:30Z"))
            .unwrap()
            .encode("src", &limits)
            .unwrap();
        let mut bytes = records.bytes();
        while let ReadOutcome::Record { json, .. } = read_record(&mut bytes).unwrap() {
            out.push(serde_json::from_slice(&json).unwrap());
        }
    }
    assert!(!out.is_empty(), "no batches in {}", path.display());
    out
}

fn loaded() -> DateTime<Utc> {
    at("2026-11-22T15:08:00Z")
}

fn names(row: &Row) -> Vec<&str> {
    row.columns.iter().map(|(n, _)| n.as_str()).collect()
}

/// A valid name: what `identifier` promises and the loader relies on.
fn assert_valid_names(rows: &[Row]) {
    for row in rows {
        let mut all = vec![row.table.as_str()];
        all.extend(names(row));
        for name in &all {
            assert!(
                (1..=MAX_IDENTIFIER).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name:?} in {row:?}"
            );
        }
        let mut columns = names(row);
        columns.sort_unstable();
        columns.dedup();
        assert_eq!(
            columns.len(),
            row.columns.len(),
            "a column twice in {row:?}"
        );
    }
}

/// A table and its column names, in order.
type TableColumns<'a> = (&'a str, Vec<String>);

const STANDARD: [&str; 7] = [
    "id",
    "user_id",
    "received_at",
    "sent_at",
    "timestamp",
    "original_timestamp",
    "uuid_ts",
];

/// The first message of each type in the analytics-node capture, through ingest: the
/// exact tables and columns Segment's schema gives them.
#[test]
fn official_client_messages_make_segments_tables_and_columns() {
    let messages = stored_capture("segment_node__ok.jsonl");
    let library = ["context_library_name", "context_library_version"];
    let with = |extra: &[&str]| -> Vec<String> {
        STANDARD
            .iter()
            .chain(&library)
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let cases: [(&str, &[TableColumns]); 6] = [
        (
            "track",
            &[
                (
                    "tracks",
                    [
                        &STANDARD[..],
                        &["context_ip"],
                        &library,
                        &["event", "event_text"],
                    ]
                    .concat()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ),
                (
                    "order_completed",
                    [
                        &STANDARD[..],
                        &["context_ip"],
                        &library,
                        &["event", "event_text", "currency", "i", "revenue"],
                    ]
                    .concat()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ),
            ],
        ),
        (
            "identify",
            &[
                ("identifies", with(&["email", "plan"])),
                (
                    "users",
                    ["id", "received_at", "uuid_ts", "email", "plan"]
                        .map(String::from)
                        .to_vec(),
                ),
            ],
        ),
        ("page", &[("pages", with(&["name", "category", "url"]))]),
        ("screen", &[("screens", with(&["name", "category", "tab"]))]),
        (
            "group",
            &[("groups", with(&["group_id", "employees", "name"]))],
        ),
        ("alias", &[("aliases", with(&["previous_id"]))]),
    ];
    for (kind, want) in cases {
        let message = messages.iter().find(|m| m["type"] == kind).unwrap();
        let rows = rows(message, loaded()).unwrap();
        let got: Vec<(&str, Vec<&str>)> =
            rows.iter().map(|r| (r.table.as_str(), names(r))).collect();
        let want: Vec<(&str, Vec<&str>)> = want
            .iter()
            .map(|(t, c)| (*t, c.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(got, want, "{kind}");
        for row in &rows {
            assert_eq!(row.upsert, row.table == "users", "{}", row.table);
        }
    }
    let track = messages.iter().find(|m| m["type"] == "track").unwrap();
    let event_row = &rows(track, loaded()).unwrap()[1];
    let expect: [(&str, Value); 9] = [
        ("user_id", Value::Text("user-1".into())),
        ("received_at", Value::Timestamp(at("2026-11-22T15:07:30Z"))),
        ("sent_at", Value::Timestamp(at("2026-11-22T15:07:28.672Z"))),
        (
            "timestamp",
            Value::Timestamp(at("2026-11-22T15:07:29.990Z")),
        ),
        (
            "original_timestamp",
            Value::Timestamp(at("2026-11-22T15:07:28.662Z")),
        ),
        ("uuid_ts", Value::Timestamp(loaded())),
        ("event_text", Value::Text("Order Completed".into())),
        ("i", Value::BigInt(0)),
        ("revenue", Value::Double(42.5)),
    ];
    for (column, value) in expect {
        assert_eq!(event_row.get(column), Some(&value), "{column}");
    }
}

/// Every message of every capture (both official clients, all their batches) makes rows,
/// with valid names; python's `"anonymousId": null` makes no column.
#[test]
fn every_captured_message_makes_valid_rows() {
    for file in [
        "segment_node__ok.jsonl",
        "segment_python__ok.jsonl",
        "segment_python__ok_gzip.jsonl",
    ] {
        for message in stored_capture(file) {
            let rows =
                rows(&message, loaded()).unwrap_or_else(|e| panic!("{file}: {e}: {message}"));
            assert_valid_names(&rows);
            if message.get("anonymousId") == Some(&Json::Null) {
                assert!(rows.iter().all(|r| r.get("anonymous_id").is_none()));
            }
        }
    }
}

#[test]
fn identifiers_are_cut_to_postgres_length_and_empty_names_dropped() {
    let long = "a".repeat(70);
    let cases: [(&str, Option<&str>); 5] = [
        ("Signed Up", Some("signed_up")),
        (&long, Some(&long[..63])),
        ("", None),
        ("$%^", None),
        ("日本語", None),
    ];
    for (input, want) in cases {
        assert_eq!(identifier(input).as_deref(), want, "{input:?}");
    }
}

#[test]
fn event_tables_avoid_standard_tables() {
    let long = format!("users{}", "x".repeat(80));
    let cases: [(&str, Option<String>); 7] = [
        ("Signed Up", Some("signed_up".into())),
        ("Tracks", Some("_tracks".into())),
        ("identifies", Some("_identifies".into())),
        ("USERS", Some("_users".into())),
        ("accounts", Some("_accounts".into())),
        ("!!!", None),
        (&long, Some(long[..63].into())),
    ];
    for (event, want) in cases {
        assert_eq!(event_table(event), want, "{event:?}");
    }
}

fn track(properties: Json) -> Json {
    json!({
        "type": "track", "event": "E", "messageId": "m", "userId": "u",
        "receivedAt": "2026-01-01T00:00:00Z", "properties": properties,
    })
}

/// Properties to the event table's own columns (the standard ones left out).
fn custom_columns(message: &Json) -> Vec<(String, Value)> {
    let rows = rows(message, loaded()).unwrap();
    let standard = rows[0].columns.len();
    rows.last().unwrap().columns[standard..]
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
}

#[test]
fn nested_objects_flatten_and_arrays_become_json_text() {
    let cases: Vec<(Json, Vec<(&str, Value)>)> = vec![
        (
            json!({"product_id": {"sku": "G-32"}}),
            vec![("product_id_sku", Value::Text("G-32".into()))],
        ),
        (
            json!({"a": {"b": {"cD": 1}}}),
            vec![("a_b_c_d", Value::BigInt(1))],
        ),
        (
            json!({"products": ["507f1", "505bd"]}),
            vec![("products", Value::Json(r#"["507f1","505bd"]"#.into()))],
        ),
        (
            json!({"items": [{"sku": 1}], "empty": []}),
            vec![
                ("empty", Value::Json("[]".into())),
                ("items", Value::Json(r#"[{"sku":1}]"#.into())),
            ],
        ),
        // Nulls and empty objects make no column.
        (
            json!({"gone": null, "nothing": {}, "deep": {"gone": null}}),
            vec![],
        ),
        // Two keys naming one column: the first (keys in sorted order) is kept.
        (
            json!({"accountType": "a", "account_type": "b"}),
            vec![("account_type", Value::Text("a".into()))],
        ),
        (
            json!({"a": {"b": 1}, "a_b": 2}),
            vec![("a_b", Value::BigInt(1))],
        ),
        // Keys with nothing to name a column by.
        (
            json!({"$$": 1, "": 2, "x": {"": 3}}),
            vec![("x", Value::BigInt(3))],
        ),
    ];
    for (properties, want) in cases {
        let got = custom_columns(&track(properties.clone()));
        let want: Vec<(String, Value)> =
            want.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
        assert_eq!(got, want, "{properties}");
    }
}

#[test]
fn context_flattens_with_its_prefix_and_arrays_as_json() {
    let mut message = track(json!({}));
    message["context"] = json!({
        "page": {"url": "https://x.test/"}, "userAgent": "UA", "traits": {"email": "e@x"},
        "campaign": {"name": null}, "tags": ["a"],
    });
    let rows = rows(&message, loaded()).unwrap();
    let context: Vec<(&str, &Value)> = rows[0]
        .columns
        .iter()
        .filter(|(n, _)| n.starts_with("context"))
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    assert_eq!(
        context,
        [
            ("context_page_url", &Value::Text("https://x.test/".into())),
            ("context_tags", &Value::Json(r#"["a"]"#.into())),
            ("context_traits_email", &Value::Text("e@x".into())),
            ("context_user_agent", &Value::Text("UA".into())),
        ]
    );
}

/// Properties and traits named like a standard column of their table are dropped; the
/// standard column keeps the message's own value.
#[test]
fn properties_colliding_with_reserved_columns_are_dropped() {
    let common = json!({
        "id": "p", "userId": "p", "user_id": "p", "anonymous_id": "p", "received_at": "p",
        "sentAt": "p", "timestamp": "p", "original_timestamp": "p", "uuid_ts": "p",
        "context": {"ip": "p"}, "context_x": "p", "kept": 1,
    });
    let base = |kind: &str, key: &str, own: Json| {
        let mut m = json!({
            "type": kind, "messageId": "m", "userId": "u",
            "receivedAt": "2026-01-01T00:00:00Z", "event": "E", "name": "N",
            "groupId": "g", "previousId": "prev",
        });
        let mut custom = common.clone();
        custom
            .as_object_mut()
            .unwrap()
            .extend(own.as_object().unwrap().clone());
        m[key] = custom;
        m
    };
    let cases = [
        (
            "track",
            "properties",
            json!({"event": "p", "eventText": "p"}),
            "signed",
            1,
        ),
        ("identify", "traits", json!({}), "", 0),
        ("page", "properties", json!({"name": "p"}), "", 0),
        ("screen", "properties", json!({"name": "p"}), "", 0),
        ("group", "traits", json!({"groupId": "p"}), "", 0),
        ("alias", "traits", json!({"previous_id": "p"}), "", 0),
    ];
    for (kind, key, own, _, row) in cases {
        let message = base(kind, key, own);
        let rows = rows(&message, loaded()).unwrap();
        let row = &rows[row];
        assert_eq!(row.get("kept"), Some(&Value::BigInt(1)), "{kind}");
        for (name, value) in row.columns.iter() {
            assert_ne!(
                value,
                &Value::Text("p".into()),
                "{kind}: {name} taken by a property"
            );
        }
        assert_eq!(row.get("id"), Some(&Value::Text("m".into())), "{kind}");
        assert_eq!(row.get("user_id"), Some(&Value::Text("u".into())), "{kind}");
    }
    // What is reserved on one table is an ordinary column on another.
    assert!(reserved(MessageType::Page, "name"));
    assert!(!reserved(MessageType::Group, "name"));
    assert!(reserved(MessageType::Track, "event_text"));
    assert!(!reserved(MessageType::Identify, "event"));
}

#[test]
fn identify_upserts_users_without_anonymous_id() {
    let message = json!({
        "type": "identify", "messageId": "m", "userId": "u-7", "anonymousId": "a-1",
        "receivedAt": "2026-01-01T00:00:00Z", "traits": {"email": "e@x", "id": "t"},
    });
    let rows = rows(&message, loaded()).unwrap();
    assert_eq!(rows.len(), 2);
    let users = &rows[1];
    assert_eq!((users.table.as_str(), users.upsert), ("users", true));
    let columns: Vec<(String, Value)> = users
        .columns
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id".to_string(), Value::Text("u-7".into())),
            (
                "received_at".into(),
                Value::Timestamp(at("2026-01-01T00:00:00Z"))
            ),
            ("uuid_ts".into(), Value::Timestamp(loaded())),
            ("email".into(), Value::Text("e@x".into())),
        ]
    );
    assert_eq!(
        rows[0].get("anonymous_id"),
        Some(&Value::Text("a-1".into()))
    );

    // No userId: the identify is kept, there is no user to upsert.
    let anonymous = json!({
        "type": "identify", "messageId": "m", "anonymousId": "a-1",
        "receivedAt": "2026-01-01T00:00:00Z", "traits": {"email": "e@x"},
    });
    let rows = super::rows(&anonymous, loaded()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].table, "identifies");
    assert_eq!(rows[0].get("user_id"), None);
}

#[test]
fn original_timestamp_is_the_clients_else_the_event_time() {
    let cases = [
        (
            json!({"timestamp": "2026-01-01T00:00:05Z", "originalTimestamp": "2026-01-01T00:00:01+01:00"}),
            Some(at("2025-12-31T23:00:01Z")),
        ),
        (
            json!({"timestamp": "2026-01-01T00:00:05Z"}),
            Some(at("2026-01-01T00:00:05Z")),
        ),
        (json!({}), None),
    ];
    for (times, want) in cases {
        let mut message = track(json!({}));
        message
            .as_object_mut()
            .unwrap()
            .extend(times.as_object().unwrap().clone());
        let rows = rows(&message, loaded()).unwrap();
        assert_eq!(
            rows[0].get("original_timestamp"),
            want.map(Value::Timestamp).as_ref(),
            "{times}"
        );
    }
}

#[test]
fn a_tracks_row_is_the_start_of_its_event_row_not_a_copy() {
    let mut message = track(json!({"plan": "pro", "seats": 3}));
    message["context"] = json!({"ip": "203.0.113.7", "page": {"url": "https://x.test/"}});
    let rows = rows(&message, loaded()).unwrap();
    let (tracks, event) = (&rows[0].columns, &rows[1].columns);
    assert_eq!(
        (rows[0].table.as_str(), rows[1].table.as_str()),
        ("tracks", "e")
    );
    assert_eq!(tracks[..], event[..tracks.len()]);
    assert_eq!(event.len(), tracks.len() + 2);
    assert!(std::ptr::eq(tracks.as_ptr(), event.as_ptr()), "copied");
}

#[test]
fn the_rows_of_one_thread_share_each_column_name() {
    let one = rows(&track(json!({"orderId": "a", "plan": "p"})), loaded()).unwrap();
    let two = rows(&track(json!({"orderId": "b", "plan": "q"})), loaded()).unwrap();
    for column in ["order_id", "plan", "id", "received_at"] {
        let name = |rows: &[Row]| -> *const u8 {
            let found = rows[1].columns.iter().find(|(n, _)| *n == column);
            found.expect(column).0.as_ptr()
        };
        assert_eq!(name(&one), name(&two), "{column}: a name each");
    }
}

#[test]
fn tracks_row_is_kept_when_the_event_names_no_table() {
    let mut message = track(json!({"a": 1}));
    message["event"] = json!("!!!");
    let rows = rows(&message, loaded()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].table, "tracks");
    assert_eq!(rows[0].get("event"), None);
    assert_eq!(rows[0].get("event_text"), Some(&Value::Text("!!!".into())));
}

#[test]
fn unusable_messages_name_the_field() {
    let good = track(json!({}));
    let with = |key: &str, value: Json| {
        let mut m = good.clone();
        m[key] = value;
        m
    };
    let without = |key: &str| {
        let mut m = good.clone();
        m.as_object_mut().unwrap().remove(key);
        m
    };
    let cases = [
        (json!([1]), "message"),
        (with("type", json!("trak")), "type"),
        (without("type"), "type"),
        (without("messageId"), "messageId"),
        (with("messageId", json!("")), "messageId"),
        (without("receivedAt"), "receivedAt"),
        (with("receivedAt", json!("yesterday")), "receivedAt"),
        (without("event"), "event"),
        (with("event", json!(5)), "event"),
    ];
    for (message, field) in cases {
        let error = rows(&message, loaded()).unwrap_err();
        assert_eq!(error.field, field, "{message}");
        assert!(
            error.to_string().starts_with(&format!("`{field}` ")),
            "{error}"
        );
    }
}

#[test]
fn values_are_typed_from_json() {
    let cases: [(Json, Option<Value>); 12] = [
        (json!(null), None),
        (json!({"a": 1}), None),
        (json!(true), Some(Value::Bool(true))),
        (json!(42), Some(Value::BigInt(42))),
        (json!(-7), Some(Value::BigInt(-7))),
        (json!(1.0), Some(Value::Double(1.0))),
        (
            json!(18446744073709551615u64),
            Some(Value::Double(18446744073709551615.0)),
        ),
        (
            json!("2026-01-01T00:00:00.5+02:00"),
            Some(Value::Timestamp(at("2025-12-31T22:00:00.5Z"))),
        ),
        (
            json!("2026-01-01 00:00:00Z"),
            Some(Value::Timestamp(at("2026-01-01T00:00:00Z"))),
        ),
        // Not RFC 3339: no offset, date only, a number in a string.
        (
            json!("2026-01-01T00:00:00"),
            Some(Value::Text("2026-01-01T00:00:00".into())),
        ),
        (json!("2026-01-01"), Some(Value::Text("2026-01-01".into()))),
        (json!([1, "a"]), Some(Value::Json(r#"[1,"a"]"#.into()))),
    ];
    for (json, want) in cases {
        assert_eq!(infer(&json), want, "{json}");
    }
    let sql = [
        (ColumnType::Text, "text"),
        (ColumnType::BigInt, "bigint"),
        (ColumnType::Double, "double precision"),
        (ColumnType::Bool, "boolean"),
        (ColumnType::Timestamp, "timestamptz"),
    ];
    for (t, name) in sql {
        assert_eq!(t.sql(), name);
    }
    assert_eq!(ColumnType::of(&Value::Json("[]".into())), ColumnType::Text);
}

#[test]
fn convert_to_the_columns_type_or_refuse() {
    use ColumnType as T;
    let t = at("2026-01-01T00:00:00.123Z");
    let cases: Vec<(Value, ColumnType, Option<Value>)> = vec![
        (Value::BigInt(3), T::BigInt, Some(Value::BigInt(3))),
        (Value::BigInt(3), T::Double, Some(Value::Double(3.0))),
        (Value::Double(3.0), T::BigInt, Some(Value::BigInt(3))),
        (Value::Double(2.5), T::BigInt, None),
        (Value::Double(1e19), T::BigInt, None),
        (Value::BigInt(3), T::Text, Some(Value::Text("3".into()))),
        (Value::Double(2.5), T::Text, Some(Value::Text("2.5".into()))),
        (
            Value::Double(1e21),
            T::Text,
            Some(Value::Text("1e+21".into())),
        ),
        (Value::Bool(true), T::Text, Some(Value::Text("true".into()))),
        (
            Value::Timestamp(t),
            T::Text,
            Some(Value::Text("2026-01-01T00:00:00.123Z".into())),
        ),
        (
            Value::Json("[1]".into()),
            T::Text,
            Some(Value::Json("[1]".into())),
        ),
        (
            Value::Text("2026-01-01T00:00:00.123Z".into()),
            T::Timestamp,
            Some(Value::Timestamp(t)),
        ),
        (Value::Text("soon".into()), T::Timestamp, None),
        (Value::Text("12".into()), T::BigInt, Some(Value::BigInt(12))),
        (Value::Text("1.5".into()), T::BigInt, None),
        (
            Value::Text("1.5".into()),
            T::Double,
            Some(Value::Double(1.5)),
        ),
        (Value::Text("inf".into()), T::Double, None),
        (Value::Text("true".into()), T::Bool, Some(Value::Bool(true))),
        (Value::Text("yes".into()), T::Bool, None),
        (Value::Bool(true), T::BigInt, None),
        (Value::BigInt(1), T::Bool, None),
        (Value::BigInt(1_700_000_000), T::Timestamp, None),
        (Value::Timestamp(t), T::BigInt, None),
        (Value::Json("[1]".into()), T::BigInt, None),
    ];
    for (value, to, want) in cases {
        let got = convert(value.clone(), to);
        assert_eq!(got, want, "{value:?} → {to:?}");
        if let Some(got) = got {
            assert_eq!(ColumnType::of(&got), to, "{value:?} → {to:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any properties, traits and context a client can send make valid rows, never a panic.
    #[test]
    fn any_json_makes_valid_names(
        custom in testgen::object(false),
        context in testgen::object(false),
        // Long keys too: names past Postgres's 63 bytes must come out cut.
        key in prop_oneof!["[ -~é€]{0,80}", "[a-zA-Z0-9 _]{60,100}"],
        kind in prop::sample::select(vec!["track", "identify", "page", "screen", "group", "alias"]),
    ) {
        let custom: Json = serde_json::from_str(&custom).unwrap();
        let context: Json = serde_json::from_str(&context).unwrap();
        let message = json!({
            "type": kind, "messageId": "m", "userId": "u", "event": key,
            "receivedAt": "2026-01-01T00:00:00Z", "context": context,
            "properties": {"nested": custom.clone(), &key: custom.clone()}, "traits": custom,
        });
        let rows = rows(&message, loaded()).unwrap();
        assert_valid_names(&rows);
    }

    /// Odd values in the fields a message is read by (ids, times, names) make rows or a
    /// `RowError`, never a panic.
    #[test]
    fn odd_standard_fields_make_rows_or_an_error(
        values in prop::collection::vec(testgen::value(false), 9),
        kind in prop::sample::select(vec!["track", "identify", "page", "screen", "group", "alias"]),
    ) {
        let keys = [
            "messageId", "userId", "anonymousId", "receivedAt", "sentAt", "timestamp",
            "originalTimestamp", "event", "name",
        ];
        let mut message = json!({
            "type": kind, "groupId": 7, "previousId": "p", "receivedAt": "2026-01-01T00:00:00Z",
        });
        for (key, value) in keys.iter().zip(&values) {
            message[*key] = serde_json::from_str(value).unwrap();
        }
        if let Ok(rows) = rows(&message, loaded()) {
            assert_valid_names(&rows);
        }
    }

    /// Whatever JSON a stored message turns out to be, `rows` answers without a panic.
    #[test]
    fn any_message_is_rows_or_an_error(text in testgen::value(false)) {
        let message: Json = serde_json::from_str(&text).unwrap();
        if let Ok(rows) = rows(&message, loaded()) {
            assert_valid_names(&rows);
        }
    }
}

/// The rows of a message's text, read in place, and as the first `rows` read it (from an
/// owned `serde_json::Value`): both, or neither.
fn rows_both_ways(text: &str) -> (Option<Vec<Row>>, Option<Vec<Row>>) {
    let read = node::parse(text.as_bytes()).ok();
    let owned: Option<Json> = serde_json::from_str(text).ok();
    assert_eq!(
        read.is_some(),
        owned.is_some(),
        "parsed one way only: {text}"
    );
    let (Some(read), Some(owned)) = (read, owned) else {
        return (None, None);
    };
    (
        message_rows(&read, loaded()).ok(),
        super::oracle::rows(&owned, loaded()).ok(),
    )
}

#[test]
fn messages_read_in_place_make_the_rows_of_the_owned_reading() {
    for file in [
        "segment_node__ok.jsonl",
        "segment_python__ok.jsonl",
        "segment_python__ok_gzip.jsonl",
    ] {
        for message in stored_capture(file) {
            let (read, owned) = rows_both_ways(&message.to_string());
            assert!(read.is_some(), "{file}: {message}");
            assert_eq!(read, owned, "{file}: {message}");
        }
    }
    // Repeated keys (the last one counts, at its sorted place), escapes in keys and
    // values, arrays written as serde_json writes them, numbers past i64.
    let text = r#"{"type":"track","event":"A\u0062","messageId":"m","receivedAt":"2026-01-01T00:00:00Z",
        "properties":{"b":1,"a":{"y":2,"x":3},"b":"two","k\u0065y":"v\"w","list":[ {"z":1,"a":2.50}, 1E2 ],
        "big":18446744073709551615,"neg":-9223372036854775808,"frac":1.0},
        "type":"track","userId":12.5,"context":{"a":null,"a":{"b":true}}}"#;
    let (read, owned) = rows_both_ways(text);
    let read = read.unwrap();
    assert_eq!(Some(&read), owned.as_ref());
    assert_eq!(read[1].table, "ab");
    assert_eq!(read[1].get("b"), Some(&Value::Text("two".into())));
    assert_eq!(read[1].get("key"), Some(&Value::Text("v\"w".into())));
    assert_eq!(
        read[1].get("list"),
        Some(&Value::Json(r#"[{"a":2.5,"z":1},100.0]"#.into()))
    );
    assert_eq!(
        read[1].get("big"),
        Some(&Value::Double(18446744073709551615.0))
    );
    assert_eq!(read[0].get("user_id"), Some(&Value::Text("12.5".into())));
    assert_eq!(read[0].get("context_a_b"), Some(&Value::Bool(true)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any message text, read in place, makes exactly the rows (names, order, values) or
    /// the refusal the owned reading makes.
    #[test]
    fn any_text_read_in_place_makes_the_rows_of_the_owned_reading(
        custom in testgen::object(false),
        context in testgen::object(false),
        fields in prop::collection::vec(testgen::value(false), 4),
        kind in prop::sample::select(vec!["track", "identify", "page", "screen", "group", "alias"]),
        // Numbers no float holds too: both readings refuse them.
        whole in testgen::value(true),
    ) {
        let text = format!(
            r#"{{"type":"{kind}","messageId":"m","receivedAt":"2026-01-01T00:00:00Z",
                "event":{},"userId":{},"name":{},"timestamp":{},"context":{context},
                "properties":{custom},"traits":{custom}}}"#,
            fields[0], fields[1], fields[2], fields[3],
        );
        let (read, owned) = rows_both_ways(&text);
        prop_assert_eq!(read, owned);
        let (read, owned) = rows_both_ways(&whole);
        prop_assert_eq!(read, owned);
    }
}

/// A row names a column once, the first value kept, however many names it has.
#[test]
fn columns_take_each_name_once() {
    let mut columns = super::flatten::Columns::default();
    let names: Vec<String> = (0..300)
        .map(|n| format!("c{}_{n}", "x".repeat(n % 7)))
        .collect();
    for round in 0..2 {
        for name in &names {
            columns.add(name.clone().into(), Value::BigInt(round));
        }
    }
    assert_eq!(columns.list.len(), names.len());
    assert!(columns.list.iter().all(|(_, v)| *v == Value::BigInt(0)));
    assert!(names.iter().all(|n| columns.has(n)));
    assert!(!columns.has("c_300"));
}

/// Bytes that are not UTF-8 are refused with serde_json's own error, as before the text
/// was checked whole.
#[test]
fn bytes_that_are_not_utf8_are_refused_as_serde_json_refuses_them() {
    for bytes in [
        &b"{\"type\":\"track\",\"event\":\"\xff\"}"[..],
        b"{\"a\":1}\xc3",
        b"\xef\xbb\xbf{}",
    ] {
        let want = serde_json::from_slice::<Json>(bytes)
            .unwrap_err()
            .to_string();
        let got = node::parse(bytes).unwrap_err().to_string();
        assert_eq!(got, want);
    }
}
