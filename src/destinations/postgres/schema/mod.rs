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

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use crate::message::MessageType;
use flatten::{flatten, Columns};
use names::column_name;
use node::{Node, Object};

pub use flatten::{Seen, Sink};
pub use names::Name;
pub use snake::{identifier, snakecase, MAX_IDENTIFIER};
pub use types::{convert, infer, ColumnType, Scalar, Value};

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

/// A row's columns: a range of a list it may share with another row of the same message
/// (a track's `tracks` row is the start of its event row, not a copy of it).
#[derive(Clone)]
pub struct RowColumns {
    list: Arc<Vec<(Name, Value)>>,
    range: Range<usize>,
}

impl From<Vec<(Name, Value)>> for RowColumns {
    fn from(list: Vec<(Name, Value)>) -> RowColumns {
        let range = 0..list.len();
        RowColumns {
            list: Arc::new(list),
            range,
        }
    }
}

impl std::ops::Deref for RowColumns {
    type Target = [(Name, Value)];

    fn deref(&self) -> &[(Name, Value)] {
        &self.list[self.range.clone()]
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
    identifier(event).map(|name| table_of_event(name.into()).to_string())
}

/// The table of a track event whose column name (`event`) is `name`.
fn table_of_event(name: Name) -> Name {
    if !STANDARD_TABLES.contains(&name.as_str()) {
        return name;
    }
    let mut prefixed = format!("_{name}");
    prefixed.truncate(MAX_IDENTIFIER);
    prefixed.into()
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
    // Room for a typical event row's columns without growing.
    let mut columns = Columns::loaded_at(loaded_at, 64);
    let (first, second) = map(message, &mut columns)?;
    let list = Arc::new(columns.list);
    let row = |span: Span| Row {
        table: span.table.to_string(),
        columns: RowColumns {
            list: list.clone(),
            range: span.columns,
        },
        upsert: span.upsert,
    };
    Ok(std::iter::once(first).chain(second).map(row).collect())
}

/// One row of a message: its table and its columns, a range of those the message wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub table: Name,
    pub columns: Range<usize>,
    /// Merged into the row with the same `id` instead of skipped: only `users`.
    pub upsert: bool,
}

/// Writes the columns of the rows one stored message becomes (see `message_rows`) into
/// `out` and names them: one or two rows, the second sharing columns with the first
/// (a track's `tracks` row is the start of its event row).
pub fn map<S: Sink>(message: &Node<'_>, out: &mut S) -> Result<(Span, Option<Span>), RowError> {
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

    out.put(Name::Static("id"), Scalar::Text(Cow::Borrowed(id)));
    out.put_some("anonymous_id", id_text(m.get("anonymousId")));
    out.put_some("user_id", id_text(m.get("userId")));
    out.put(Name::Static("received_at"), Scalar::Timestamp(received_at));
    out.put_some("sent_at", time(m, "sentAt").map(Scalar::Timestamp));
    let event_time = time(m, "timestamp");
    out.put_some("timestamp", event_time.map(Scalar::Timestamp));
    // The client's own clock when it sent one; else the event time is all there is.
    let original = time(m, "originalTimestamp").or(event_time);
    out.put_some("original_timestamp", original.map(Scalar::Timestamp));
    out.put_load_time(Name::Static("uuid_ts"));
    if let Some(context) = m.object("context") {
        flatten(context, "context", &|_| false, out);
    }
    let custom = |out: &mut S, key: &str| {
        if let Some(object) = m.object(key) {
            flatten(object, "", &|name| reserved(kind, name), out);
        }
    };

    let table = |name: &'static str, columns: Range<usize>| Span {
        table: Name::Static(name),
        columns,
        upsert: false,
    };
    Ok(match kind {
        MessageType::Track => {
            let event = m
                .str("event")
                .ok_or(error("event", "is missing or not a string"))?;
            let column = column_name(event);
            let text = column
                .as_ref()
                .map(|name| Scalar::Text(Cow::Borrowed(name)));
            out.put_some("event", text);
            out.put(
                Name::Static("event_text"),
                Scalar::Text(Cow::Borrowed(event)),
            );
            let tracks = table("tracks", 0..out.mark());
            match column.map(table_of_event) {
                Some(name) => {
                    // The `tracks` row is the event row's start: the properties come after.
                    custom(out, "properties");
                    let event_row = Span {
                        table: name,
                        columns: 0..out.mark(),
                        upsert: false,
                    };
                    (tracks, Some(event_row))
                }
                None => (tracks, None),
            }
        }
        MessageType::Identify => {
            let traits_start = out.mark();
            custom(out, "traits");
            let identifies = table("identifies", 0..out.mark());
            let users = id_text(m.get("userId")).map(|user_id| {
                out.new_row();
                let start = out.mark();
                out.put(Name::Static("id"), user_id);
                out.put(Name::Static("received_at"), Scalar::Timestamp(received_at));
                out.put_load_time(Name::Static("uuid_ts"));
                out.put_again(traits_start..identifies.columns.end);
                Span {
                    upsert: true,
                    ..table("users", start..out.mark())
                }
            });
            (identifies, users)
        }
        MessageType::Page | MessageType::Screen => {
            out.put_some("name", id_text(m.get("name")));
            // Server libraries send the category beside the name; analytics.js sends it as
            // `properties.category`, which lands in the same column when this one is absent.
            out.put_some("category", id_text(m.get("category")));
            custom(out, "properties");
            let name = if kind == MessageType::Page {
                "pages"
            } else {
                "screens"
            };
            (table(name, 0..out.mark()), None)
        }
        MessageType::Group => {
            out.put_some("group_id", id_text(m.get("groupId")));
            custom(out, "traits");
            (table("groups", 0..out.mark()), None)
        }
        MessageType::Alias => {
            out.put_some("previous_id", id_text(m.get("previousId")));
            // Segment's docs: the aliases table has the traits sent with the call.
            custom(out, "traits");
            (table("aliases", 0..out.mark()), None)
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
fn id_text<'n>(value: Option<&'n Node<'_>>) -> Option<Scalar<'n>> {
    match value? {
        Node::Str(s) if !s.is_empty() => Some(Scalar::Text(Cow::Borrowed(s))),
        Node::Number(n) => Some(Scalar::Text(Cow::Owned(n.to_string()))),
        _ => None,
    }
}

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;
