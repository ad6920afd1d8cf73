//! Column values and types: what a JSON value is stored as, and how a value of one type
//! goes into a column that already has another.

use std::borrow::Cow;

use chrono::{DateTime, Datelike, Utc};

use super::node::Node;
use crate::timestamp;

/// One column value, typed as the warehouse will store it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    BigInt(i64),
    Double(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    /// An array as JSON text, stored in a `text` column.
    Json(String),
}

/// The column types of the warehouse schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Text,
    BigInt,
    Double,
    Bool,
    Timestamp,
}

impl ColumnType {
    /// The Postgres type name, as written in `CREATE TABLE` / `ADD COLUMN`.
    pub fn sql(&self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::BigInt => "bigint",
            ColumnType::Double => "double precision",
            ColumnType::Bool => "boolean",
            ColumnType::Timestamp => "timestamptz",
        }
    }

    /// The type a column gets when this value is the first one seen.
    pub fn of(value: &Value) -> ColumnType {
        match value {
            Value::Text(_) | Value::Json(_) => ColumnType::Text,
            Value::BigInt(_) => ColumnType::BigInt,
            Value::Double(_) => ColumnType::Double,
            Value::Bool(_) => ColumnType::Bool,
            Value::Timestamp(_) => ColumnType::Timestamp,
        }
    }
}

/// The value a JSON scalar or array is stored as; `None` for null and objects (objects
/// are flattened by the caller, nulls make no column).
pub fn infer(json: &serde_json::Value) -> Option<Value> {
    use serde_json::Value as J;
    Some(match json {
        J::Null | J::Object(_) => return None,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => number(n)?.to_value(),
        J::String(s) => string(s).to_value(),
        J::Array(_) => Value::Json(json.to_string()),
    })
}

/// A column value borrowed from the message it was read from: what a `Sink` is given,
/// so that one written straight into COPY bytes costs no `String`.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Text(Cow<'a, str>),
    BigInt(i64),
    Double(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    Json(&'a str),
}

impl Scalar<'_> {
    pub fn to_value(&self) -> Value {
        match self {
            Scalar::Text(s) => Value::Text(s.as_ref().to_owned()),
            Scalar::BigInt(n) => Value::BigInt(*n),
            Scalar::Double(x) => Value::Double(*x),
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Timestamp(t) => Value::Timestamp(*t),
            Scalar::Json(s) => Value::Json((*s).to_owned()),
        }
    }
}

impl Value {
    pub fn as_scalar(&self) -> Scalar<'_> {
        match self {
            Value::Text(s) => Scalar::Text(Cow::Borrowed(s)),
            Value::BigInt(n) => Scalar::BigInt(*n),
            Value::Double(x) => Scalar::Double(*x),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Timestamp(t) => Scalar::Timestamp(*t),
            Value::Json(s) => Scalar::Json(s),
        }
    }
}

/// `infer` for a value of a message read in place.
pub fn infer_node<'n>(node: &'n Node<'_>) -> Option<Scalar<'n>> {
    Some(match node {
        Node::Null | Node::Object(_) => return None,
        Node::Bool(b) => Scalar::Bool(*b),
        Node::Number(n) => number(n)?,
        Node::Str(s) => string(s),
        Node::Array(text) => Scalar::Json(text),
    })
}

fn number(n: &serde_json::Number) -> Option<Scalar<'static>> {
    Some(match n.as_i64() {
        Some(i) => Scalar::BigInt(i),
        // Integers past i64 and all fractions: serde_json reads both as f64.
        None => Scalar::Double(n.as_f64()?),
    })
}

fn string(s: &str) -> Scalar<'_> {
    match rfc3339(s) {
        Some(t) => Scalar::Timestamp(t),
        None => Scalar::Text(Cow::Borrowed(s)),
    }
}

/// Strict RFC 3339 with an offset, years 0000-9999 (what a `timestamptz` reads back);
/// looser forms such as `2024-05-01 12:00` stay text, as a client may mean them as text.
pub fn rfc3339(s: &str) -> Option<DateTime<Utc>> {
    let t = timestamp::rfc3339(s)?;
    (0..=9999).contains(&t.year()).then_some(t)
}

/// A value for a column that already has type `to`: `Some` when it converts without
/// losing what it says, `None` when it cannot (the caller stores NULL and counts a
/// schema warning).
pub fn convert(value: Value, to: ColumnType) -> Option<Value> {
    if ColumnType::of(&value) == to {
        return Some(value);
    }
    match (value, to) {
        (Value::BigInt(i), ColumnType::Double) => Some(Value::Double(i as f64)),
        // Only whole doubles within i64: cutting 2.5 to 2 would store a wrong number.
        (Value::Double(d), ColumnType::BigInt) => {
            let whole = d.fract() == 0.0 && d >= i64::MIN as f64 && d < i64::MAX as f64;
            whole.then_some(Value::BigInt(d as i64))
        }
        (value, ColumnType::Text) => Some(Value::Text(text(value))),
        (Value::Text(s), ColumnType::Timestamp) => rfc3339(&s).map(Value::Timestamp),
        (Value::Text(s), ColumnType::BigInt) => s.parse().ok().map(Value::BigInt),
        (Value::Text(s), ColumnType::Double) => s
            .parse::<f64>()
            .ok()
            .filter(|d| d.is_finite())
            .map(Value::Double),
        (Value::Text(s), ColumnType::Bool) => match s.as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        _ => None,
    }
}

/// How a value reads as text: as it was in the JSON (numbers in JSON's notation), and
/// timestamps as fanout writes them.
fn text(value: Value) -> String {
    match value {
        Value::Text(s) | Value::Json(s) => s,
        Value::BigInt(i) => i.to_string(),
        Value::Double(d) => serde_json::Value::from(d).to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Timestamp(t) => timestamp::format(t),
    }
}
