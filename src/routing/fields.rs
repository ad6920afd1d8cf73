//! `drop_fields`, `rename` and `hash_fields` on a message kept as raw JSON except along
//! the paths they touch: the rest is copied byte for byte and in its order, not
//! re-serialized.
//!
//! Hashing replaces each string at a path by the lower-case hex SHA-256 of the value
//! trimmed and lower-cased; a path whose last part names a phone (`phone`, `phone_number`,
//! `phoneNumber`) keeps only digits and a leading `+` first, as ad platforms match them.

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::config::RouteConfig;
use crate::json::{write_key, RawObject};

/// A destination's field edits: drops first, then renames, then hashes.
pub(super) struct Transform {
    drop: Vec<Vec<String>>,
    rename: Vec<(Vec<String>, Vec<String>)>,
    hash: Vec<Vec<String>>,
}

fn split(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

impl Transform {
    /// `None` when the destination edits nothing.
    pub(super) fn new(config: &RouteConfig) -> Option<Transform> {
        if config.drop_fields.is_empty()
            && config.rename.is_empty()
            && config.hash_fields.is_empty()
        {
            return None;
        }
        Some(Transform {
            drop: config.drop_fields.iter().map(|p| split(p)).collect(),
            rename: config
                .rename
                .iter()
                .map(|(from, to)| (split(from), split(to)))
                .collect(),
            hash: config.hash_fields.iter().map(|p| split(p)).collect(),
        })
    }

    /// Applies the edits; true if the message changed.
    pub(super) fn apply(&self, message: &mut Fields<'_>) -> bool {
        let mut changed = false;
        for path in &self.drop {
            changed |= message.remove(path).is_some();
        }
        for (from, to) in &self.rename {
            changed |= message.rename(from, to);
        }
        for path in &self.hash {
            changed |= message.hash(path);
        }
        changed
    }
}

/// The hex SHA-256 a hashed field becomes (see the module comment).
fn hashed(value: &str, phone: bool) -> String {
    use sha2::{Digest, Sha256};
    let normal: String = if phone {
        let trimmed = value.trim();
        let plus = trimmed.starts_with('+');
        let digits = trimmed.chars().filter(char::is_ascii_digit);
        (if plus { Some('+') } else { None })
            .into_iter()
            .chain(digits)
            .collect()
    } else {
        value.trim().to_lowercase()
    };
    Sha256::digest(normal.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One JSON value: raw, or an object opened up because an edit reaches into it.
pub(super) enum Node<'a> {
    Raw(&'a RawValue),
    Object(Fields<'a>),
    /// A value fanout wrote (a hash), as JSON.
    Written(String),
}

/// An object's fields in order; a repeated key keeps its last value (as `RawObject`).
#[derive(Default)]
pub(super) struct Fields<'a>(Vec<(Cow<'a, str>, Node<'a>)>);

impl<'a> Fields<'a> {
    /// `None` unless `json` is an object.
    pub(super) fn parse(json: &'a str) -> Option<Fields<'a>> {
        let object: RawObject<'a> = serde_json::from_str(json).ok()?;
        Some(Fields(
            object
                .into_fields()
                .into_iter()
                .map(|(key, value)| (key, Node::Raw(value)))
                .collect(),
        ))
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == key)
    }

    /// A top-level field as received (edits have not run yet when this is read).
    pub(super) fn raw(&self, key: &str) -> Option<&'a RawValue> {
        match self.0.iter().find(|(k, _)| k == key)?.1 {
            Node::Raw(raw) => Some(raw),
            Node::Object(_) | Node::Written(_) => None,
        }
    }

    /// The object under `key`, opened up; `None` if absent or not an object.
    fn child(&mut self, key: &str) -> Option<&mut Fields<'a>> {
        let i = self.position(key)?;
        let node = &mut self.0[i].1;
        if let Node::Raw(raw) = *node {
            *node = Node::Object(Fields::parse(raw.get())?);
        }
        match node {
            Node::Object(fields) => Some(fields),
            Node::Raw(_) | Node::Written(_) => None,
        }
    }

    /// Replaces the string at `path` by its hash; true if there was one.
    fn hash(&mut self, path: &[String]) -> bool {
        match path {
            [key] => {
                let Some(i) = self.position(key) else {
                    return false;
                };
                let Node::Raw(raw) = self.0[i].1 else {
                    return false;
                };
                let Ok(text) = serde_json::from_str::<Cow<'_, str>>(raw.get()) else {
                    return false; // not a string: left as it is
                };
                let phone = matches!(key.as_str(), "phone" | "phone_number" | "phoneNumber");
                self.0[i].1 = Node::Written(format!("\"{}\"", hashed(&text, phone)));
                true
            }
            [key, rest @ ..] => self.child(key).is_some_and(|child| child.hash(rest)),
            [] => false,
        }
    }

    /// Removes the value at `path`; returns it with its index in its parent object.
    fn remove(&mut self, path: &[String]) -> Option<(Node<'a>, usize)> {
        match path {
            [key] => {
                let i = self.position(key)?;
                Some((self.0.remove(i).1, i))
            }
            [key, rest @ ..] => self.child(key)?.remove(rest),
            [] => None,
        }
    }

    /// Sets `path` to `value`, creating missing (or null) parents. Gives the value back
    /// when a parent on the way holds something other than an object.
    fn insert(&mut self, path: &[String], value: Node<'a>) -> Result<(), Node<'a>> {
        match path {
            [key] => {
                match self.position(key) {
                    Some(i) => self.0[i].1 = value,
                    None => self.0.push((Cow::Owned(key.clone()), value)),
                }
                Ok(())
            }
            [key, rest @ ..] => {
                match self.position(key) {
                    Some(i) if matches!(self.0[i].1, Node::Raw(raw) if raw.get() == "null") => {
                        self.0[i].1 = Node::Object(Fields::default());
                    }
                    Some(_) => {}
                    None => self
                        .0
                        .push((Cow::Owned(key.clone()), Node::Object(Fields::default()))),
                }
                match self.child(key) {
                    Some(child) => child.insert(rest, value),
                    None => Err(value),
                }
            }
            [] => Err(value),
        }
    }

    /// Moves the value at `from` to `to`; true if it moved. When `to` cannot be written
    /// (a parent is a string, say), the value stays where it was.
    fn rename(&mut self, from: &[String], to: &[String]) -> bool {
        let Some((value, index)) = self.remove(from) else {
            return false;
        };
        match self.insert(to, value) {
            Ok(()) => true,
            Err(value) => {
                // The walk to `from`'s parent succeeded moments ago and nothing changed since.
                let parent = from[..from.len() - 1]
                    .iter()
                    .try_fold(&mut *self, |fields, key| fields.child(key));
                if let Some(parent) = parent {
                    let key = Cow::Owned(from[from.len() - 1].clone());
                    parent.0.insert(index, (key, value));
                }
                false
            }
        }
    }

    /// Compact JSON; raw values are copied as they are.
    pub(super) fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (key, node)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_key(out, key);
            match node {
                Node::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
                Node::Object(fields) => fields.write(out),
                Node::Written(json) => out.extend_from_slice(json.as_bytes()),
            }
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(json: &str, drop: &[&str], rename: &[(&str, &str)]) -> (String, bool) {
        let t = Transform {
            drop: drop.iter().map(|p| split(p)).collect(),
            rename: rename.iter().map(|(f, t)| (split(f), split(t))).collect(),
            hash: Vec::new(),
        };
        let mut fields = Fields::parse(json).unwrap();
        let changed = t.apply(&mut fields);
        let mut out = Vec::new();
        fields.write(&mut out);
        (String::from_utf8(out).unwrap(), changed)
    }

    #[test]
    fn drops_and_renames_nested_paths_keeping_the_rest_as_is() {
        let msg = r#"{"type":"track","context":{"ip":"1.2.3.4","library":{"name":"x"}},"properties":{"revenue":9.50,"list":[1, 2]}}"#;
        let (out, changed) = edit(
            msg,
            &["context.ip"],
            &[("properties.revenue", "properties.amount")],
        );
        assert!(changed);
        assert_eq!(
            out,
            r#"{"type":"track","context":{"library":{"name":"x"}},"properties":{"list":[1, 2],"amount":9.50}}"#
        );
    }

    #[test]
    fn rename_creates_parents_and_replaces_the_target() {
        let msg = r#"{"a":{"b":1},"c":null,"d":2}"#;
        assert_eq!(
            edit(msg, &[], &[("a.b", "x.y.z")]).0,
            r#"{"a":{},"c":null,"d":2,"x":{"y":{"z":1}}}"#
        );
        assert_eq!(
            edit(msg, &[], &[("a.b", "c.e")]).0,
            r#"{"a":{},"c":{"e":1},"d":2}"#
        );
        assert_eq!(edit(msg, &[], &[("a", "d")]).0, r#"{"c":null,"d":{"b":1}}"#);
        assert_eq!(
            edit(msg, &[], &[("d", "a.b.c")]).0,
            r#"{"a":{"b":1},"c":null,"d":2}"#
        );
        assert_eq!(
            edit(msg, &[], &[("d", "d.e")]).0,
            r#"{"a":{"b":1},"c":null,"d":{"e":2}}"#
        );
    }

    #[test]
    fn missing_paths_change_nothing() {
        let msg = r#"{"a":{"b":1},"s":"text"}"#;
        for (drop, rename) in [
            (vec!["a.x"], vec![]),
            (vec!["s.x"], vec![]),
            (vec!["z"], vec![("q", "r")]),
            (vec![], vec![("a.b.c", "r")]),
            // The target's parent is a string: the value stays where it was.
            (vec![], vec![("a.b", "s.x")]),
        ] {
            let (out, changed) = edit(msg, &drop, &rename);
            assert_eq!((out.as_str(), changed), (msg, false), "{drop:?} {rename:?}");
        }
    }

    #[test]
    fn escaped_keys_survive() {
        let msg = r#"{"a\"b":1,"c":{"d\u00e9":2}}"#;
        let (out, _) = edit(msg, &["c.dé"], &[]);
        assert_eq!(out, r#"{"a\"b":1,"c":{}}"#);
    }
}
