//! A stored Segment message → Klaviyo's profile / metric / properties event.
//!
//! Pure code for the Klaviyo destination: it hands in a message as stored (the enriched
//! Segment JSON) and gets back what to send, or why not. What Klaviyo would refuse is caught
//! here, before any request (`limits`), so a dead letter names the reason instead of a 400.
//! The types below know no API revision; `body` writes them for the one configured.
//!
//! The rules, from `shared/docs/target-format.md` (defaults; `Mapping` overrides them):
//!
//! | Segment | result |
//! |---|---|
//! | track | event: metric = `event` (Segment ecommerce names → Klaviyo's standard ones, `names`), properties = `properties`, value = first JSON number of `properties.revenue` / `total` / `value` (order events: `total` / `revenue` / `value`), value_currency = `properties.currency` when there is a value |
//! | page, screen | event `Viewed Page` / `Viewed Screen`; properties = `properties` + message `name`, `category` (the message's win) |
//! | identify | profile upsert from `traits` |
//! | group | profile upsert: the user's profile with `organization` = group `traits.name` (other group traits describe the company, not the person, and are not copied); no name → skipped |
//! | alias | skipped (`alias_not_supported`) |
//! | track `Order Completed` | the order event (`Placed Order` by default), plus one `Ordered Product` per object in `properties.products` |
//!
//! Every event: time = the message's corrected `timestamp` (else `receivedAt`), cut to the
//! second; unique_id = `messageId`. Profiles: see `profile`. `Ordered Product` events:
//! properties = the product object (+ `order_id` when the product lacks one); value =
//! `price` × `quantity` (quantity 1 when absent); value_currency (only with a value) = the
//! product's `currency`, else the order's; unique_id = `<order>_<product>` where order is `order_id` / `orderId`
//! (else the messageId) and product is `product_id` / `productId`, else `sku`, else the
//! product's index in the array; a key already used in the same order gets `_<index>`
//! appended, so bulk jobs (which fail whole on a repeated unique_id) stay valid. Entries of
//! `products` that are not objects make no event; they still go in the order event.
//! A message is translated whole: if one of its events breaks a limit, none is sent.

pub mod body;
pub mod limits;
pub mod mapping;
pub mod names;
mod profile;

#[cfg(test)]
mod tests;

use std::collections::HashSet;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::message::MessageType;
use crate::timestamp;
pub use limits::Limits;
pub use mapping::{EventRule, Mapping, MetricName, OrderedProducts, SentType};
pub(super) use profile::build as build_profile;

/// One Klaviyo event: who (`profile`), what (`metric`), details (`properties`).
#[derive(Debug, Clone, PartialEq)]
pub struct KlaviyoEvent {
    pub profile: Profile,
    pub metric: String,
    pub properties: Map<String, Value>,
    /// Whole seconds (Klaviyo truncates; we do it first so what is sent is what is kept).
    pub time: DateTime<Utc>,
    pub value: Option<f64>,
    /// ISO 4217 code; only the current revisions have a field for it.
    pub value_currency: Option<String>,
    /// 1..=255 characters: Klaviyo keeps the first event per (profile, metric, unique_id).
    pub unique_id: String,
}

/// A person as Klaviyo stores them, in the current revisions' terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub email: Option<String>,
    /// E.164 (`+` and digits).
    pub phone_number: Option<String>,
    /// The Segment `userId`.
    pub external_id: Option<String>,
    /// The Segment `anonymousId`.
    pub anonymous_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub organization: Option<String>,
    pub title: Option<String>,
    /// URL of a picture (Segment's `avatar`).
    pub image: Option<String>,
    pub location: Option<Location>,
    /// Custom profile properties: the traits not mapped to a field above.
    pub properties: Map<String, Value>,
}

/// A postal address (Segment's `traits.address`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    pub address1: Option<String>,
    pub city: Option<String>,
    pub region: Option<String>,
    pub zip: Option<String>,
    pub country: Option<String>,
}

/// A profile create-or-update without an event (identify, group).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileUpsert {
    pub profile: Profile,
}

/// What one stored message becomes for Klaviyo.
#[derive(Debug, Clone, PartialEq)]
pub enum Translation {
    /// Events to send (track, page, screen; several for an order).
    Events(Vec<KlaviyoEvent>),
    /// A profile upsert (identify, group); boxed, a profile being ~15× an event list's size.
    Profile(Box<ProfileUpsert>),
    /// Not for this destination by design (alias, or turned off in the mapping): count it,
    /// it is not an error.
    Skip { reason: &'static str },
    /// Cannot go: dead-letter it with this reason (`code: detail`).
    Reject { reason: String },
}

/// The Klaviyo API revision, as far as translation cares: body shape, limits, identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revision {
    /// `2023-01-24`: flat `$`-keyed profile, `metric: {name}`, 300 properties, time after 2000.
    V2023_01_24,
    /// `2023-02-22` and later: nested JSON:API bodies, 400 properties, time after 1990.
    Current,
}

