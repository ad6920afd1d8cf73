//! A JSON object seen as its top-level fields with the values left unparsed.
//!
//! Ingest reads only a handful of fields (ids, type, timestamps) and forwards the rest
//! byte for byte, so it parses each message once into borrowed slices of the request body
//! instead of building a `serde_json::Value` tree and serializing it again.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The top-level fields of one JSON object, in order; a repeated key keeps its last value.
#[derive(Debug, Default)]
pub struct RawObject<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// Parses `raw` as an object; `None` if it is another kind of JSON value.
    pub fn parse(raw: &'a RawValue) -> Option<RawObject<'a>> {
        if !raw.get().starts_with('{') {
            return None;
        }
        serde_json::from_str(raw.get()).ok()
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Removes a field, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<&'a RawValue> {
        let i = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(i).1)
    }

    /// Sets a field, replacing any earlier value of the same key.
    pub fn set(&mut self, key: &'a str, value: &'a RawValue) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(field) => field.1 = value,
            None => self.fields.push((Cow::Borrowed(key), value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields, in order, for building another view of the object.
    pub fn into_fields(self) -> Vec<(Cow<'a, str>, &'a RawValue)> {
        self.fields
    }
}

impl<'de> RawObject<'de> {
    /// Reads the fields of an object a deserializer is visiting.
    pub fn from_map<M: MapAccess<'de>>(mut map: M) -> Result<RawObject<'de>, M::Error> {
        let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            match fields.iter_mut().find(|(k, _)| *k == key) {
                Some(field) => field.1 = value,
                None => fields.push((key, value)),
            }
        }
        Ok(RawObject { fields })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
                RawObject::from_map(map)
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// An object key, borrowed from the input unless it contained escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// What a raw value holds, as far as field validation cares.
#[derive(Debug, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    Other,
}

/// Classifies a raw value, decoding a string without copying when it has no escapes.
pub fn scalar(raw: &RawValue) -> Scalar<'_> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let inner = &text[1..text.len() - 1];
            if !inner.contains('\\') {
                Scalar::Str(Cow::Borrowed(inner))
            } else {
                // Valid JSON already, so this cannot fail.
                serde_json::from_str::<String>(text)
                    .map(|s| Scalar::Str(Cow::Owned(s)))
                    .unwrap_or(Scalar::Other)
            }
        }
        Some(b'n') => Scalar::Null,
        _ => Scalar::Other,
    }
}

/// True for a JSON object (or `null`, which counts as absent).
pub fn is_object_or_null(raw: &RawValue) -> bool {
    let t = raw.get();
    t.starts_with('{') || t == "null"
}

/// True when `json` nests objects and arrays more than `limit` deep.
/// Runs on input already known to be valid JSON.
pub fn nests_deeper_than(json: &str, limit: usize) -> bool {
    let bytes = json.as_bytes();
    // Fewer opening brackets than the limit (strings included) cannot nest deeper:
    // a vectorized count settles nearly every real message without the exact scan.
    if memchr::memchr2_iter(b'{', b'[', bytes).count() <= limit {
        return false;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Jump to the closing quote, stepping over escapes.
                i += 1;
                loop {
                    let Some(offset) = memchr::memchr2(b'"', b'\\', &bytes[i..]) else {
                        return false;
                    };
                    i += offset;
                    if bytes[i] == b'\\' {
                        i += 2;
                    } else {
                        break;
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Appends `"key":` with the key escaped as JSON requires.
pub fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

/// Appends a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    }
}

/// Writes an object made of `fields` (already-encoded JSON values).
pub fn write_object<'v>(out: &mut Vec<u8>, fields: impl IntoIterator<Item = (&'v str, &'v str)>) {
    out.push(b'{');
    let mut first = true;
    for (k, v) in fields {
        if !first {
            out.push(b',');
        }
        first = false;
        write_key(out, k);
        out.extend_from_slice(v.as_bytes());
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn keeps_values_unparsed_and_last_duplicate() {
        let r = raw(r#"{"a": {"x": [1, 2]}, "b\"q": 1, "a": "second"}"#);
        let o = RawObject::parse(r).unwrap();
        assert_eq!(o.get("a").unwrap().get(), r#""second""#);
        assert_eq!(o.get("b\"q").unwrap().get(), "1");
        assert_eq!(o.iter().count(), 2);
        assert!(RawObject::parse(raw("[1]")).is_none());
    }

    #[test]
    fn classifies_scalars() {
        assert_eq!(scalar(raw(r#""abc""#)), Scalar::Str(Cow::Borrowed("abc")));
        assert_eq!(
            scalar(raw(r#""a\u0062c""#)),
            Scalar::Str(Cow::Owned("abc".into()))
        );
        assert_eq!(scalar(raw("null")), Scalar::Null);
        assert_eq!(scalar(raw("12")), Scalar::Other);
    }

    #[test]
    fn measures_depth_outside_strings() {
        assert!(!nests_deeper_than(r#"{"a":[{"b":"[[[[["}]}"#, 3));
        assert!(nests_deeper_than(r#"{"a":[{"b":[]}]}"#, 3));
        assert!(!nests_deeper_than(r#"{"a":"\"{{{{"}"#, 1));
        assert!(!nests_deeper_than(r#"{"a":"\\","b":"[[[["}"#, 1));
        assert!(nests_deeper_than(r#"{"a":"\\","b":[[]]}"#, 2));
    }

    #[test]
    fn writes_escaped_keys_and_strings() {
        let mut out = Vec::new();
        write_object(&mut out, [("plain", "1"), ("q\"uote", "\"v\"")]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"plain":1,"q\"uote":"v"}"#
        );
    }
}
