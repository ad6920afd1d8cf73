//! `[[destinations.actions]]` of a Klaviyo destination: consent and list membership by
//! rule. Each action whose `when` (routing's filter syntax) a message meets adds a profile
//! to one of Klaviyo's bulk calls, *in addition to* the message's own events or profile
//! upsert (as Segment's Klaviyo (Actions) destination runs its mappings side by side):
//!
//! - `subscribe` → `POST /api/profile-subscription-bulk-create-jobs` (≤ 1 000 profiles),
//! - `unsubscribe` → `POST /api/profile-subscription-bulk-delete-jobs` (≤ 100),
//! - `suppress` / `unsuppress` → `POST /api/profile-suppression-bulk-create-jobs` /
//!   `-delete-jobs` (≤ 100, email only),
//! - `add_to_list` / `remove_from_list` → `POST` / `DELETE
//!   /api/lists/{list_id}/relationships/profiles` (≤ 1 000 profile ids; each id is first
//!   found by a `POST /api/profile-import` of the profile's identifiers).
//!
//! The email and phone come from the traits the profile translation reads (`traits` for
//! identify/group, else `context.traits`), then `properties`. A message without one for
//! any of the action's channels is refused before any request.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::translate::{build_profile, Profile};
use crate::key_error::KeyError;
use crate::routing::{FilterConfig, MessageFilter, RouteConfig};
use crate::timestamp;

/// One `[[destinations.actions]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlaviyoActionConfig {
    /// Which messages run the action: routing's `filter` table (`types`, `events`,
    /// `properties`).
    pub when: FilterConfig,
    /// What is done to the message's profile.
    #[serde(rename = "do")]
    pub action: KlaviyoActionKind,
    /// Channels to (un)subscribe: `email`, `sms`; default `["email"]`. Suppression is
    /// email only; list actions take none.
    pub channels: Option<Vec<KlaviyoChannel>>,
    /// The list: required by `add_to_list` / `remove_from_list`, optional for
    /// `subscribe` / `unsubscribe`, refused for suppression (account-wide).
    pub list_id: Option<String>,
    /// Dotted path in the message to the consent time (`subscribe` only); older than a
    /// day, it is sent as `consented_at` with `historical_import: true`.
    pub consented_at: Option<String>,
}

/// `do = "…"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlaviyoActionKind {
    Subscribe,
    Unsubscribe,
    AddToList,
    RemoveFromList,
    Suppress,
    Unsuppress,
}

/// `channels = ["email", "sms"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlaviyoChannel {
    Email,
    Sms,
}

impl KlaviyoActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KlaviyoActionKind::Subscribe => "subscribe",
            KlaviyoActionKind::Unsubscribe => "unsubscribe",
            KlaviyoActionKind::AddToList => "add_to_list",
            KlaviyoActionKind::RemoveFromList => "remove_from_list",
            KlaviyoActionKind::Suppress => "suppress",
            KlaviyoActionKind::Unsuppress => "unsuppress",
        }
    }

    pub(super) fn is_list(self) -> bool {
        matches!(
            self,
            KlaviyoActionKind::AddToList | KlaviyoActionKind::RemoveFromList
        )
    }

    fn is_suppression(self) -> bool {
        matches!(
            self,
            KlaviyoActionKind::Suppress | KlaviyoActionKind::Unsuppress
        )
    }
}

/// Checks each action; errors name `actions[i].<key>`.
pub fn validate_actions(actions: &[KlaviyoActionConfig]) -> Result<(), KeyError> {
    for (i, action) in actions.iter().enumerate() {
        let at = |key: &str| format!("actions[{i}].{key}");
        // The same checks as a destination's `filter`, with the key path moved.
        let route = RouteConfig {
            filter: Some(action.when.clone()),
            ..RouteConfig::default()
        };
        route.validate().map_err(|e| {
            let rest = e.key.strip_prefix("filter").unwrap_or(&e.key);
            KeyError::new(format!("actions[{i}].when{rest}"), e.message)
        })?;
        let kind = action.action;
        match (&action.list_id, kind.is_list(), kind.is_suppression()) {
            (None, true, _) => {
                return Err(KeyError::new(
                    at("list_id"),
                    format!("`do = \"{}\"` needs a list_id", kind.as_str()),
                ))
            }
            // It goes into a URL path; Klaviyo's list ids are short alphanumerics.
            (Some(id), _, _) if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                return Err(KeyError::new(
                    at("list_id"),
                    format!(
                        "{id:?} is not a Klaviyo list id (letters and digits, e.g. \"Xy12Ab\")"
                    ),
                ))
            }
            (Some(_), _, true) => {
                return Err(KeyError::new(
                    at("list_id"),
                    "suppression is account-wide: it takes no list_id",
                ))
            }
            _ => {}
        }
        if let Some(channels) = &action.channels {
            if kind.is_list() {
                return Err(KeyError::new(
                    at("channels"),
                    "list membership has no channels (use `subscribe` for consent)",
                ));
            }
            if channels.is_empty() {
                return Err(KeyError::new(at("channels"), "must not be empty"));
            }
            let distinct: HashSet<_> = channels.iter().collect();
            if distinct.len() != channels.len() {
                return Err(KeyError::new(at("channels"), "names a channel twice"));
            }
            if kind.is_suppression() && channels.contains(&KlaviyoChannel::Sms) {
                return Err(KeyError::new(
                    at("channels"),
                    "Klaviyo suppresses email only: use `unsubscribe` for sms",
                ));
            }
        }
        if let Some(path) = &action.consented_at {
            if kind != KlaviyoActionKind::Subscribe {
                return Err(KeyError::new(
                    at("consented_at"),
                    "only `do = \"subscribe\"` sends a consent time",
                ));
            }
            if path.split('.').any(str::is_empty) {
                return Err(KeyError::new(
                    at("consented_at"),
                    format!("`{path}` is not a dotted path (e.g. `properties.consented_at`)"),
                ));
            }
        }
    }
    Ok(())
}