/// The `revision` header value is not one whose body shape we know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported Klaviyo revision {0:?}: use 2023-01-24 or a date from 2023-02-22 on (YYYY-MM-DD[.suffix])")]
pub struct UnsupportedRevision(pub String);

impl Revision {
    /// The newest revision at the time of writing, the one Klaviyo's official SDKs send.
    pub const DEFAULT_HEADER: &'static str = "2026-10-15";

    /// Reads a `revision` header value (`YYYY-MM-DD[.suffix]`).
    pub fn from_header(header: &str) -> Result<Revision, UnsupportedRevision> {
        let date = header.split('.').next().unwrap_or_default();
        let unsupported = || UnsupportedRevision(header.to_string());
        let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| unsupported())?;
        if date == NaiveDate::from_ymd_opt(2023, 1, 24).expect("valid date") {
            Ok(Revision::V2023_01_24)
        } else if date >= NaiveDate::from_ymd_opt(2023, 2, 22).expect("valid date") {
            Ok(Revision::Current)
        } else {
            Err(unsupported())
        }
    }

    pub fn limits(self) -> &'static Limits {
        match self {
            Revision::V2023_01_24 => &limits::V2023_01_24,
            Revision::Current => &limits::CURRENT,
        }
    }
}

/// Translates one stored message for a destination with `mapping` at `revision`; `now` is
/// the send time, against which "at most a year in the future" is judged.
pub fn translate(
    message_json: &[u8],
    mapping: &Mapping,
    revision: Revision,
    now: DateTime<Utc>,
) -> Translation {
    translate_message(message_json, mapping, revision, now)
        .unwrap_or_else(|reason| Translation::Reject { reason })
}

/// The fields translation reads; the rest of the stored message is skipped unparsed.
/// Ingest already checked ids are strings and properties/traits/context objects.
#[derive(Deserialize)]
struct StoredMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "anonymousId")]
    anonymous_id: Option<String>,
    /// Checked by ingest for track only, hence untyped here.
    event: Option<Value>,
    name: Option<Value>,
    category: Option<Value>,
    timestamp: Option<String>,
    #[serde(rename = "receivedAt")]
    received_at: Option<String>,
    properties: Option<Map<String, Value>>,
    traits: Option<Map<String, Value>>,
    context: Option<Context>,
}

#[derive(Deserialize)]
struct Context {
    /// The user's traits on non-identify calls; ingest does not check their type.
    traits: Option<Value>,
}

