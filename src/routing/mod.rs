//! Stage 6: which destinations get a message, and in what shape.
//!
//! Each destination's `Route`, compiled once from its config, decides for every message
//! read from the queue, in this order: its `sources`, its `filter` (type, event name,
//! property conditions), the message's own `integrations` object, then `drop_fields` and
//! `rename`. Pure and synchronous. The delivery engine runs it on every message, so a
//! destination without rules reads no JSON unless the bytes mention `"integrations"`.
//!
//! `integrations` (Segment's per-message switches; keys compared case-insensitively, since
//! clients send both `All` and `all`): a key equal to the destination's name, else to its
//! kind (`"Klaviyo": false` works as it does at Segment), decides — `false` skips, `true`
//! or an object of settings sends; otherwise `All: false` skips; otherwise it goes. A
//! destination with `integrations = "ignore"` takes no notice of it.
//!
//! `consent_categories`: a message whose `context.consent.categoryPreferences` sets one of
//! them to anything but `true` (or leaves one out, when the object is there) is skipped
//! (`consent`); a message without that object goes (Segment's rule for events without
//! consent data).
//!
//! `sample`: a share of users, picked by a fixed hash of the userId (else anonymousId),
//! so every instance, and every restart, keeps the same users (`sampled` otherwise).
//!
//! A message that is not a JSON object is passed on unchanged: the destination decides.

mod config;
mod fields;
mod filter;
mod view;

use std::borrow::Cow;

use memchr::memmem;
use serde_json::value::RawValue;

use crate::json::RawObject;
use crate::message::MessageType;
pub use config::{take_sample, FilterConfig, IntegrationsPolicy, PropertyCondition, RouteConfig};
use fields::{Fields, Transform};
use filter::Filter;
pub use filter::MessageFilter;
pub use view::Skip;
use view::View;

/// One destination's routing rules, compiled.
pub struct Route {
    name: String,
    kind: &'static str,
    sources: Option<Vec<String>>,
    filter: Option<Filter>,
    transform: Option<Transform>,
    integrations: memmem::Finder<'static>,
    honour_integrations: bool,
    consent: Vec<String>,
    /// With `sample`: a user is kept when their hash is below this.
    sample_below: Option<u64>,
}

/// What a destination gets of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'m> {
    /// The message as stored (`Borrowed`), or edited by `drop_fields` / `rename` (`Owned`).
    Send(Cow<'m, [u8]>),
    Skip(Skip),
}

/// `message::user_key` of a message's JSON as stored.
pub fn user_key(message: &[u8]) -> u64 {
    std::str::from_utf8(message)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        .and_then(RawObject::parse)
        .map_or(0, |object| View::new(|key| object.get(key)).user_key())
}

impl Route {
    /// The rules `route` of destination `name`, of kind `kind` (named in skips' logs).
    pub fn new(name: &str, kind: &'static str, route: &RouteConfig) -> Route {
        Route {
            name: name.to_string(),
            kind,
            sources: route.sources.clone(),
            filter: route.filter.as_ref().map(Filter::new),
            transform: Transform::new(route),
            integrations: memmem::Finder::new(b"\"integrations\""),
            honour_integrations: route.integrations == IntegrationsPolicy::Honour,
            consent: route.consent_categories.clone(),
            // All of them: no need to read a message for it.
            sample_below: route
                .sample
                .filter(|&share| share < 1.0)
                .map(view::sample_threshold),
        }
    }

