//! A destination's routing rules as configured: `sources`, `filter`, `drop_fields`,
//! `rename`, … (keys of its `[[destinations]]` table). Read and checked here; compiled by
//! the rest of this module.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::key_error::KeyError;
use crate::message::MessageType;

/// Which messages a destination gets, and what is removed or moved in them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteConfig {
    /// Names of the `[[sources]]` whose messages it gets; `None`: every source.
    pub sources: Option<Vec<String>>,
    pub filter: Option<FilterConfig>,
    /// Dotted paths removed from each message before it is sent.
    pub drop_fields: Vec<String>,
    /// Dotted path → dotted path, applied after `drop_fields`.
    pub rename: BTreeMap<String, String>,
    /// Whether a message's own `integrations` object can turn this destination off.
    pub integrations: IntegrationsPolicy,
    /// Consent categories this destination needs (`context.consent.categoryPreferences`).
    pub consent_categories: Vec<String>,
    /// Dotted paths whose strings this destination gets as SHA-256 hex.
    pub hash_fields: Vec<String>,
    /// `sample = 0.1`: the share of users this destination gets, all of a user's
    /// messages or none (by userId, else anonymousId; messages with neither all go).
    /// Above 0, at most 1; `None` (the default): every user.
    pub sample: Option<f64>,
}

/// Removes `sample` from a destination's table and reads it (its range is checked in
/// `validate`): it is routing's key, kept apart from the keys every kind shares.
pub fn take_sample(table: &mut toml::Table) -> Result<Option<f64>, KeyError> {
    match table.remove("sample") {
        None => Ok(None),
        Some(toml::Value::Float(share)) => Ok(Some(share)),
        Some(toml::Value::Integer(share)) => Ok(Some(share as f64)),
        Some(other) => Err(KeyError::new(
            "sample",
            format!("must be a number such as 0.1, not a {}", other.type_str()),
        )),
    }
}

/// `integrations = "honour" | "ignore"`: `ignore` for a relay or archive that must get
/// everything (`{"All": false, "Mixpanel": true}` is meant for the downstream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntegrationsPolicy {
    #[default]
    Honour,
    Ignore,
}

/// `filter = { types, events, properties }`: a message goes only if every condition given
/// holds (on the message as stored, before `drop_fields` / `rename`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Message types, e.g. `["track", "identify"]`.
    pub types: Option<Vec<MessageType>>,
    /// Event names of track messages, exact or globs: `*` any run of characters, `?` one
    /// character, e.g. `"Order *"`. Messages of other types are not constrained by it.
    pub events: Option<Vec<String>>,
    /// Dotted path under the message's `properties` (`traits` for identify and group) →
    /// condition, e.g. `"plan.tier" = { equals = "pro" }`.
    pub properties: Option<BTreeMap<String, PropertyCondition>>,
}

/// One property condition: exactly one of `equals` and `exists`. A JSON `null` counts as absent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyCondition {
    /// The value, as JSON: numbers compare by value (TOML `3` equals JSON `3.0`), anything
    /// else exactly; a TOML date-time is compared as its text.
    #[serde(default, deserialize_with = "toml_to_json")]
    pub equals: Option<serde_json::Value>,
    /// `true`: the path holds a value; `false`: it does not.
    pub exists: Option<bool>,
}

