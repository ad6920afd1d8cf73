//! The JSON view every stage shares: an object seen as its top-level fields with the
//! values left unparsed, checks of a document's structure, and writing JSON by hand.
//!
//! Ingest reads only a handful of fields (ids, type, timestamps) and forwards the rest
//! byte for byte, so it parses each message once into borrowed slices of the request body
//! instead of building a `serde_json::Value` tree and serializing it again.

pub mod doc;
mod one_line;
#[cfg(test)]
pub(crate) mod testgen;

#[cfg(test)]
pub(crate) use one_line::breaks_lines;
pub use one_line::keep_on_one_line;

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

/// What `check_structure` found in a message's text.
#[derive(Debug, PartialEq, Eq)]
pub enum StructureError {
    /// Objects and arrays nest deeper than the limit.
    TooDeep,
    /// The number starting at this byte offset is beyond what a 64-bit float holds
    /// (`1e999`, a 400-digit integer): valid JSON syntax that no consumer can read.
    NumberOutOfRange(usize),
}

/// One pass over valid JSON outside its strings: nesting no deeper than `depth_limit`,
/// and every number one a 64-bit float can hold. Strings are skipped eight bytes at a
/// time (`string_end`), so the cost follows the message's structure, not its text.
pub fn check_structure(json: &str, depth_limit: usize) -> Result<(), StructureError> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => match string_end(bytes, i + 1) {
                Some(end) => i = end,
                None => return Ok(()),
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > depth_limit {
                    return Err(StructureError::TooDeep);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut exponent = false;
                while let Some(&b) = bytes.get(i) {
                    match b {
                        b'e' | b'E' => exponent = true,
                        b'0'..=b'9' | b'.' | b'+' | b'-' => {}
                        _ => break,
                    }
                    i += 1;
                }
                // Only an exponent or over 308 digits can leave f64's range.
                if (exponent || i - start > 308) && !fits_f64(&json[start..i]) {
                    return Err(StructureError::NumberOutOfRange(start));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The index of the quote closing the string whose text starts at `from`.
fn string_end(bytes: &[u8], mut from: usize) -> Option<usize> {
    loop {
        // Eight bytes at a time (SWAR), inline: most strings in events are short. Not
        // measured against memchr2, which would do the same search with a call per string.
        while let Some(chunk) = bytes.get(from..from + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let found = has_byte(word, b'"') | has_byte(word, b'\\');
            if found != 0 {
                from += (found.trailing_zeros() / 8) as usize;
                break;
            }
            from += 8;
        }
        while *bytes.get(from)? != b'"' && bytes[from] != b'\\' {
            from += 1;
        }
        if bytes[from] == b'"' {
            return Some(from);
        }
        from += 2;
    }
}

/// The high bit of each byte of `word` that equals `byte`, and possibly of bytes above
/// the first match (a borrow); only the lowest set bit is exact, which is the one used.
fn has_byte(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// Whether serde_json reads `number` (one JSON number) as a finite value: the judge is
/// the parser every later stage (routing, translation, `fanout route`) uses.
fn fits_f64(number: &str) -> bool {
    serde_json::from_str::<f64>(number).is_ok_and(f64::is_finite)
}

/// The key path of the value at byte `offset` of `json` (valid JSON), e.g.
/// `properties.items[2].price`: for naming the field in an error. Empty when the offset
/// is the whole document or cannot be placed.
pub fn path_to(json: &str, offset: usize) -> String {
    let mut path = String::new();
    let Ok(mut value) = serde_json::from_str::<&RawValue>(json) else {
        return path;
    };
    let base = json.as_ptr() as usize;
    let holds = |v: &RawValue| {
        let start = v.get().as_ptr() as usize - base;
        (start..start + v.get().len()).contains(&offset)
    };
    loop {
        let text = value.get();
        let inner = if text.starts_with('{') {
            RawObject::parse(value).and_then(|object| {
                let (key, inner) = object.iter().find(|(_, v)| holds(v))?;
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                Some(inner)
            })
        } else if text.starts_with('[') {
            serde_json::from_str::<Vec<&RawValue>>(text)
                .ok()
                .and_then(|items| {
                    let (index, inner) = items.into_iter().enumerate().find(|(_, v)| holds(v))?;
                    path.push_str(&format!("[{index}]"));
                    Some(inner)
                })
        } else {
            None
        };
        match inner {
            Some(inner) => value = inner,
            None => return path,
        }
    }
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

    fn nests_deeper_than(json: &str, limit: usize) -> bool {
        check_structure(json, limit) == Err(StructureError::TooDeep)
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
    fn finds_numbers_no_float_holds_and_names_their_path() {
        let huge = format!("1{}", "0".repeat(400));
        for (json, path) in [
            (r#"{"p":{"price":1e999}}"#.to_string(), "p.price"),
            (
                format!(r#"{{"a":"1e999","b":[1,{{"c":-{huge}}}]}}"#),
                "b[1].c",
            ),
            (r#"{"x":-2E+400}"#.to_string(), "x"),
        ] {
            let Err(StructureError::NumberOutOfRange(at)) = check_structure(&json, 64) else {
                panic!("{json}");
            };
            assert_eq!(path_to(&json, at), path, "{json}");
        }
        for json in [
            r#"{"a":1e308,"b":-1.5e-400,"c":12345678901234567890123,"d":"9e999","e":true}"#,
            "[0.1e1, -0, 1E+2]",
        ] {
            assert_eq!(check_structure(json, 64), Ok(()), "{json}");
        }
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

    mod properties {
        use super::super::*;
        use crate::json::testgen;
        use proptest::prelude::*;
        use serde_json::Value;

        /// What serde_json's own parser sees of a document's text: its deepest nesting
        /// (repeated keys' earlier values included), and whether a key cannot appear in a
        /// path (repeated, so its earlier value is gone, or empty).
        #[derive(Default)]
        struct Shape {
            depth: usize,
            repeated_key: bool,
        }

        impl<'de> serde::Deserialize<'de> for Shape {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Shape;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("JSON")
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<Shape, A::Error> {
                        let mut shape = Shape::default();
                        while let Some(item) = seq.next_element::<Shape>()? {
                            shape.depth = shape.depth.max(item.depth);
                            shape.repeated_key |= item.repeated_key;
                        }
                        shape.depth += 1;
                        Ok(shape)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Shape, A::Error> {
                        let mut shape = Shape::default();
                        let mut keys = std::collections::HashSet::new();
                        while let Some(key) = map.next_key::<String>()? {
                            shape.repeated_key |= key.is_empty() || !keys.insert(key);
                            let item = map.next_value::<Shape>()?;
                            shape.depth = shape.depth.max(item.depth);
                            shape.repeated_key |= item.repeated_key;
                        }
                        shape.depth += 1;
                        Ok(shape)
                    }
                    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                    fn visit_unit<E>(self) -> Result<Shape, E> {
                        Ok(Shape::default())
                    }
                }
                d.deserialize_any(V)
            }
        }

        /// No object key anywhere in `value` holds a dot or a bracket.
        fn plain_keys(value: &Value) -> bool {
            match value {
                Value::Object(map) => map
                    .iter()
                    .all(|(k, v)| !k.contains(['.', '[', ']']) && plain_keys(v)),
                Value::Array(items) => items.iter().all(plain_keys),
                _ => true,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// The structure check agrees with serde_json: numbers it refuses are the ones
            /// serde_json cannot read, and its depth is serde_json's.
            #[test]
            fn structure_check_agrees_with_serde_json(text in testgen::value(true)) {
                match serde_json::from_str::<Shape>(&text) {
                    Ok(shape) => {
                        let d = shape.depth;
                        prop_assert_eq!(check_structure(&text, d), Ok(()));
                        if d > 0 {
                            prop_assert_eq!(check_structure(&text, d - 1), Err(StructureError::TooDeep));
                        }
                    }
                    Err(e) => {
                        prop_assert!(e.to_string().contains("number out of range"), "{}", e);
                        let Err(StructureError::NumberOutOfRange(at)) = check_structure(&text, 100) else {
                            return Err(TestCaseError::fail(format!("accepted: {text}")));
                        };
                        let end = text[at..]
                            .find(|c: char| !matches!(c, '0'..='9' | '.' | 'e' | 'E' | '+' | '-'))
                            .map_or(text.len(), |n| at + n);
                        prop_assert!(serde_json::from_str::<f64>(&text[at..end]).is_err());
                    }
                }
            }

            /// An object's fields as `RawObject` reads them are serde_json's reading of the
            /// same object (a repeated key keeps its last value), values byte for byte.
            #[test]
            fn raw_object_reads_what_serde_json_reads(text in testgen::object(false)) {
                let raw: &RawValue = serde_json::from_str(&text).unwrap();
                let fields = RawObject::parse(raw).unwrap();
                let Value::Object(expected) = serde_json::from_str::<Value>(&text).unwrap() else {
                    unreachable!()
                };
                prop_assert_eq!(fields.iter().count(), expected.len());
                for (key, value) in fields.iter() {
                    let parsed: Value = serde_json::from_str(value.get()).unwrap();
                    prop_assert_eq!(Some(&parsed), expected.get(key));
                    // Borrowed from the text: the value's bytes are the client's.
                    prop_assert!(text.contains(value.get()));
                }
            }

            /// A number out of range is named by a path that leads to it.
            #[test]
            fn path_to_names_the_value_at_an_offset(text in testgen::object(true)) {
                if let Err(StructureError::NumberOutOfRange(at)) = check_structure(&text, 100) {
                    let path = path_to(&text, at);
                    // Replacing that number by 0 makes the document readable (when no other
                    // bad number remains), and the value at the path is that 0.
                    let end = text[at..]
                        .find(|c: char| !matches!(c, '0'..='9' | '.' | 'e' | 'E' | '+' | '-'))
                        .map_or(text.len(), |n| at + n);
                    let fixed = format!("{}0{}", &text[..at], &text[end..]);
                    // A number inside a value that a repeated key replaces has no path to it:
                    // the closest field is named, or none.
                    let unique_keys = serde_json::from_str::<Shape>(&fixed).is_ok_and(|s| !s.repeated_key);
                    if unique_keys {
                        prop_assert!(!path.is_empty(), "{}", text);
                    }
                    // Follow the path back when every key of the document is a plain word:
                    // a key may hold dots and brackets itself (`{"a.a":…}` names `a.a`, which
                    // reads back as `a` then `a`).
                    let plain = regex::Regex::new(r"^([A-Za-z]+)((\[\d+\])*)$").unwrap();
                    let parts: Option<Vec<_>> = path.split('.').map(|p| plain.captures(p)).collect();
                    let value = serde_json::from_str::<Value>(&fixed).ok().filter(plain_keys);
                    if let (true, Some(value), Some(parts)) = (unique_keys, value, parts) {
                        let mut found = Some(&value);
                        for part in parts {
                            found = found.and_then(|v| v.get(&part[1]));
                            for index in part[2].split(['[', ']']).filter(|s| !s.is_empty()) {
                                found = found.and_then(|v| v.get(index.parse::<usize>().unwrap()));
                            }
                        }
                        prop_assert_eq!(found.and_then(Value::as_i64), Some(0), "{} at {}", fixed, path);
                    }
                }
            }
        }
    }
}