    /// `source` is the source name stored with the message; `message` its JSON as stored.
    pub fn decide<'m>(&self, source: &str, message: &'m [u8]) -> Decision<'m> {
        self.decide_with_user(source, message).0
    }

    /// `decide`, and the message's `user_key` when deciding read the message anyway (so
    /// that the delivery engine does not parse it a second time for it).
    pub fn decide_with_user<'m>(
        &self,
        source: &str,
        message: &'m [u8],
    ) -> (Decision<'m>, Option<u64>) {
        if let Some(sources) = &self.sources {
            if !sources.iter().any(|s| s == source) {
                return (Decision::Skip(Skip::Source), None);
            }
        }
        let pass = || Decision::Send(Cow::Borrowed(message));
        if !self.may_switch_off(message) && self.consent.is_empty() && self.sample_below.is_none() {
            match (&self.filter, &self.transform) {
                (None, None) => return (pass(), None),
                // Ingest writes `type` first, so a type filter mostly needs no parse.
                (Some(filter), None) if filter.types_only() => {
                    if let Some(kind) = leading_type(message) {
                        if filter.type_allowed(MessageType::parse(kind)) {
                            return (pass(), None);
                        }
                        return (Decision::Skip(Skip::Type), None);
                    }
                }
                _ => {}
            }
        }
        let Ok(text) = std::str::from_utf8(message) else {
            return (pass(), None);
        };
        match &self.transform {
            None => {
                let Some(object) = serde_json::from_str::<&RawValue>(text)
                    .ok()
                    .and_then(RawObject::parse)
                else {
                    return (pass(), None);
                };
                let view = View::new(|key| object.get(key));
                let decision = match self.check(&view) {
                    Some(skip) => Decision::Skip(skip),
                    None => pass(),
                };
                (decision, Some(view.user_key()))
            }
            Some(transform) => {
                let Some(mut fields) = Fields::parse(text) else {
                    return (pass(), None);
                };
                let view = View::new(|key| fields.raw(key));
                // Taken before the edits: `drop_fields` may remove the ids it is made of.
                let user = view.user_key();
                if let Some(skip) = self.check(&view) {
                    return (Decision::Skip(skip), Some(user));
                }
                if !transform.apply(&mut fields) {
                    return (pass(), Some(user));
                }
                let mut out = Vec::with_capacity(message.len());
                fields.write(&mut out);
                (Decision::Send(Cow::Owned(out)), Some(user))
            }
        }
    }

    /// False when the message has no `integrations` with anything in it: no mention, or
    /// every mention is `"integrations":{}`, as real clients send by default. Saves
    /// parsing nearly every message.
    fn may_switch_off(&self, message: &[u8]) -> bool {
        const EMPTY: &[u8] = b":{}";
        if !self.honour_integrations {
            return false;
        }
        self.integrations.find_iter(message).any(|at| {
            let after = at + b"\"integrations\"".len();
            message.get(after..after + EMPTY.len()) != Some(EMPTY)
        })
    }

    fn check(&self, view: &View<'_>) -> Option<Skip> {
        if let Some(skip) = self.filter.as_ref().and_then(|f| f.check(view)) {
            return Some(skip);
        }
        if !self.consent.is_empty() && !self.consented(view) {
            return Some(Skip::Consent);
        }
        if self.honour_integrations && self.switched_off(view) {
            return Some(Skip::Integrations);
        }
        match self.sample_below {
            Some(below) if !view.sampled_in(below) => Some(Skip::Sampled),
            _ => None,
        }
    }

    /// Whether the message's `integrations` turn this destination off.
    fn switched_off(&self, view: &View<'_>) -> bool {
        let Some(integrations) = view.integrations.and_then(RawObject::parse) else {
            return false;
        };
        let (mut by_name, mut by_kind, mut all) = (None, None, None);
        for (key, value) in integrations.iter() {
            let on = match value.get() {
                "false" => false,
                "true" => true,
                v if v.starts_with('{') => true,
                // null, strings, numbers: not a switch Segment knows; ignored.
                _ => continue,
            };
            if key.eq_ignore_ascii_case(&self.name) {
                by_name = Some(on);
            } else if key.eq_ignore_ascii_case(self.kind) {
                by_kind = Some(on);
            } else if key.eq_ignore_ascii_case("all") {
                all = Some(on);
            }
        }
        by_name.or(by_kind).or(all) == Some(false)
    }
}

impl Route {
    /// Whether the message's consent, if it states any, allows every category this
    /// destination needs.
    fn consented(&self, view: &View<'_>) -> bool {
        let preferences = view
            .context
            .and_then(RawObject::parse)
            .and_then(|context| context.get("consent").and_then(RawObject::parse))
            .and_then(|consent| {
                consent
                    .get("categoryPreferences")
                    .and_then(RawObject::parse)
            });
        let Some(preferences) = preferences else {
            return true;
        };
        self.consent.iter().all(|category| {
            preferences
                .iter()
                .any(|(key, value)| key == category.as_str() && value.get() == "true")
        })
    }
}

/// The type of a message as ingest writes it: `{"type":"track",…`.
fn leading_type(message: &[u8]) -> Option<&str> {
    let rest = message.strip_prefix(b"{\"type\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests;