/// Reads any TOML value as JSON; date-times (which JSON lacks) become their text.
fn toml_to_json<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    fn unwrap_datetimes(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                // How the toml crate hands a date-time to a deserializer that is not its own.
                if let (1, Some(Value::String(text))) =
                    (map.len(), map.get("$__toml_private_datetime"))
                {
                    return Value::String(text.clone());
                }
                Value::Object(
                    map.into_iter()
                        .map(|(k, v)| (k, unwrap_datetimes(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.into_iter().map(unwrap_datetimes).collect()),
            other => other,
        }
    }
    serde_json::Value::deserialize(deserializer).map(|v| Some(unwrap_datetimes(v)))
}

impl RouteConfig {
    /// Checks `sources`, `filter`, `drop_fields` and `rename` on their own (that each
    /// source exists is checked against the whole config, in `Config::validate`).
    pub fn validate(&self) -> Result<(), KeyError> {
        let empty = |key: &str| Err(KeyError::new(key, "must not be empty"));
        if self.sample.is_some_and(|s| !(s > 0.0 && s <= 1.0)) {
            return Err(KeyError::new("sample", "must be above 0 and at most 1"));
        }
        if self.sources.as_ref().is_some_and(Vec::is_empty) {
            return empty("sources");
        }
        if let Some(filter) = &self.filter {
            if filter.types.is_none() && filter.events.is_none() && filter.properties.is_none() {
                return Err(KeyError::new(
                    "filter",
                    "give at least one of types, events, properties",
                ));
            }
            if filter.types.as_ref().is_some_and(Vec::is_empty) {
                return empty("filter.types");
            }
            if let Some(events) = &filter.events {
                if events.is_empty() {
                    return empty("filter.events");
                }
                if let Some(j) = events.iter().position(String::is_empty) {
                    return empty(&format!("filter.events[{j}]"));
                }
            }
            if let Some(properties) = &filter.properties {
                if properties.is_empty() {
                    return empty("filter.properties");
                }
                for (path, condition) in properties {
                    let key = format!("filter.properties.{}", toml_key(path));
                    check_path(path).map_err(|m| KeyError::new(key.clone(), m))?;
                    match (&condition.equals, condition.exists) {
                        (None, None) => {
                            return Err(KeyError::new(
                                key,
                                "give `equals = <value>` or `exists = true|false`",
                            ))
                        }
                        (Some(_), Some(_)) => {
                            return Err(KeyError::new(
                                key,
                                "give only one of `equals` and `exists`",
                            ))
                        }
                        (Some(serde_json::Value::Null), None) => {
                            return Err(KeyError::new(
                                format!("{key}.equals"),
                                "not a value JSON can hold (nan or inf)",
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
        for (j, path) in self.drop_fields.iter().enumerate() {
            let key = format!("drop_fields[{j}]");
            check_path(path).map_err(|m| KeyError::new(key.clone(), m))?;
            if is_under(path, "type") {
                return Err(KeyError::new(
                    key,
                    "`type` cannot be dropped: routing reads it",
                ));
            }
        }
        for (j, path) in self.hash_fields.iter().enumerate() {
            check_path(path).map_err(|m| KeyError::new(format!("hash_fields[{j}]"), m))?;
        }
        let renames: Vec<(&String, &String)> = self.rename.iter().collect();
        for (i, &(from, to)) in renames.iter().enumerate() {
            let key = format!("rename.{}", toml_key(from));
            check_path(from).map_err(|m| KeyError::new(key.clone(), m))?;
            check_path(to).map_err(|m| KeyError::new(key.clone(), format!("`{to}`: {m}")))?;
            if from == to {
                return Err(KeyError::new(key, "renames a path to itself"));
            }
            if is_under(from, "type") || is_under(to, "type") {
                return Err(KeyError::new(
                    key,
                    "`type` cannot be renamed or replaced: routing reads it",
                ));
            }
            if let Some(dropped) = self.drop_fields.iter().find(|d| is_under(from, d)) {
                return Err(KeyError::new(
                    key,
                    format!("`{from}` is removed by drop_fields `{dropped}` before renames apply"),
                ));
            }
            if let Some(dropped) = self.drop_fields.iter().find(|d| overlap(to, d)) {
                return Err(KeyError::new(
                    key,
                    format!("`{to}` is also in drop_fields (`{dropped}`): keep one of the two"),
                ));
            }
            // Renames touching the same paths would depend on the order they run in.
            for &(other_from, other_to) in &renames[i + 1..] {
                if [from, to]
                    .iter()
                    .any(|a| overlap(a, other_from) || overlap(a, other_to))
                {
                    return Err(KeyError::new(
                        key,
                        format!("overlaps the rename of `{other_from}`: their order would matter"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A dotted path: non-empty segments separated by dots.
fn check_path(path: &str) -> Result<(), String> {
    if path.split('.').any(str::is_empty) {
        return Err(format!(
            "`{path}` is not a dotted path (e.g. `context.ip`): empty segment"
        ));
    }
    Ok(())
}

/// `path` is `prefix` or lies inside it.
fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// One of the two paths is the other or lies inside it.
fn overlap(a: &str, b: &str) -> bool {
    is_under(a, b) || is_under(b, a)
}

/// A map key as TOML writes it in a key path: quoted when it holds a dot.
fn toml_key(key: &str) -> String {
    if key.contains(['.', '"', ' ']) || key.is_empty() {
        format!("{key:?}")
    } else {
        key.to_string()
    }
}