fn translate_message(
    message_json: &[u8],
    mapping: &Mapping,
    revision: Revision,
    now: DateTime<Utc>,
) -> Result<Translation, String> {
    let mut message: StoredMessage =
        serde_json::from_slice(message_json).map_err(|e| format!("invalid_message: {e}"))?;
    let kind = MessageType::parse(&message.kind)
        .ok_or_else(|| format!("invalid_message: unknown type {:?}", message.kind))?;
    let sent_type = match kind {
        MessageType::Alias => {
            return Ok(Translation::Skip {
                reason: "alias_not_supported",
            })
        }
        MessageType::Track => SentType::Track,
        MessageType::Page => SentType::Page,
        MessageType::Screen => SentType::Screen,
        MessageType::Identify => SentType::Identify,
        MessageType::Group => SentType::Group,
    };
    if !mapping.sends(sent_type) {
        return Ok(Translation::Skip {
            reason: "type_not_sent",
        });
    }
    let user_id = message.user_id.take().filter(|s| !s.is_empty());
    let anonymous_id = message.anonymous_id.take().filter(|s| !s.is_empty());
    let context_traits = match message.context.take().and_then(|c| c.traits) {
        Some(Value::Object(traits)) => Some(traits),
        _ => None,
    };
    match kind {
        MessageType::Identify => upsert(profile::build(user_id, anonymous_id, message.traits)),
        MessageType::Group => {
            let organization = message
                .traits
                .as_ref()
                .and_then(|t| t.get("name"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let Some(organization) = organization else {
                return Ok(Translation::Skip {
                    reason: "group_without_name",
                });
            };
            let mut profile = profile::build(user_id, anonymous_id, context_traits);
            profile.organization = Some(organization.to_string());
            upsert(profile)
        }
        _ => {
            let profile = profile::build(user_id, anonymous_id, context_traits);
            to_events(kind, message, profile, mapping, revision, now)
        }
    }
}

/// A track, page or screen call: its event, an order's product events, all within limits.
fn to_events(
    kind: MessageType,
    message: StoredMessage,
    profile: Profile,
    mapping: &Mapping,
    revision: Revision,
    now: DateTime<Utc>,
) -> Result<Translation, String> {
    let mut properties = message.properties.unwrap_or_default();
    let mut value = None;
    let mut value_currency = None;
    let mut products = None;
    let metric = if kind == MessageType::Track {
        let event = match &message.event {
            Some(Value::String(e)) if !e.is_empty() => e.as_str(),
            _ => return Err("invalid_message: track without event".to_string()),
        };
        let Some(metric) = mapping.metric_for(event) else {
            return Ok(Translation::Skip {
                reason: "event_not_sent",
            });
        };
        let value_properties = if names::ORDER_EVENTS.contains(&event) {
            &mapping.order_value_properties
        } else {
            &mapping.value_properties
        };
        value = value_properties
            .iter()
            .find_map(|key| properties.get(key).and_then(Value::as_f64));
        // A currency says what a value is in: Klaviyo takes it only beside one.
        value_currency = value.and_then(|_| currency(&properties));
        let ordered = &mapping.ordered_products;
        if ordered.enabled && event == ordered.order_event {
            products = Some(ordered.metric.as_str());
        }
        metric.to_string()
    } else {
        for (key, value) in [("name", message.name), ("category", message.category)] {
            if let Some(value @ Value::String(_)) = value {
                properties.insert(key.to_string(), value);
            }
        }
        let metric = match kind {
            MessageType::Page => &mapping.page_metric,
            _ => &mapping.screen_metric,
        };
        metric.as_str().to_string()
    };
    if !profile.identifies_event(revision) {
        return Err("no_profile_identifier".to_string());
    }
    let time = event_time(message.timestamp.as_deref(), message.received_at.as_deref())?;
    let unique_id = message
        .message_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "invalid_message: no messageId".to_string())?;
    let products = match products {
        Some(metric) => ordered_products(&properties, &profile, time, &unique_id, metric),
        None => Vec::new(),
    };
    let mut events = Vec::with_capacity(1 + products.len());
    events.push(KlaviyoEvent {
        profile,
        metric,
        properties,
        time,
        value,
        value_currency,
        unique_id,
    });
    events.extend(products);
    let limits = revision.limits();
    for (i, event) in events.iter_mut().enumerate() {
        limits.apply(event, now).map_err(|reason| match i {
            0 => reason,
            _ => format!("{reason} (in {:?} event {i})", event.metric),
        })?;
    }
    Ok(Translation::Events(events))
}

fn upsert(profile: Profile) -> Result<Translation, String> {
    if !profile.identifies_upsert() {
        return Err("no_profile_identifier".to_string());
    }
    Ok(Translation::Profile(Box::new(ProfileUpsert { profile })))
}

/// The corrected `timestamp` fanout wrote at ingest; `receivedAt` if it is missing.
fn event_time(timestamp: Option<&str>, received_at: Option<&str>) -> Result<DateTime<Utc>, String> {
    let (key, text) = match (timestamp, received_at) {
        (Some(t), _) => ("timestamp", t),
        (None, Some(r)) => ("receivedAt", r),
        (None, None) => return Err("invalid_message: no timestamp".to_string()),
    };
    timestamp::parse(text)
        .ok_or_else(|| format!("invalid_message: {key} {text:?} is not a date-time"))
}

fn currency(properties: &Map<String, Value>) -> Option<String> {
    properties
        .get("currency")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// A string id, or a number written as JSON writes it.
fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One `Ordered Product` event per object in `properties.products` (rules in the module doc).
fn ordered_products(
    order_properties: &Map<String, Value>,
    profile: &Profile,
    time: DateTime<Utc>,
    message_id: &str,
    metric: &str,
) -> Vec<KlaviyoEvent> {
    let Some(Value::Array(products)) = order_properties.get("products") else {
        return Vec::new();
    };
    let order_id = id_text(order_properties.get("order_id"))
        .or_else(|| id_text(order_properties.get("orderId")));
    let order_key = order_id.as_deref().unwrap_or(message_id);
    let order_currency = currency(order_properties);
    let mut used = HashSet::with_capacity(products.len());
    let mut events = Vec::with_capacity(products.len());
    for (index, product) in products.iter().enumerate() {
        let Value::Object(product) = product else {
            continue;
        };
        let product_key = id_text(product.get("product_id"))
            .or_else(|| id_text(product.get("productId")))
            .or_else(|| id_text(product.get("sku")))
            .unwrap_or_else(|| index.to_string());
        let mut unique_id = format!("{order_key}_{product_key}");
        while used.contains(&unique_id) {
            unique_id = format!("{unique_id}_{index}");
        }
        used.insert(unique_id.clone());
        let value = product.get("price").and_then(Value::as_f64).map(|price| {
            let quantity = product
                .get("quantity")
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
            price * quantity
        });
        let mut properties = product.clone();
        if let Some(order_id) = &order_id {
            properties
                .entry("order_id")
                .or_insert_with(|| Value::String(order_id.clone()));
        }
        events.push(KlaviyoEvent {
            profile: profile.clone(),
            metric: metric.to_string(),
            value_currency: value
                .and_then(|_| currency(&properties).or_else(|| order_currency.clone())),
            properties,
            time,
            value,
            unique_id,
        });
    }
    events
}
