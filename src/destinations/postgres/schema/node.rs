//! A stored message read in place: strings borrowed from its bytes (owned only when they
//! hold escapes), objects as key lists. It reads as `serde_json::Value` would (same
//! numbers, arrays as the same JSON text, objects in key order with the last of a repeated
//! key), at a fraction of the allocations: `rows` runs once per delivered message.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

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
        let i = self
            .members
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()?;
        Some(&self.members[i].1)
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
        let sorted = members.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted {
            // Stable, so that of a repeated key the later member stays the later one.
            members.sort_by(|a, b| a.0.cmp(&b.0));
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

/// Reads `bytes` as one JSON value, as `serde_json::from_slice` would.
pub fn parse(bytes: &[u8]) -> serde_json::Result<Node<'_>> {
    serde_json::from_slice(bytes)
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Node<'de>, E> {
        // As serde_json::Value: a number that is no finite f64 reads as null.
        Ok(Number::from_f64(n).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        // Arrays are rare and end up as text: read as serde_json reads them, so that the
        // text is the one it writes.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<serde_json::Value>()? {
            items.push(item);
        }
        Ok(Node::Array(serde_json::Value::Array(items).to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            members.push((key.0, map.next_value::<Node<'de>>()?));
        }
        Ok(Node::Object(Object::from_members(members)))
    }
}

/// An object key, borrowed when it holds no escape.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s)))
    }
}
