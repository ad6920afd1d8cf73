//! Nested JSON objects to columns: `{"address": {"street": …}}` → `address_street`.

use serde_json::{Map, Value as Json};

use super::snake::identifier;
use super::types::{infer, Value};

/// The columns of one row, in the order they were added; a name is taken once.
#[derive(Debug, Default)]
pub struct Columns {
    pub list: Vec<(String, Value)>,
}

impl Columns {
    pub fn has(&self, name: &str) -> bool {
        self.list.iter().any(|(n, _)| n == name)
    }

    /// Adds the column unless the name is taken: two keys can snake-case (or cut) to the
    /// same name (`accountType` and `account_type`), and a row names a column once.
    pub fn add(&mut self, name: String, value: Value) {
        if !self.has(&name) {
            self.list.push((name, value));
        }
    }

    /// Adds a column whose value may be absent.
    pub fn add_some(&mut self, name: &str, value: Option<Value>) {
        if let Some(value) = value {
            self.add(name.to_owned(), value);
        }
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
                    out.add(name, value);
                }
            }
        }
    }
    path.truncate(start);
}
