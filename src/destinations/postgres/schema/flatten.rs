//! Nested JSON objects to columns: `{"address": {"street": …}}` → `address_street`.

use super::names::{column_name, Name};
use super::node::{Node, Object};
use super::types::{infer_node, Value};

/// The columns of one row, in the order they were added; a name is taken once.
#[derive(Debug, Default)]
pub struct Columns {
    pub list: Vec<(Name, Value)>,
    /// A bit per name in `list` (see `bit`): most names are new, and one look at a bit
    /// says so without comparing them with the fifty names a row has.
    seen: [u64; 4],
}

impl Columns {
    pub fn with_capacity(columns: usize) -> Self {
        Columns {
            list: Vec::with_capacity(columns),
            seen: [0; 4],
        }
    }

    pub fn has(&self, name: &str) -> bool {
        let (word, mask) = bit(name);
        self.seen[word] & mask != 0 && self.list.iter().any(|(n, _)| n == name)
    }

    /// Adds the column unless the name is taken: two keys can snake-case (or cut) to the
    /// same name (`accountType` and `account_type`), and a row names a column once.
    pub fn add(&mut self, name: Name, value: Value) {
        if !self.has(&name) {
            let (word, mask) = bit(&name);
            self.seen[word] |= mask;
            self.list.push((name, value));
        }
    }

    /// Adds each of `other`'s columns, as `add` does.
    pub fn add_all(&mut self, other: &Columns) {
        for (name, value) in &other.list {
            self.add(name.clone(), value.clone());
        }
    }

    /// Adds a column whose value may be absent.
    pub fn add_some(&mut self, name: &'static str, value: Option<Value>) {
        if let Some(value) = value {
            self.add(Name::Static(name), value);
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
    out: &mut Columns,
) {
    let mut path = String::from(prefix);
    walk(object, &mut path, dropped, out);
}

fn walk(object: &Object<'_>, path: &mut String, dropped: &dyn Fn(&str) -> bool, out: &mut Columns) {
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
                    out.add(name, value);
                }
            }
        }
    }
    path.truncate(start);
}
