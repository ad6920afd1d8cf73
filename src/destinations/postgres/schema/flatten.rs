//! Nested JSON objects to columns: `{"address": {"street": …}}` → `address_street`.

use std::ops::Range;

use chrono::{DateTime, Utc};

use super::names::{column_name, Name};
use super::node::{Node, Object};
use super::types::{infer_node, Scalar, Value};

/// Where a message's columns are written, in order, row after row; a name is taken once
/// per row. `Columns` keeps owned values (`fanout route`, the tests); the postgres
/// destination writes them as COPY bytes.
pub trait Sink {
    /// Adds a column to the current row unless the row has the name already: two keys
    /// can snake-case (or cut) to the same name (`accountType` and `account_type`).
    fn put(&mut self, name: Name, value: Scalar<'_>);
    /// Adds a column holding the time the rows are loaded (`uuid_ts`).
    fn put_load_time(&mut self, name: Name);
    /// How many columns were written so far: a row's columns are a range of them.
    fn mark(&self) -> usize;
    /// Starts another row after the columns written so far.
    fn new_row(&mut self);
    /// Adds the columns `range` of an earlier row again, as `put` would.
    fn put_again(&mut self, range: Range<usize>);

    /// Adds a column whose value may be absent.
    fn put_some(&mut self, name: &'static str, value: Option<Scalar<'_>>) {
        if let Some(value) = value {
            self.put(Name::Static(name), value);
        }
    }
}

/// A bit per name a row has (see `bit`): most names are new, and one look at a bit says
/// so without comparing them with the fifty names a row has.
#[derive(Debug, Default, Clone)]
pub struct Seen([u64; 4]);

impl Seen {
    /// False when the row surely lacks `name`; true when it may have it.
    pub fn may_have(&self, name: &str) -> bool {
        let (word, mask) = bit(name);
        self.0[word] & mask != 0
    }

    pub fn insert(&mut self, name: &str) {
        let (word, mask) = bit(name);
        self.0[word] |= mask;
    }
}

/// The columns of a message's rows as owned values, in the order they were added.
#[derive(Debug, Default)]
pub struct Columns {
    pub list: Vec<(Name, Value)>,
    seen: Seen,
    /// Where the current row starts in `list`.
    row_start: usize,
    /// The value of `put_load_time`'s column.
    loaded_at: DateTime<Utc>,
}

impl Columns {
    pub fn with_capacity(columns: usize) -> Self {
        Columns {
            list: Vec::with_capacity(columns),
            ..Columns::default()
        }
    }

    /// Columns whose load time (`uuid_ts`) is `loaded_at`.
    pub fn loaded_at(loaded_at: DateTime<Utc>, columns: usize) -> Self {
        Columns {
            loaded_at,
            ..Columns::with_capacity(columns)
        }
    }

    /// Whether the current row has a column `name`.
    pub fn has(&self, name: &str) -> bool {
        self.seen.may_have(name) && self.list[self.row_start..].iter().any(|(n, _)| n == name)
    }

    /// Adds the column unless the current row has the name (see `Sink::put`).
    pub fn add(&mut self, name: Name, value: Value) {
        if !self.has(&name) {
            self.seen.insert(&name);
            self.list.push((name, value));
        }
    }

    /// Adds a column whose value may be absent (the oracle's `put_some`).
    #[cfg(test)]
    pub fn add_some(&mut self, name: &'static str, value: Option<Value>) {
        if let Some(value) = value {
            self.add(Name::Static(name), value);
        }
    }
}

impl Sink for Columns {
    fn put(&mut self, name: Name, value: Scalar<'_>) {
        if !self.has(&name) {
            self.seen.insert(&name);
            self.list.push((name, value.to_value()));
        }
    }

    fn put_load_time(&mut self, name: Name) {
        self.add(name, Value::Timestamp(self.loaded_at));
    }

    fn mark(&self) -> usize {
        self.list.len()
    }

    fn new_row(&mut self) {
        self.row_start = self.list.len();
        self.seen = Seen::default();
    }

    fn put_again(&mut self, range: Range<usize>) {
        for i in range {
            let (name, value) = self.list[i].clone();
            self.add(name, value);
        }
    }
}

/// The bit of `seen` a name sets: from its length, last and middle bytes, which is cheap
/// and tells apart most names of a row (`context_page_url`, `context_page_path`, …).
fn bit(name: &str) -> (usize, u64) {
    let b = name.as_bytes();
    let at = |i: usize| u32::from(b.get(i).copied().unwrap_or(0));
    let h = (b.len() as u32).wrapping_mul(0x9E37_79B9)
        ^ at(b.len().wrapping_sub(1)).wrapping_mul(0x85EB_CA6B)
        ^ at(b.len() / 2).wrapping_mul(0xC2B2_AE35);
    let bit = (h >> 24) as usize;
    (bit / 64, 1 << (bit % 64))
}

/// Adds every non-null leaf of `object` as a column named by its key path joined with
/// `_` after `prefix`, snake-cased; names `dropped` refuses (reserved columns) are left out.
pub fn flatten(
    object: &Object<'_>,
    prefix: &str,
    dropped: &dyn Fn(&str) -> bool,
    out: &mut impl Sink,
) {
    let mut path = String::from(prefix);
    walk(object, &mut path, dropped, out);
}

fn walk(
    object: &Object<'_>,
    path: &mut String,
    dropped: &dyn Fn(&str) -> bool,
    out: &mut impl Sink,
) {
    let start = path.len();
    for (key, value) in &object.members {
        path.truncate(start);
        if start > 0 {
            path.push('_');
        }
        path.push_str(key);
        match value {
            Node::Object(inner) => walk(inner, path, dropped, out),
            _ => {
                let Some(value) = infer_node(value) else {
                    continue;
                };
                let Some(name) = column_name(path) else {
                    continue;
                };
                if !dropped(&name) {
                    out.put(name, value);
                }
            }
        }
    }
    path.truncate(start);
}
