//! A stored message read in place: strings borrowed from its bytes (owned only when they
//! hold escapes), objects as key lists. It reads as `serde_json::Value` would (same
//! numbers, arrays as the same JSON text, objects in key order with the last of a repeated
//! key), at a fraction of the allocations: `rows` runs once per delivered message.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess};
use serde_json::Number;

use crate::json::doc::{Doc, InPlace, InPlaceVisitor};

/// One JSON value of a stored message.
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    /// An array as serde_json writes it (compact, object keys in order): arrays are stored
    /// as this JSON text.
    Array(String),
    Object(Object<'a>),
}

/// An object's members sorted by key, each key once: the order and the winner of a
/// repeated key are those of `serde_json::Map`, so columns come out as they always did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a> {
    pub members: Vec<(Cow<'a, str>, Node<'a>)>,
}

impl<'a> Object<'a> {
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        // A scan, not a binary search: a message has a dozen members, most of another
        // length than `key`, so few are compared byte by byte (each key is there once).
        let member = self
            .members
            .iter()
            .find(|(k, _)| k.len() == key.len() && k == key)?;
        Some(&member.1)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn object(&self, key: &str) -> Option<&Object<'a>> {
        match self.get(key)? {
            Node::Object(o) => Some(o),
            _ => None,
        }
    }

    fn from_members(mut members: Vec<(Cow<'a, str>, Node<'a>)>) -> Self {
        let sorted = members
            .windows(2)
            .all(|w| key_order(&w[0].0, &w[1].0).is_lt());
        if !sorted {
            // Stable, so that of a repeated key the later member stays the later one.
            members.sort_by(|a, b| key_order(&a.0, &b.0));
            // `later` is dropped; the value kept is the last one given, as in a map.
            members.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    std::mem::swap(&mut later.1, &mut kept.1);
                }
                same
            });
        }
        Object { members }
    }
}

/// Keys in `str` order, most told apart by their first byte without a call to compare
/// the rest (sorting a message's members was a tenth of reading it).
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.as_bytes().first(), b.as_bytes().first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

/// Reads `bytes` as one JSON value, as `serde_json::from_slice` would.
pub fn parse(bytes: &[u8]) -> serde_json::Result<Node<'_>> {
    crate::json::doc::read_in_place(bytes)
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InPlaceVisitor::<Node>::new())
    }
}

impl<'de> InPlace<'de> for Node<'de> {
    const MEMBERS: usize = 8;

    fn null() -> Self {
        Node::Null
    }

    fn bool(b: bool) -> Self {
        Node::Bool(b)
    }

    fn number(n: Number) -> Self {
        Node::Number(n)
    }

    fn str(s: Cow<'de, str>) -> Self {
        Node::Str(s)
    }

    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        // Arrays end up as text: read in place and written as serde_json writes a
        // `Value` (objects by key), without its map and strings per member.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Doc<'de>>()? {
            items.push(item);
        }
        let text = serde_json::to_string(&Doc::Array(items)).map_err(A::Error::custom)?;
        Ok(Node::Array(text))
    }

    fn object(members: Vec<(Cow<'de, str>, Self)>) -> Self {
        Node::Object(Object::from_members(members))
    }
}
