//! fanout's filters, over minijinja's built-in ones. Every one passes undefined and null
//! through untouched (so that a missing field stays missing and `default` still applies),
//! except `default`, which replaces them.
//!
//! One implementation each (`Filter::apply`, on JSON values): the fast path (`fast.rs`)
//! calls it directly, and the minijinja registrations below convert to and from it.

use std::borrow::Cow;

use base64::{engine::general_purpose::STANDARD, Engine};
use minijinja::value::Rest;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::context::{document, to_json};
use crate::json::doc::Doc;

/// A value while a template is evaluated: undefined (a missing path), JSON (a name's
/// value, or one a filter made), or a part of the message as read in place.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Undefined,
    Json(Cow<'a, Json>),
    Doc(&'a Doc<'a>),
}

impl Val<'_> {
    fn owned(json: Json) -> Val<'static> {
        Val::Json(Cow::Owned(json))
    }

    /// JSON null (not undefined).
    pub fn is_null(&self) -> bool {
        match self {
            Val::Undefined => false,
            Val::Json(json) => json.is_null(),
            Val::Doc(doc) => doc.is_null(),
        }
    }

    /// The value as JSON; `None` when undefined.
    pub fn to_json(&self) -> Option<Json> {
        match self {
            Val::Undefined => None,
            Val::Json(json) => Some(json.clone().into_owned()),
            Val::Doc(doc) => Some(doc.to_value()),
        }
    }

    /// The value as minijinja sees it.
    pub fn into_value(self) -> Value {
        match self {
            Val::Undefined => Value::UNDEFINED,
            Val::Json(json) => Value::from(minijinja::value::Serde(&*json)),
            Val::Doc(doc) => Value::from(minijinja::value::Serde(doc)),
        }
    }

    pub fn from_value(v: &Value) -> Val<'static> {
        if v.is_undefined() {
            Val::Undefined
        } else {
            Val::owned(to_json(v))
        }
    }
}

// Undefined never reaches a body (its key is dropped): written as null for completeness.
impl serde::Serialize for Val<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Val::Undefined => serializer.serialize_unit(),
            Val::Json(json) => json.serialize(serializer),
            Val::Doc(doc) => doc.serialize(serializer),
        }
    }
}

/// A filter of fanout's with its arguments, as written in a template.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `default(other="", boolean=false)`: `other` when the value is undefined or null
    /// (or, with `boolean`, false, zero or empty).
    Default {
        other: Val<'static>,
        boolean: bool,
    },
    Lower,
    Upper,
    Trim,
    Sha256,
    /// Basic authentication from settings (a preset's `Authorization` header).
    Base64,
    String,
    Unix,
    UnixMs,
    Iso8601,
    Json,
    Number,
    /// `round(precision=0)`: to that many decimals; with 0 an integer.
    Round(i32),
    /// `split(separator=whitespace)`: a string into an array of strings.
    Split(Option<String>),
    /// `join(separator="")`: an array's items as text, joined.
    Join(Option<String>),
}

/// The filters without arguments, by name.
pub const PLAIN: [(&str, Filter); 12] = [
    ("lower", Filter::Lower),
    ("upper", Filter::Upper),
    ("trim", Filter::Trim),
    ("sha256", Filter::Sha256),
    ("base64", Filter::Base64),
    ("string", Filter::String),
    ("unix", Filter::Unix),
    ("unix_ms", Filter::UnixMs),
    ("iso8601", Filter::Iso8601),
    ("json", Filter::Json),
    ("number", Filter::Number),
    ("round", Filter::Round(0)),
];

pub fn register(env: &mut Environment<'static>) {
    let default = |v: Value, other: Option<Value>, boolean: Option<bool>| {
        let other = other.map_or(Val::owned(Json::from("")), |o| Val::from_value(&o));
        let boolean = boolean == Some(true);
        via(&v, &Filter::Default { other, boolean })
    };
    env.add_filter("default", default);
    env.add_filter("d", default);
    for (name, filter) in PLAIN {
        if name != "round" {
            env.add_filter(name, move |v: Value| via(&v, &filter));
        }
    }
    env.add_filter("round", |v: Value, precision: Option<i32>| {
        via(&v, &Filter::Round(precision.unwrap_or(0)))
    });
    env.add_filter("split", |v: Value, separator: Option<String>| {
        via(&v, &Filter::Split(separator))
    });
    env.add_filter("join", |v: Value, separator: Option<String>| {
        via(&v, &Filter::Join(separator))
    });
    env.add_filter("merge", merge);
    env.add_filter("compact", |v: Value| merge(v, Value::UNDEFINED));
    env.add_filter("omit", omit);
    super::reshape::register(env);
}

