//! Klaviyo's standard ecommerce metric names (`ecommerce_names`, on by default) and the
//! destination's `metric_names` table, folded into a mapping's per-event rules once, when
//! the destination is built, so translation looks a name up in one table.
//!
//! Klaviyo's CLV and benchmarks count only its standard names (`Placed Order`, …); Segment's
//! ecommerce spec names the same events differently (`Order Completed`, …).

use std::collections::BTreeMap;

use super::mapping::{EventRule, Mapping, MetricName};

/// Segment ecommerce spec event → Klaviyo's standard metric.
pub const ECOMMERCE_NAMES: [(&str, &str); 6] = [
    ("Product Viewed", "Viewed Product"),
    ("Product Added", "Added to Cart"),
    ("Checkout Started", "Started Checkout"),
    ("Order Completed", "Placed Order"),
    ("Order Refunded", "Refunded Order"),
    ("Order Cancelled", "Cancelled Order"),
];

/// Segment events whose value is an order's (`Mapping::order_value_properties`): the spec
/// gives them `total` (with shipping and tax) beside `revenue` (without).
pub const ORDER_EVENTS: [&str; 5] = [
    "Checkout Started",
    "Order Updated",
    "Order Completed",
    "Order Refunded",
    "Order Cancelled",
];

/// `mapping` with `metric_names` and, when `ecommerce` is on, the standard names added as
/// renames. A rule `mapping.events` already has for an event wins.
pub fn with_names(
    mut mapping: Mapping,
    ecommerce: bool,
    metric_names: &BTreeMap<String, MetricName>,
) -> Mapping {
    for (event, metric) in metric_names {
        mapping
            .events
            .entry(event.clone())
            .or_insert_with(|| EventRule::Rename(metric.clone()));
    }
    if ecommerce {
        for (event, metric) in ECOMMERCE_NAMES {
            mapping.events.entry(event.to_string()).or_insert_with(|| {
                EventRule::Rename(MetricName::try_from(metric.to_string()).expect("a short name"))
            });
        }
    }
    mapping
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pairs: &[(&str, &str)]) -> BTreeMap<String, MetricName> {
        pairs
            .iter()
            .map(|(old, new)| {
                (
                    old.to_string(),
                    MetricName::try_from(new.to_string()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn ecommerce_events_take_klaviyos_standard_names() {
        let mapping = with_names(Mapping::default(), true, &BTreeMap::new());
        for (event, metric) in ECOMMERCE_NAMES {
            assert_eq!(mapping.metric_for(event), Some(metric), "{event}");
        }
        assert_eq!(mapping.metric_for("Signed Up"), Some("Signed Up"));
    }

    #[test]
    fn ecommerce_names_false_keeps_names_as_sent() {
        let mapping = with_names(Mapping::default(), false, &BTreeMap::new());
        assert_eq!(mapping, Mapping::default());
        assert_eq!(
            mapping.metric_for("Order Completed"),
            Some("Order Completed")
        );
    }

    #[test]
    fn metric_names_override_and_extend_the_standard_names() {
        let table = names(&[("Order Completed", "Purchase"), ("Signed Up", "Registered")]);
        let mapping = with_names(Mapping::default(), true, &table);
        assert_eq!(mapping.metric_for("Order Completed"), Some("Purchase"));
        assert_eq!(mapping.metric_for("Signed Up"), Some("Registered"));
        assert_eq!(mapping.metric_for("Product Added"), Some("Added to Cart"));
        let mapping = with_names(Mapping::default(), false, &table);
        assert_eq!(mapping.metric_for("Signed Up"), Some("Registered"));
        assert_eq!(mapping.metric_for("Product Added"), Some("Product Added"));
    }

    #[test]
    fn a_rule_of_mapping_events_wins_over_the_standard_name() {
        let mut mapping = Mapping::default();
        mapping
            .events
            .insert("Order Completed".into(), EventRule::Keep);
        mapping
            .events
            .insert("Product Viewed".into(), EventRule::Drop);
        let mapping = with_names(mapping, true, &BTreeMap::new());
        assert_eq!(
            mapping.metric_for("Order Completed"),
            Some("Order Completed")
        );
        assert_eq!(mapping.metric_for("Product Viewed"), None);
        assert_eq!(mapping.metric_for("Order Refunded"), Some("Refunded Order"));
    }
}
