//! fanout's filters, over minijinja's built-in ones. Every one passes undefined and null
//! through untouched (so that a missing field stays missing and `default` still applies),
//! except `default`, which replaces them.

use base64::{engine::general_purpose::STANDARD, Engine};
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Value};
use sha2::{Digest, Sha256};

use minijinja::value::Rest;
use serde_json::Value as Json;

use super::context::{document, to_json};

pub fn register(env: &mut Environment<'static>) {
    env.add_filter("default", default);
    env.add_filter("d", default);
    env.add_filter("lower", |v: Value| text(v, |s| s.to_lowercase()));
    env.add_filter("upper", |v: Value| text(v, |s| s.to_uppercase()));
    env.add_filter("trim", |v: Value| text(v, |s| s.trim().to_string()));
    env.add_filter("sha256", |v: Value| text(v, |s| sha256(&s)));
    // Basic authentication from settings (a preset's `Authorization` header).
    env.add_filter("base64", |v: Value| text(v, |s| STANDARD.encode(s)));
    env.add_filter("string", |v: Value| text(v, |s| s));
    env.add_filter("unix", |v: Value| time(v, |t| Value::from(t.timestamp())));
    env.add_filter("unix_ms", |v: Value| {
        time(v, |t| Value::from(t.timestamp_millis()))
    });
    env.add_filter("iso8601", |v: Value| {
        time(v, |t| Value::from(crate::timestamp::format(t)))
    });
    env.add_filter("json", json);
    env.add_filter("number", number);
    env.add_filter("round", round);
    env.add_filter("split", split);
    env.add_filter("join", join);
    env.add_filter("merge", merge);
    env.add_filter("compact", |v: Value| merge(v, Value::UNDEFINED));
    env.add_filter("omit", omit);
    super::reshape::register(env);
}

fn missing(v: &Value) -> bool {
    v.is_undefined() || v.is_none()
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

/// `default(other="", boolean=false)`: `other` when the value is undefined or null (or,
/// with `boolean=true`, false, zero or empty).
fn default(v: Value, other: Option<Value>, boolean: Option<bool>) -> Value {
    if missing(&v) || (boolean == Some(true) && !v.is_true()) {
        other.unwrap_or_else(|| Value::from(""))
    } else {
        v
    }
}

/// The value as text: strings as they are, numbers and booleans as JSON writes them,
/// objects and arrays as JSON.
fn as_text(v: &Value) -> String {
    match v.as_str() {
        Some(s) => s.to_string(),
        None => to_json(v).to_string(),
    }
}

fn text(v: Value, f: impl Fn(String) -> String) -> Value {
    if missing(&v) {
        return v;
    }
    Value::from(f(as_text(&v)))
}

/// Normalised as Meta's and Google's matching needs (trimmed, lower-cased), hex; a value
/// that already is a SHA-256 hex digest is passed on, not hashed twice.
pub fn sha256(s: &str) -> String {
    let normal = s.trim().to_lowercase();
    if normal.len() == 64 && normal.bytes().all(|b| b.is_ascii_hexdigit()) {
        return normal;
    }
    let digest = Sha256::digest(normal.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// An ISO 8601 timestamp (as fanout stores them) or Unix seconds, then `f`.
fn time(v: Value, f: impl Fn(chrono::DateTime<chrono::Utc>) -> Value) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    let at = match v.kind() {
        ValueKind::Number => v
            .as_i64()
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0)),
        _ => v.as_str().and_then(crate::timestamp::parse),
    };
    at.map(f)
        .ok_or_else(|| invalid(format!("{} is not a timestamp", v.kind())))
}

fn json(v: Value) -> Value {
    if v.is_undefined() {
        return v;
    }
    Value::from(to_json(&v).to_string())
}

/// A number from a number or its text; anything else is an error.
fn number(v: Value) -> Result<Value, Error> {
    if missing(&v) || v.kind() == ValueKind::Number {
        return Ok(v);
    }
    let text = v.as_str().map(str::trim).unwrap_or_default();
    if let Ok(n) = text.parse::<i64>() {
        return Ok(Value::from(n));
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Value::from(f)),
        // The value is not quoted: refusals are logged, and a message's values stay out of logs.
        _ => Err(invalid(format!("{} is not a number", v.kind()))),
    }
}

/// `round(precision=0)`: to that many decimals; with 0 an integer.
fn round(v: Value, precision: Option<i32>) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    let x = f64::try_from(number(v)?)?;
    let precision = precision.unwrap_or(0).clamp(0, 15);
    if precision == 0 {
        return Ok(Value::from(x.round() as i64));
    }
    let scale = 10f64.powi(precision);
    Ok(Value::from((x * scale).round() / scale))
}

/// `split(separator=whitespace)`: a string into an array of strings.
fn split(v: Value, separator: Option<String>) -> Value {
    if missing(&v) {
        return v;
    }
    let text = as_text(&v);
    let parts: Vec<Value> = match separator.as_deref() {
        None | Some("") => text.split_whitespace().map(Value::from).collect(),
        Some(sep) => text.split(sep).map(Value::from).collect(),
    };
    Value::from(parts)
}

/// `join(separator="")`: an array's items as text, joined.
fn join(v: Value, separator: Option<String>) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    if v.as_str().is_some() {
        return Ok(v);
    }
    let items: Vec<String> = v
        .try_iter()?
        .filter(|item| !missing(item))
        .map(|item| as_text(&item))
        .collect();
    Ok(Value::from(items.join(separator.as_deref().unwrap_or(""))))
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
