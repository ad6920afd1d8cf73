//! The per-destination overrides of the Segment → Klaviyo mapping (the `mapping` table of a
//! destination's config). Every key is optional; the defaults are the table in
//! `shared/docs/target-format.md`.
//!
//! ```toml
//! [destinations.mapping]
//! # Segment types sent; the others are skipped and counted. alias cannot be listed:
//! # Klaviyo has no equivalent.
//! types = ["track", "page", "screen", "identify", "group"]
//! # Per track event name: the metric to send it as, `false` to drop it, `true` to keep it.
//! events = { "Order Completed" = "Placed Order", "Debug" = false }
//! # Event properties tried in order for the event's value: the first JSON number wins.
//! value_properties = ["revenue", "total", "value"]
//! # The same for order events (`Checkout Started`, `Order Completed`, … as sent): an
//! # order's value is its total, with shipping and tax.
//! order_value_properties = ["total", "revenue", "value"]
//! page_metric = "Viewed Page"
//! screen_metric = "Viewed Screen"
//! # One extra event per product of this Segment event (matched before any rename).
//! ordered_products = { enabled = true, order_event = "Order Completed", metric = "Ordered Product" }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::limits;

/// How Segment messages become Klaviyo events and profiles for one destination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mapping {
    /// Segment types sent; default all but alias.
    pub types: Vec<SentType>,
    /// Per track event name: rename, drop, or keep. Unlisted events keep their name.
    pub events: BTreeMap<String, EventRule>,
    /// Event properties tried in order for `value`; default `revenue`, `total`, `value`.
    pub value_properties: Vec<String>,
    /// The same for the Segment order events (`names::ORDER_EVENTS`); default `total`,
    /// `revenue`, `value`.
    pub order_value_properties: Vec<String>,
    /// Metric of page calls; default `Viewed Page`.
    pub page_metric: MetricName,
    /// Metric of screen calls; default `Viewed Screen`.
    pub screen_metric: MetricName,
    /// The per-product events of an order.
    pub ordered_products: OrderedProducts,
}

impl Default for Mapping {
    fn default() -> Self {
        Mapping {
            types: vec![
                SentType::Track,
                SentType::Page,
                SentType::Screen,
                SentType::Identify,
                SentType::Group,
            ],
            events: BTreeMap::new(),
            value_properties: ["revenue", "total", "value"].map(String::from).to_vec(),
            order_value_properties: ["total", "revenue", "value"].map(String::from).to_vec(),
            page_metric: MetricName("Viewed Page".to_string()),
            screen_metric: MetricName("Viewed Screen".to_string()),
            ordered_products: OrderedProducts::default(),
        }
    }
}

impl Mapping {
    pub fn sends(&self, kind: SentType) -> bool {
        self.types.contains(&kind)
    }

    /// The metric a track event goes out as; `None` when the mapping drops it.
    pub fn metric_for<'a>(&'a self, event: &'a str) -> Option<&'a str> {
        match self.events.get(event) {
            None | Some(EventRule::Keep) => Some(event),
            Some(EventRule::Rename(metric)) => Some(metric.as_str()),
            Some(EventRule::Drop) => None,
        }
    }
}

/// The Segment types Klaviyo has an equivalent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SentType {
    Track,
    Page,
    Screen,
    Identify,
    Group,
}

/// What to do with one track event name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventRule {
    /// `true`: send under its own name (the default; allowed for explicitness).
    Keep,
    /// A string: send under this metric name.
    Rename(MetricName),
    /// `false`: do not send (skipped and counted), nor its ordered products.
    Drop,
}

impl<'de> Deserialize<'de> for EventRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl Visitor<'_> for RuleVisitor {
            type Value = EventRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a metric name, or false to drop the event")
            }
            fn visit_bool<E: de::Error>(self, keep: bool) -> Result<EventRule, E> {
                Ok(if keep {
                    EventRule::Keep
                } else {
                    EventRule::Drop
                })
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<EventRule, E> {
                MetricName::try_from(name.to_string())
                    .map(EventRule::Rename)
                    .map_err(E::custom)
            }
        }
        deserializer.deserialize_any(RuleVisitor)
    }
}

/// The per-product events of an order (`Ordered Product`, one per `properties.products[]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderedProducts {
    /// Default true.
    pub enabled: bool,
    /// The Segment event (before renaming) whose products are sent; default `Order Completed`.
    pub order_event: String,
    /// Default `Ordered Product`.
    pub metric: MetricName,
}

impl Default for OrderedProducts {
    fn default() -> Self {
        OrderedProducts {
            enabled: true,
            order_event: "Order Completed".to_string(),
            metric: MetricName("Ordered Product".to_string()),
        }
    }
}

/// A metric name every supported revision accepts, checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MetricName(String);

impl MetricName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MetricName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        let max = limits::V2023_01_24
            .max_metric_name_chars
            .min(limits::CURRENT.max_metric_name_chars);
        let chars = name.chars().count();
        if chars == 0 || chars > max {
            return Err(format!(
                "a metric name must be 1 to {max} characters; {name:?} has {chars}"
            ));
        }
        Ok(MetricName(name))
    }
}