/// A filter applied to a minijinja value: undefined and null pass unconverted.
fn via(v: &Value, filter: &Filter) -> Result<Value, Error> {
    if (v.is_undefined() || v.is_none()) && !matches!(filter, Filter::Default { .. } | Filter::Json)
    {
        return Ok(v.clone());
    }
    filter
        .apply(Val::from_value(v))
        .map(Val::into_value)
        .map_err(|message| Error::new(ErrorKind::InvalidOperation, message))
}

impl Filter {
    /// The error is what went wrong, without the value (refusals are logged, and a
    /// message's values stay out of logs).
    pub fn apply<'a>(&self, v: Val<'a>) -> Result<Val<'a>, String> {
        let v = match v {
            Val::Undefined => None,
            Val::Json(json) => Some(json),
            Val::Doc(doc) => match self.on_doc(doc) {
                Some(done) => return done,
                None => Some(Cow::Owned(doc.to_value())),
            },
        };
        let json = match (self, v) {
            (Filter::Default { other, boolean }, v) => {
                return Ok(match v {
                    Some(json) if !json.is_null() && (!*boolean || truthy(&json)) => {
                        Val::Json(json)
                    }
                    _ => other.clone(),
                });
            }
            (_, None) => return Ok(Val::Undefined),
            (Filter::Json, Some(json)) => return Ok(Val::owned(Json::String(json.to_string()))),
            (_, Some(json)) if json.is_null() => return Ok(Val::Json(json)),
            (_, Some(json)) => json,
        };
        let text = |f: fn(&str) -> String| Ok(Val::owned(Json::String(f(&as_text(&json)))));
        match self {
            Filter::Default { .. } | Filter::Json => unreachable!("returned above"),
            Filter::Lower => text(str::to_lowercase),
            Filter::Upper => text(str::to_uppercase),
            Filter::Trim => text(|s| s.trim().to_string()),
            Filter::Sha256 => text(sha256),
            Filter::Base64 => text(|s| STANDARD.encode(s)),
            Filter::String if json.is_string() => Ok(Val::Json(json)),
            Filter::String => text(str::to_string),
            Filter::Unix => time(&json).map(|t| Val::owned(Json::from(t.timestamp()))),
            Filter::UnixMs => time(&json).map(|t| Val::owned(Json::from(t.timestamp_millis()))),
            Filter::Iso8601 => {
                time(&json).map(|t| Val::owned(Json::from(crate::timestamp::format(t))))
            }
            Filter::Number => number(json),
            Filter::Round(precision) => round(&number(json)?, *precision),
            Filter::Split(separator) => {
                let text = as_text(&json);
                let parts: Vec<Json> = match separator.as_deref() {
                    None | Some("") => text.split_whitespace().map(Json::from).collect(),
                    Some(sep) => text.split(sep).map(Json::from).collect(),
                };
                Ok(Val::owned(Json::Array(parts)))
            }
            Filter::Join(separator) => join(json, separator.as_deref().unwrap_or("")),
        }
    }
}

impl Filter {
    /// The filter applied to a part of the message where that needs no conversion to JSON
    /// (a string read, a value kept); `None` when it needs one.
    fn on_doc<'a>(&self, doc: &'a Doc<'a>) -> Option<Result<Val<'a>, String>> {
        let kept = Some(Ok(Val::Doc(doc)));
        let text = |f: fn(&str) -> String| Some(Ok(Val::owned(Json::String(f(doc.as_str()?)))));
        match (self, doc) {
            (Filter::Default { boolean: false, .. }, _) if !doc.is_null() => kept,
            (Filter::String, Doc::Str(_)) | (Filter::Number, Doc::Number(_)) => kept,
            (Filter::Lower, _) => text(str::to_lowercase),
            (Filter::Upper, _) => text(str::to_uppercase),
            (Filter::Trim, _) => text(|s| s.trim().to_string()),
            (Filter::Sha256, _) => text(sha256),
            (Filter::Base64, _) => text(|s| STANDARD.encode(s)),
            (Filter::Unix | Filter::UnixMs | Filter::Iso8601, Doc::Str(s)) => {
                let Some(t) = crate::timestamp::parse(s) else {
                    return Some(Err("string is not a timestamp".into()));
                };
                Some(Ok(Val::owned(match self {
                    Filter::Unix => Json::from(t.timestamp()),
                    Filter::UnixMs => Json::from(t.timestamp_millis()),
                    _ => Json::from(crate::timestamp::format(t)),
                })))
            }
            _ => None,
        }
    }
}

