//! The first `rows`, over an owned `serde_json::Value` tree, kept as the oracle the
//! in-place reading (`node`) is tested against: the same message must make the same rows.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};

use super::flatten::Columns;
use super::{error, event_table, identifier, infer, reserved, Row, RowError, Value};
use crate::message::MessageType;

pub fn rows(message: &Json, loaded_at: DateTime<Utc>) -> Result<Vec<Row>, RowError> {
    let Json::Object(m) = message else {
        return Err(error("message", "is not a JSON object"));
    };
    let kind = m
        .get("type")
        .and_then(Json::as_str)
        .and_then(MessageType::parse)
        .ok_or(error(
            "type",
            "is not one of identify, track, page, screen, group, alias",
        ))?;
    let id = m
        .get("messageId")
        .and_then(Json::as_str)
        .filter(|id| !id.is_empty())
        .ok_or(error("messageId", "is missing or not a non-empty string"))?;
    let received_at = time(m, "receivedAt").ok_or(error(
        "receivedAt",
        "is missing or not a date-time (a stored message always has one)",
    ))?;

    let mut row = Columns::default();
    row.add("id".into(), Value::Text(id.into()));
    row.add_some("anonymous_id", id_text(m.get("anonymousId")));
    row.add_some("user_id", id_text(m.get("userId")));
    row.add("received_at".into(), Value::Timestamp(received_at));
    row.add_some("sent_at", time(m, "sentAt").map(Value::Timestamp));
    let event_time = time(m, "timestamp");
    row.add_some("timestamp", event_time.map(Value::Timestamp));
    // The client's own clock when it sent one; else the event time is all there is.
    let original = time(m, "originalTimestamp").or(event_time);
    row.add_some("original_timestamp", original.map(Value::Timestamp));
    row.add("uuid_ts".into(), Value::Timestamp(loaded_at));
    if let Some(Json::Object(context)) = m.get("context") {
        flatten(context, "context", &|_| false, &mut row);
    }
    let custom = |row: &mut Columns, key: &str| {
        if let Some(Json::Object(object)) = m.get(key) {
            flatten(object, "", &|name| reserved(kind, name), row);
        }
    };

    let table = |name: &str, columns: super::RowColumns| Row {
        table: name.to_owned(),
        columns,
        upsert: false,
    };
    Ok(match kind {
        MessageType::Track => {
            let event = m
                .get("event")
                .and_then(Json::as_str)
                .ok_or(error("event", "is missing or not a string"))?;
            let event_table = event_table(event);
            let column = identifier(event);
            row.add_some("event", column.map(Value::Text));
            row.add("event_text".into(), Value::Text(event.into()));
            let tracks = table("tracks", row.list.clone().into());
            match event_table {
                Some(name) => {
                    custom(&mut row, "properties");
                    vec![tracks, table(&name, row.list.into())]
                }
                None => vec![tracks],
            }
        }
        MessageType::Identify => {
            let mut users = Columns::default();
            if let Some(user_id) = id_text(m.get("userId")) {
                users.add("id".into(), user_id);
                users.add("received_at".into(), Value::Timestamp(received_at));
                users.add("uuid_ts".into(), Value::Timestamp(loaded_at));
                custom(&mut users, "traits");
            }
            custom(&mut row, "traits");
            let mut rows = vec![table("identifies", row.list.into())];
            if !users.list.is_empty() {
                rows.push(Row {
                    upsert: true,
                    ..table("users", users.list.into())
                });
            }
            rows
        }
        MessageType::Page | MessageType::Screen => {
            row.add_some("name", id_text(m.get("name")));
            // Server libraries send the category beside the name; analytics.js sends it as
            // `properties.category`, which lands in the same column when this one is absent.
            row.add_some("category", id_text(m.get("category")));
            custom(&mut row, "properties");
            let name = if kind == MessageType::Page {
                "pages"
            } else {
                "screens"
            };
            vec![table(name, row.list.into())]
        }
        MessageType::Group => {
            row.add_some("group_id", id_text(m.get("groupId")));
            custom(&mut row, "traits");
            vec![table("groups", row.list.into())]
        }
        MessageType::Alias => {
            row.add_some("previous_id", id_text(m.get("previousId")));
            // Segment's docs: the aliases table has the traits sent with the call.
            custom(&mut row, "traits");
            vec![table("aliases", row.list.into())]
        }
    })
}

/// A message's own date-time field, read as ingest reads it.
fn time(m: &Map<String, Json>, key: &str) -> Option<DateTime<Utc>> {
    m.get(key)
        .and_then(Json::as_str)
        .and_then(crate::timestamp::parse)
}

/// An id or name field as text: strings as they are, numbers as written; empty or other
/// values make no column.
fn id_text(value: Option<&Json>) -> Option<Value> {
    match value? {
        Json::String(s) if !s.is_empty() => Some(Value::Text(s.clone())),
        Json::Number(n) => Some(Value::Text(n.to_string())),
        _ => None,
    }
}

/// Adds every non-null leaf of `object` as a column named by its key path joined with
/// `_` after `prefix`, snake-cased; names `dropped` refuses (reserved columns) are left out.
pub fn flatten(
    object: &Map<String, Json>,
    prefix: &str,
    dropped: &dyn Fn(&str) -> bool,
    out: &mut Columns,
) {
    let mut path = String::from(prefix);
    walk(object, &mut path, dropped, out);
}

fn walk(
    object: &Map<String, Json>,
    path: &mut String,
    dropped: &dyn Fn(&str) -> bool,
    out: &mut Columns,
) {
    let start = path.len();
    for (key, value) in object {
        path.truncate(start);
        if start > 0 {
            path.push('_');
        }
        path.push_str(key);
        match value {
            Json::Object(inner) => walk(inner, path, dropped, out),
            _ => {
                let Some(value) = infer(value) else { continue };
                let Some(name) = identifier(path) else {
                    continue;
                };
                if !dropped(&name) {
                    out.add(name.into(), value);
                }
            }
        }
    }
    path.truncate(start);
}
