//! Segment's warehouse schema, the pure part: a stored message → the rows and typed
//! columns it becomes (`tracks` + `<event>`, `identifies` + `users`, `pages`, `screens`,
//! `groups`, `aliases`). No database here: the `postgres` destination loads these rows.
//!
//! Facts from Segment's "Warehouse Schemas" docs; see `../shared/docs/warehouse.md`.

mod flatten;
mod names;
pub mod node;
mod snake;
mod types;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use crate::message::MessageType;
use flatten::{flatten, Columns};
use node::{Node, Object};

pub use names::Name;
pub use snake::{identifier, snakecase, MAX_IDENTIFIER};
pub use types::{convert, infer, ColumnType, Value};

/// One row of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Snake-cased: `tracks`, `signed_up`, …
    pub table: String,
    /// Snake-cased names, non-null values only, each name once.
    pub columns: RowColumns,
    /// Merge into the row with the same `id` instead of skipping it: only `users`.
    pub upsert: bool,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns
            .iter()
            .find(|(n, _)| n == column)
            .map(|(_, v)| v)
    }
}

/// A row's columns: the first `len` of a list it may share with another row of the same
/// message (a track's `tracks` row is the start of its event row, not a copy of it).
#[derive(Clone)]
pub struct RowColumns {
    list: Arc<Vec<(Name, Value)>>,
    len: usize,
}

impl From<Vec<(Name, Value)>> for RowColumns {
    fn from(list: Vec<(Name, Value)>) -> RowColumns {
        let len = list.len();
        RowColumns {
            list: Arc::new(list),
            len,
        }
    }
}

impl std::ops::Deref for RowColumns {
    type Target = [(Name, Value)];

    fn deref(&self) -> &[(Name, Value)] {
        &self.list[..self.len]
    }
}

impl PartialEq for RowColumns {
    fn eq(&self, other: &RowColumns) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for RowColumns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Why a message makes no rows: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct RowError {
    pub field: &'static str,
    pub problem: &'static str,
}

/// The tables of Segment's schema (`accounts` is its group upsert table, which fanout does
/// not write yet). An event whose name snake-cases to one of them gets its table name
/// prefixed with `_` (`Tracks` → `_tracks`), so its rows never land in a standard table;
/// RudderStack does the same, Segment does not document it.
pub const STANDARD_TABLES: [&str; 8] = [
    "tracks",
    "identifies",
    "users",
    "pages",
    "screens",
    "groups",
    "aliases",
    "accounts",
];

/// Columns of every event table, which a property or trait of the same name cannot take.
const COMMON_COLUMNS: [&str; 8] = [
    "id",
    "anonymous_id",
    "user_id",
    "received_at",
    "sent_at",
    "timestamp",
    "original_timestamp",
    "uuid_ts",
];

/// Whether a property/trait column `name` would collide with a standard column of a
/// table of this message type (`context_*` included), and so is dropped.
pub fn reserved(kind: MessageType, name: &str) -> bool {
    let own: &[&str] = match kind {
        MessageType::Track => &["event", "event_text"],
        MessageType::Page | MessageType::Screen => &["name"],
        MessageType::Group => &["group_id"],
        MessageType::Alias => &["previous_id"],
        MessageType::Identify => &[],
    };
    COMMON_COLUMNS.contains(&name) || own.contains(&name) || name.starts_with("context_")
}

/// The table a track event's rows go to besides `tracks`; `None` when the name has no
/// letter or digit to make one of.
pub fn event_table(event: &str) -> Option<String> {
    let name = identifier(event)?;
    if !STANDARD_TABLES.contains(&name.as_str()) {
        return Some(name);
    }
    let mut prefixed = format!("_{name}");
    prefixed.truncate(MAX_IDENTIFIER);
    Some(prefixed)
}

/// Every row one message becomes (see `message_rows`), from its parsed JSON.
pub fn rows(message: &Json, loaded_at: DateTime<Utc>) -> Result<Vec<Row>, RowError> {
    // Written out and read in place: one mapping for parsed and stored messages alike.
    let text = serde_json::to_vec(message).expect("a JSON value always writes");
    let message = node::parse(&text).expect("JSON serde_json wrote reads back");
    message_rows(&message, loaded_at)
}

/// Every row one stored message becomes: track → `tracks` + `<event>`; identify →
/// `identifies` + `users` (when it has a userId); page → `pages`; screen → `screens`;
/// group → `groups`; alias → `aliases`. `loaded_at` fills `uuid_ts`.
pub fn message_rows(message: &Node<'_>, loaded_at: DateTime<Utc>) -> Result<Vec<Row>, RowError> {
    let Node::Object(m) = message else {
        return Err(error("message", "is not a JSON object"));
    };
    let kind = m.str("type").and_then(MessageType::parse).ok_or(error(
        "type",
        "is not one of identify, track, page, screen, group, alias",
    ))?;
    let id = m
        .str("messageId")
        .filter(|id| !id.is_empty())
        .ok_or(error("messageId", "is missing or not a non-empty string"))?;
    let received_at = time(m, "receivedAt").ok_or(error(
        "receivedAt",
        "is missing or not a date-time (a stored message always has one)",
    ))?;

    // Room for a typical event row's columns without growing.
    let mut row = Columns::with_capacity(64);
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
    if let Some(context) = m.object("context") {
        flatten(context, "context", &|_| false, &mut row);
    }
    let custom = |row: &mut Columns, key: &str| {
        if let Some(object) = m.object(key) {
            flatten(object, "", &|name| reserved(kind, name), row);
        }
    };

    let table = |name: &str, columns: RowColumns| Row {
        table: name.to_owned(),
        columns,
        upsert: false,
    };
    Ok(match kind {
        MessageType::Track => {
            let event = m
                .str("event")
                .ok_or(error("event", "is missing or not a string"))?;
            let event_table = event_table(event);
            let column = identifier(event);
            row.add_some("event", column.map(Value::Text));
            row.add("event_text".into(), Value::Text(event.into()));
            match event_table {
                Some(name) => {
                    // The `tracks` row is the event row's start: the properties come after.
                    let tracks_len = row.list.len();
                    custom(&mut row, "properties");
                    let event_row = RowColumns::from(row.list);
                    let tracks = RowColumns {
                        list: event_row.list.clone(),
                        len: tracks_len,
                    };
                    vec![table("tracks", tracks), table(&name, event_row)]
                }
                None => vec![table("tracks", row.list.into())],
            }
        }
        MessageType::Identify => {
            // Flattened once for both rows: every name either row has already is
            // reserved, so the traits add the same columns to each.
            let mut traits = Columns::with_capacity(32);
            custom(&mut traits, "traits");
            let mut users = Columns::default();
            if let Some(user_id) = id_text(m.get("userId")) {
                users.add("id".into(), user_id);
                users.add("received_at".into(), Value::Timestamp(received_at));
                users.add("uuid_ts".into(), Value::Timestamp(loaded_at));
                users.add_all(&traits);
            }
            row.add_all(&traits);
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

fn error(field: &'static str, problem: &'static str) -> RowError {
    RowError { field, problem }
}

/// A message's own date-time field, read as ingest reads it.
fn time(m: &Object<'_>, key: &str) -> Option<DateTime<Utc>> {
    m.str(key).and_then(crate::timestamp::parse)
}

/// An id or name field as text: strings as they are, numbers as written; empty or other
/// values make no column.
fn id_text(value: Option<&Node<'_>>) -> Option<Value> {
    match value? {
        Node::Str(s) if !s.is_empty() => Some(Value::Text(s.as_ref().into())),
        Node::Number(n) => Some(Value::Text(n.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;