/// Jinja's truth: false, zero, empty strings, arrays and objects are false.
fn truthy(json: &Json) -> bool {
    match json {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(items) => !items.is_empty(),
        Json::Object(map) => !map.is_empty(),
    }
}

/// A value's kind as minijinja names it in errors.
fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "none",
        Json::Bool(_) => "bool",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "sequence",
        Json::Object(_) => "map",
    }
}

/// The value as text: strings as they are, numbers and booleans as JSON writes them,
/// objects and arrays as JSON.
fn as_text(json: &Json) -> Cow<'_, str> {
    match json {
        Json::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// Normalised as Meta's and Google's matching needs (trimmed, lower-cased), hex; a value
/// that already is a SHA-256 hex digest is passed on, not hashed twice.
pub fn sha256(s: &str) -> String {
    let normal = s.trim().to_lowercase();
    if normal.len() == 64 && normal.bytes().all(|b| b.is_ascii_hexdigit()) {
        return normal;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(normal.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

/// An ISO 8601 timestamp (as fanout stores them) or Unix seconds (a whole number).
fn time(json: &Json) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let at = match json {
        Json::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f as i64 as f64 == *f)
                    .map(|f| f as i64)
            })
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0)),
        Json::String(s) => crate::timestamp::parse(s),
        _ => None,
    };
    at.ok_or_else(|| format!("{} is not a timestamp", kind(json)))
}

/// A number from a number or its text; anything else is an error.
fn number(json: Cow<'_, Json>) -> Result<Val<'_>, String> {
    if json.is_number() {
        return Ok(Val::Json(json));
    }
    let text = json.as_str().map(str::trim).unwrap_or_default();
    if let Ok(n) = text.parse::<i64>() {
        return Ok(Val::owned(Json::from(n)));
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Val::owned(Json::from(f))),
        _ => Err(format!("{} is not a number", kind(&json))),
    }
}

fn round(v: &Val<'_>, precision: i32) -> Result<Val<'static>, String> {
    let x = match v {
        Val::Json(json) => json.as_f64().unwrap_or(f64::NAN),
        Val::Doc(Doc::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Val::Undefined | Val::Doc(_) => f64::NAN,
    };
    let precision = precision.clamp(0, 15);
    if precision == 0 {
        return Ok(Val::owned(Json::from(x.round() as i64)));
    }
    let scale = 10f64.powi(precision);
    let rounded = serde_json::Number::from_f64((x * scale).round() / scale);
    Ok(Val::owned(rounded.map_or(Json::Null, Json::Number)))
}

fn join<'a>(json: Cow<'a, Json>, separator: &str) -> Result<Val<'a>, String> {
    let items: Vec<Cow<'_, str>> = match &*json {
        Json::String(_) => return Ok(Val::Json(json)),
        Json::Array(items) => items
            .iter()
            .filter(|item| !item.is_null())
            .map(as_text)
            .collect(),
        Json::Object(map) => map.keys().map(|k| Cow::Borrowed(k.as_str())).collect(),
        other => return Err(format!("{} is not iterable", kind(other))),
    };
    Ok(Val::owned(Json::String(items.join(separator))))
}

fn missing(v: &Value) -> bool {
    v.is_undefined() || v.is_none()
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

/// `merge(other)`: an object with `other`'s keys over its own, keys whose value is
/// undefined or null left out (`traits | merge({'$email': traits.email})`); an undefined
/// or null `other` adds nothing (`compact`: an object without its null keys).
fn merge(v: Value, other: Value) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    let over = if missing(&other) {
        Json::Object(Default::default())
    } else {
        to_json(&other)
    };
    let (Json::Object(mut object), Json::Object(over)) = (to_json(&v), over) else {
        return Err(invalid("merge takes two objects".into()));
    };
    object.extend(over);
    object.retain(|_, value| !value.is_null());
    Ok(document(Json::Object(object)))
}

/// `omit('a', 'b', …)`: an object without these keys.
fn omit(v: Value, keys: Rest<String>) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    let Json::Object(mut object) = to_json(&v) else {
        return Err(invalid(format!("omit takes an object, not {}", v.kind())));
    };
    for key in keys.iter() {
        object.remove(key);
    }
    Ok(document(Json::Object(object)))
}