/// An action compiled: its filter, and what it does.
pub(super) struct KlaviyoAction {
    when: MessageFilter,
    pub(super) kind: KlaviyoActionKind,
    channels: Vec<KlaviyoChannel>,
    pub(super) list_id: Option<String>,
    consented_at: Option<Vec<String>>,
}

impl KlaviyoAction {
    pub(super) fn compile(config: &KlaviyoActionConfig) -> KlaviyoAction {
        KlaviyoAction {
            when: MessageFilter::new(&config.when),
            kind: config.action,
            channels: config
                .channels
                .clone()
                .unwrap_or_else(|| vec![KlaviyoChannel::Email]),
            list_id: config.list_id.clone(),
            consented_at: config
                .consented_at
                .as_ref()
                .map(|p| p.split('.').map(str::to_string).collect()),
        }
    }
}

/// What one action does for one message: the profile it names and, for a subscription
/// older than a day, its consent time.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ActionItem {
    /// Index into the destination's actions.
    pub(super) action: usize,
    pub(super) email: Option<String>,
    pub(super) phone_number: Option<String>,
    pub(super) external_id: Option<String>,
    /// Set only when the consent is historical (Klaviyo takes it only with
    /// `historical_import: true`, and wants that only for consent older than a day).
    pub(super) consented_at: Option<DateTime<Utc>>,
}

/// Klaviyo's rule: consent gathered more than a day ago is a historical import.
const HISTORICAL_AFTER: Duration = Duration::days(1);

/// The actions `message` runs, or why it cannot run them (a refusal's detail).
pub(super) fn plan(
    actions: &[KlaviyoAction],
    message: &[u8],
    now: DateTime<Utc>,
) -> Result<Vec<ActionItem>, String> {
    let mut matching = actions
        .iter()
        .enumerate()
        .filter(|(_, a)| a.when.matches(message))
        .peekable();
    if matching.peek().is_none() {
        return Ok(Vec::new());
    }
    let json: Value =
        serde_json::from_slice(message).map_err(|e| format!("invalid_message: {e}"))?;
    let profile = profile_of(&json);
    let mut items = Vec::new();
    for (index, action) in matching {
        let name = action.kind.as_str();
        let mut item = ActionItem {
            action: index,
            email: None,
            phone_number: None,
            external_id: None,
            consented_at: None,
        };
        if action.kind.is_list() {
            if !profile.identifies_upsert() {
                return Err(format!(
                    "no_profile_identifier: actions[{index}] ({name}) needs a userId, email \
                     or phone to find the profile"
                ));
            }
            item.email = profile.email.clone();
            item.phone_number = profile.phone_number.clone();
            item.external_id = profile.external_id.clone();
        } else {
            for channel in &action.channels {
                match channel {
                    KlaviyoChannel::Email => item.email = profile.email.clone(),
                    KlaviyoChannel::Sms => item.phone_number = profile.phone_number.clone(),
                }
            }
            if item.email.is_none() && item.phone_number.is_none() {
                let wanted = match action.channels.as_slice() {
                    [KlaviyoChannel::Email] => "an email",
                    [KlaviyoChannel::Sms] => "an E.164 phone",
                    _ => "an email or an E.164 phone",
                };
                return Err(format!(
                    "no_contact_for_action: actions[{index}] ({name}) needs {wanted} in \
                     traits, context.traits or properties"
                ));
            }
        }
        if let Some(path) = &action.consented_at {
            item.consented_at = historical_consent(&json, path, now)
                .map_err(|e| format!("invalid_consented_at: actions[{index}] ({name}): {e}"))?;
        }
        items.push(item);
    }
    Ok(items)
}

/// The profile's identifiers as the profile translation finds them, with `properties`
/// as the last place to look for an email or phone (a form's track call carries them
/// there).
fn profile_of(json: &Value) -> Profile {
    let traits = match json["type"].as_str() {
        Some("identify" | "group") => &json["traits"],
        _ => &json["context"]["traits"],
    };
    let text = |key: &str| {
        json[key]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let mut profile = build_profile(text("userId"), None, traits.as_object().cloned());
    if profile.email.is_none() || profile.phone_number.is_none() {
        let from_properties = build_profile(None, None, json["properties"].as_object().cloned());
        profile.email = profile.email.or(from_properties.email);
        profile.phone_number = profile.phone_number.or(from_properties.phone_number);
    }
    profile
}

/// The consent time at `path` when it is more than a day before `now`; `None` when the
/// message has none or a recent one.
fn historical_consent(
    json: &Value,
    path: &[String],
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, String> {
    let value = path.iter().try_fold(json, |node, key| node.get(key));
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text,
        Some(other) => return Err(format!("`{}` is {other}, not a date-time", path.join("."))),
    };
    let time = timestamp::parse(text)
        .ok_or_else(|| format!("`{}` = {text:?} is not a date-time", path.join(".")))?;
    Ok((time < now - HISTORICAL_AFTER).then_some(time))
}

#[cfg(test)]
mod tests;
