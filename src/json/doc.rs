//! A whole JSON document read in place: strings borrowed from its bytes (owned only when
//! they hold escapes), objects and arrays as vectors. It reads and writes as
//! `serde_json::Value` would (same numbers, objects in key order with the last of a
//! repeated key), without a `String` per key and value: for reading many paths of one
//! message cheaply (the http kind's mappings).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Number, Value};

/// One JSON value, borrowing its strings from the document's bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    Array(Vec<Doc<'a>>),
    /// Members as given, a repeated key included: reads take the last one and writing
    /// sorts them by key, as `serde_json::Map` does (members are read far more often than
    /// objects are written).
    Object(Vec<(Cow<'a, str>, Doc<'a>)>),
}

impl<'a> Doc<'a> {
    /// Reads `bytes` as one JSON value; fails exactly where `serde_json::from_slice` into
    /// a `Value` fails.
    pub fn parse(bytes: &'a [u8]) -> serde_json::Result<Doc<'a>> {
        read_in_place(bytes)
    }

    /// The member `key` of an object; `None` for a missing key or another kind of value.
    pub fn get(&self, key: &str) -> Option<&Doc<'a>> {
        let Doc::Object(members) = self else {
            return None;
        };
        members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Doc::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Doc::Null)
    }

    /// The same value as an owned `serde_json::Value`.
    pub fn to_value(&self) -> Value {
        match self {
            Doc::Null => Value::Null,
            Doc::Bool(b) => Value::Bool(*b),
            Doc::Number(n) => Value::Number(n.clone()),
            Doc::Str(s) => Value::String(s.to_string()),
            Doc::Array(items) => Value::Array(items.iter().map(Doc::to_value).collect()),
            Doc::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

/// The indices of an object's members in the order `serde_json::Map` keeps them: by key,
/// each key once (its last member).
fn map_order(members: &[(Cow<'_, str>, Doc<'_>)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    // Stable, so that of a repeated key the later member stays the later one.
    order.sort_by(|a, b| members[*a].0.cmp(&members[*b].0));
    order.dedup_by(|later, kept| {
        let same = members[*later].0 == members[*kept].0;
        if same {
            *kept = *later;
        }
        same
    });
    order
}

impl Serialize for Doc<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Doc::Null => serializer.serialize_unit(),
            Doc::Bool(b) => serializer.serialize_bool(*b),
            Doc::Number(n) => n.serialize(serializer),
            Doc::Str(s) => serializer.serialize_str(s),
            Doc::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Doc::Object(members) if members.windows(2).all(|w| w[0].0 < w[1].0) => {
                let mut map = serializer.serialize_map(Some(members.len()))?;
                for (k, v) in members {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
            Doc::Object(members) => {
                let order = map_order(members);
                let mut map = serializer.serialize_map(Some(order.len()))?;
                for i in order {
                    let (k, v) = &members[i];
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

/// Reads `bytes` as one JSON value of an in-place type, failing where
/// `serde_json::from_slice` fails and with its error. The text is checked as UTF-8 once
/// first: read from a `&str`, serde_json need not check each string again.
pub fn read_in_place<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        // For the error serde_json gives.
        Err(_) => serde_json::from_slice(bytes),
    }
}

impl<'de> Deserialize<'de> for Doc<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InPlaceVisitor::<Doc>::new())
    }
}

impl<'de> InPlace<'de> for Doc<'de> {
    const MEMBERS: usize = 16;

    fn null() -> Self {
        Doc::Null
    }

    fn bool(b: bool) -> Self {
        Doc::Bool(b)
    }

    fn number(n: Number) -> Self {
        Doc::Number(n)
    }

    fn str(s: Cow<'de, str>) -> Self {
        Doc::Str(s)
    }

    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Doc::Array(items))
    }

    fn object(members: Vec<(Cow<'de, str>, Self)>) -> Self {
        Doc::Object(members)
    }
}

/// What an in-place reader makes of each kind of JSON value. One visitor serves every
/// reader: `Doc`, and the warehouse's rows reader, which keeps arrays as JSON text and
/// sorts members once for its many lookups.
pub trait InPlace<'de>: Sized + Deserialize<'de> {
    /// Room made for an object's members up front.
    const MEMBERS: usize;
    fn null() -> Self;
    fn bool(b: bool) -> Self;
    fn number(n: Number) -> Self;
    /// Borrowed from the document when it holds no escape.
    fn str(s: Cow<'de, str>) -> Self;
    fn seq<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error>;
    /// Members as given, a repeated key included.
    fn object(members: Vec<(Cow<'de, str>, Self)>) -> Self;
}

/// Reads any JSON value into `T`, as `serde_json::Value` reads it (same numbers, a number
/// no finite f64 holds read as null).
pub struct InPlaceVisitor<T>(PhantomData<T>);

impl<T> InPlaceVisitor<T> {
    pub fn new() -> Self {
        InPlaceVisitor(PhantomData)
    }
}

impl<T> Default for InPlaceVisitor<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'de, T: InPlace<'de>> Visitor<'de> for InPlaceVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::null())
    }

    fn visit_bool<E>(self, b: bool) -> Result<T, E> {
        Ok(T::bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<T, E> {
        Ok(T::number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<T, E> {
        Ok(T::number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<T, E> {
        Ok(Number::from_f64(n).map_or_else(T::null, T::number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<T, E> {
        Ok(T::str(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok(T::str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<T, E> {
        Ok(T::str(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut members = Vec::with_capacity(T::MEMBERS);
        while let Some(Key(key)) = map.next_key()? {
            members.push((key, map.next_value()?));
        }
        Ok(T::object(members))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_repeated_key_keeps_its_last_value_as_a_map_does() {
        let text = br#"{"b":1,"a":{"x":"\u00e9"},"b":[2,"s"],"a":null}"#;
        let doc = Doc::parse(text).unwrap();
        let value: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(doc.to_value(), value);
        assert_eq!(
            serde_json::to_vec(&doc).unwrap(),
            value.to_string().into_bytes()
        );
        assert!(doc.get("a").unwrap().is_null());
        assert_eq!(doc.get("c"), None);
    }

    #[test]
    fn what_a_value_refuses_it_refuses() {
        for text in ["{\"a\":1e999}", "[1,]", "{\"a\"}", "\"\\ud800\"", "nul", ""] {
            let value = serde_json::from_str::<Value>(text);
            assert_eq!(
                Doc::parse(text.as_bytes()).is_err(),
                value.is_err(),
                "{text}"
            );
        }
    }

    proptest! {
        /// Any text (escapes, repeated keys, numbers no float holds): refused where a
        /// `serde_json::Value` refuses it, else read and written back as the `Value` is.
        #[test]
        fn it_reads_and_writes_as_a_value_does(text in crate::json::testgen::value(true)) {
            let doc = Doc::parse(text.as_bytes());
            match serde_json::from_str::<Value>(&text) {
                Err(_) => prop_assert!(doc.is_err()),
                Ok(value) => {
                    let doc = doc.unwrap();
                    prop_assert_eq!(serde_json::to_vec(&doc).unwrap(), value.to_string().into_bytes());
                    prop_assert_eq!(doc.to_value(), value);
                }
            }
        }
    }
}
