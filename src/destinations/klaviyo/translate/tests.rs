//! Table tests: one per mapping row, per profile rule and per limit, each with the body
//! Klaviyo would receive written out.

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::body::{write_bulk_job, write_event, write_profile_import};
use super::*;

/// The send time of every test.
fn now() -> DateTime<Utc> {
    "2024-06-01T00:00:00Z".parse().unwrap()
}

/// A stored message: `fields` over the ones fanout always writes.
fn stored(fields: Value) -> Vec<u8> {
    let mut message = json!({
        "messageId": "m-1",
        "timestamp": "2024-01-02T03:04:05.678Z",
        "receivedAt": "2024-01-02T03:04:06.000Z",
    });
    let Value::Object(fields) = fields else {
        panic!("fields must be an object")
    };
    message.as_object_mut().unwrap().extend(fields);
    serde_json::to_vec(&message).unwrap()
}

fn run(fields: Value) -> Translation {
    run_with(fields, &Mapping::default(), Revision::Current)
}

fn run_with(fields: Value, mapping: &Mapping, revision: Revision) -> Translation {
    translate(&stored(fields), mapping, revision, now())
}

fn events(translation: Translation) -> Vec<KlaviyoEvent> {
    match translation {
        Translation::Events(events) => events,
        other => panic!("expected events, got {other:?}"),
    }
}

fn one_event(translation: Translation) -> KlaviyoEvent {
    let mut events = events(translation);
    assert_eq!(events.len(), 1, "{events:?}");
    events.pop().unwrap()
}

fn reject_reason(translation: Translation) -> String {
    match translation {
        Translation::Reject { reason } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn event_body(event: &KlaviyoEvent, revision: Revision) -> Vec<u8> {
    let mut out = Vec::new();
    write_event(&mut out, event, revision);
    out
}

fn upsert_body(translation: Translation) -> Vec<u8> {
    let Translation::Profile(upsert) = translation else {
        panic!("expected a profile upsert, got {translation:?}")
    };
    let mut out = Vec::new();
    write_profile_import(&mut out, &upsert);
    out
}

/// Compares JSON as values (property maps are sorted, key order is not the point here).
#[track_caller]
fn assert_json(actual: &[u8], expected: &str) {
    let actual: Value = serde_json::from_slice(actual).expect("body is JSON");
    let expected: Value = serde_json::from_str(expected).expect("expected is JSON");
    assert_eq!(actual, expected);
}

// ---- The mapping table ----

#[test]
fn track_becomes_an_event() {
    let event = one_event(run(json!({
        "type": "track",
        "userId": "user-1",
        "event": "Signed Up",
        "properties": {"plan": "pro", "revenue": 42.5, "currency": "USD"},
        "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python"}},
    })));
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{
            "properties":{"currency":"USD","plan":"pro","revenue":42.5},
            "metric":{"data":{"type":"metric","attributes":{"name":"Signed Up"}}},
            "profile":{"data":{"type":"profile","attributes":{"external_id":"user-1"}}},
            "time":"2024-01-02T03:04:05+00:00","value":42.5,"value_currency":"USD",
            "unique_id":"m-1"}}}"#,
    );
}

#[test]
fn track_value_is_the_first_numeric_of_revenue_total_value() {
    let value_of = |properties: Value, mapping: &Mapping| {
        let fields =
            json!({"type": "track", "userId": "u", "event": "E", "properties": properties});
        one_event(run_with(fields, mapping, Revision::Current)).value
    };
    let default = Mapping::default();
    assert_eq!(
        value_of(json!({"revenue": 1, "total": 2, "value": 3}), &default),
        Some(1.0)
    );
    assert_eq!(
        value_of(json!({"revenue": "12", "total": 30, "value": 5}), &default),
        Some(30.0)
    );
    assert_eq!(
        value_of(json!({"revenue": null, "value": -4.5}), &default),
        Some(-4.5)
    );
    assert_eq!(
        value_of(json!({"revenue": "12", "price": 9}), &default),
        None
    );
    let amount = Mapping {
        value_properties: vec!["amount".into()],
        ..Mapping::default()
    };
    assert_eq!(
        value_of(json!({"revenue": 1, "amount": 7}), &amount),
        Some(7.0)
    );

    let event = one_event(run(json!({"type": "track", "userId": "u", "event": "E"})));
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{"properties":{},
            "metric":{"data":{"type":"metric","attributes":{"name":"E"}}},
            "profile":{"data":{"type":"profile","attributes":{"external_id":"u"}}},
            "time":"2024-01-02T03:04:05+00:00","unique_id":"m-1"}}}"#,
    );
}

#[test]
fn an_orders_value_is_its_total_before_revenue() {
    let value_of = |event: &str, properties: Value| {
        let fields =
            json!({"type": "track", "userId": "u", "event": event, "properties": properties});
        events(run(fields))[0].value
    };
    let order = json!({"revenue": 20, "shipping": 4, "tax": 3, "total": 27});
    for event in names::ORDER_EVENTS {
        assert_eq!(value_of(event, order.clone()), Some(27.0), "{event}");
    }
    assert_eq!(
        value_of("Order Completed", json!({"revenue": 20})),
        Some(20.0)
    );
    // Other events keep revenue first.
    assert_eq!(value_of("Signed Up", order), Some(20.0));
    let mapping: Mapping = toml::from_str(r#"order_value_properties = ["revenue"]"#).unwrap();
    let fields = json!({"type": "track", "userId": "u", "event": "Order Completed",
                        "properties": {"revenue": 20, "total": 27}});
    assert_eq!(
        events(run_with(fields, &mapping, Revision::Current))[0].value,
        Some(20.0)
    );
}

#[test]
fn a_currency_goes_only_with_a_value() {
    let event = one_event(run(json!({
        "type": "track", "userId": "u", "event": "Product Viewed",
        "properties": {"currency": "EUR", "price": 9},
    })));
    assert_eq!((event.value, event.value_currency.as_deref()), (None, None));
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{"properties":{"currency":"EUR","price":9},
            "metric":{"data":{"type":"metric","attributes":{"name":"Product Viewed"}}},
            "profile":{"data":{"type":"profile","attributes":{"external_id":"u"}}},
            "time":"2024-01-02T03:04:05+00:00","unique_id":"m-1"}}}"#,
    );
    let event = one_event(run(json!({
        "type": "track", "userId": "u", "event": "Product Viewed",
        "properties": {"currency": "EUR", "value": 9},
    })));
    assert_eq!(
        (event.value, event.value_currency.as_deref()),
        (Some(9.0), Some("EUR"))
    );
}

#[test]
fn page_becomes_viewed_page_with_name_and_category() {
    let event = one_event(run(json!({
        "type": "page",
        "anonymousId": "anon-1",
        "name": "Pricing",
        "category": "Docs",
        "properties": {"url": "https://example.com/pricing", "name": "from properties"},
    })));
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{
            "properties":{"category":"Docs","name":"Pricing","url":"https://example.com/pricing"},
            "metric":{"data":{"type":"metric","attributes":{"name":"Viewed Page"}}},
            "profile":{"data":{"type":"profile","attributes":{"anonymous_id":"anon-1"}}},
            "time":"2024-01-02T03:04:05+00:00","unique_id":"m-1"}}}"#,
    );
}

#[test]
fn screen_becomes_viewed_screen_with_name_and_category() {
    let event = one_event(run(json!({
        "type": "screen",
        "userId": "user-1",
        "name": "Home",
        "properties": {"variant": "b", "revenue": 3},
    })));
    // value and value_currency are track's only.
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{
            "properties":{"name":"Home","revenue":3,"variant":"b"},
            "metric":{"data":{"type":"metric","attributes":{"name":"Viewed Screen"}}},
            "profile":{"data":{"type":"profile","attributes":{"external_id":"user-1"}}},
            "time":"2024-01-02T03:04:05+00:00","unique_id":"m-1"}}}"#,
    );
}

#[test]
fn identify_becomes_a_profile_upsert() {
    let translation = run(json!({
        "type": "identify",
        "userId": "user-1",
        "anonymousId": "anon-1",
        "traits": {
            "email": "ann@example.com",
            "phone": "+1 (555) 555-0100",
            "firstName": "Ann",
            "last_name": "Lee",
            "title": "CTO",
            "avatar": "https://example.com/ann.png",
            "company": {"name": "Acme", "plan": "enterprise"},
            "address": {"street": "1 Main St", "city": "Springfield", "state": "IL",
                        "postalCode": "62701", "country": "US", "unit": "4B"},
            "plan": "pro",
            "logins": 7,
        },
    }));
    assert_json(
        &upsert_body(translation),
        r#"{"data":{"type":"profile","attributes":{
            "email":"ann@example.com","phone_number":"+15555550100","external_id":"user-1",
            "first_name":"Ann","last_name":"Lee","organization":"Acme","title":"CTO",
            "image":"https://example.com/ann.png",
            "location":{"address1":"1 Main St","city":"Springfield","region":"IL",
                        "zip":"62701","country":"US"},
            "properties":{"address":{"unit":"4B"},"company":{"plan":"enterprise"},
                          "logins":7,"plan":"pro"}}}}"#,
    );
}

#[test]
fn group_becomes_an_upsert_with_the_organization() {
    let translation = run(json!({
        "type": "group",
        "userId": "user-1",
        "groupId": "g-1",
        "traits": {"name": "Acme", "email": "billing@acme.example", "employees": 50},
        "context": {"traits": {"email": "ann@example.com"}},
    }));
    assert_json(
        &upsert_body(translation),
        r#"{"data":{"type":"profile","attributes":{
            "email":"ann@example.com","external_id":"user-1","organization":"Acme"}}}"#,
    );
    let nameless =
        run(json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"plan": "x"}}));
    assert_eq!(
        nameless,
        Translation::Skip {
            reason: "group_without_name"
        }
    );
}

#[test]
fn alias_is_skipped() {
    let translation = run(json!({"type": "alias", "userId": "u", "previousId": "p"}));
    assert_eq!(
        translation,
        Translation::Skip {
            reason: "alias_not_supported"
        }
    );
}

fn order_fields() -> Value {
    json!({
        "type": "track",
        "userId": "user-1",
        "event": "Order Completed",
        "properties": {
            "order_id": "o-7",
            "total": 27,
            "currency": "EUR",
            "products": [
                {"product_id": "p1", "sku": "s1", "name": "Mug", "price": 10, "quantity": 2},
                {"sku": "s2", "price": 5.5, "currency": "USD"},
                {"name": "Gift wrap"},
                {"productId": "p1", "price": 1},
                "not a product",
            ],
        },
    })
}

#[test]
fn order_completed_adds_one_ordered_product_per_product() {
    let events = events(run(order_fields()));
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.metric.as_str(),
                e.unique_id.as_str(),
                e.value,
                e.value_currency.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("Order Completed", "m-1", Some(27.0), Some("EUR")),
            ("Ordered Product", "o-7_p1", Some(20.0), Some("EUR")),
            ("Ordered Product", "o-7_s2", Some(5.5), Some("USD")),
            // No price, no value: no currency either.
            ("Ordered Product", "o-7_2", None, None),
            // product_id repeated in the same order: the index keeps it unique.
            ("Ordered Product", "o-7_p1_3", Some(1.0), Some("EUR")),
        ]
    );
    assert_json(
        &event_body(&events[1], Revision::Current),
        r#"{"data":{"type":"event","attributes":{
            "properties":{"name":"Mug","order_id":"o-7","price":10,"product_id":"p1",
                          "quantity":2,"sku":"s1"},
            "metric":{"data":{"type":"metric","attributes":{"name":"Ordered Product"}}},
            "profile":{"data":{"type":"profile","attributes":{"external_id":"user-1"}}},
            "time":"2024-01-02T03:04:05+00:00","value":20.0,"value_currency":"EUR",
            "unique_id":"o-7_p1"}}}"#,
    );
    // The order event keeps the whole products array, the non-object entry included.
    assert_eq!(
        events[0].properties["products"].as_array().unwrap().len(),
        5
    );
}

#[test]
fn order_without_order_id_keys_products_by_message_id() {
    let events = events(run(json!({
        "type": "track", "userId": "u", "event": "Order Completed",
        "properties": {"orderId": 981, "products": [{"sku": "a"}]},
    })));
    assert_eq!(events[1].unique_id, "981_a");
    let events = super::tests::events(run(json!({
        "type": "track", "userId": "u", "event": "Order Completed",
        "properties": {"products": [{"sku": "a"}]},
    })));
    assert_eq!(events[1].unique_id, "m-1_a");
    assert!(!events[1].properties.contains_key("order_id"));
}

#[test]
fn order_completed_rename_and_products_switch() {
    let mapping: Mapping = toml::from_str(
        r#"
        events = { "Order Completed" = "Placed Order" }
        ordered_products = { metric = "Bought Item" }
        "#,
    )
    .unwrap();
    let metrics: Vec<_> = events(run_with(order_fields(), &mapping, Revision::Current))
        .into_iter()
        .map(|e| e.metric)
        .collect();
    assert_eq!(
        metrics,
        [
            "Placed Order",
            "Bought Item",
            "Bought Item",
            "Bought Item",
            "Bought Item"
        ]
    );

    let off: Mapping = toml::from_str("ordered_products = { enabled = false }").unwrap();
    let events = events(run_with(order_fields(), &off, Revision::Current));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].metric, "Order Completed");
}

// ---- Profile rules ----

#[test]
fn event_profile_comes_from_context_traits() {
    let event = one_event(run(json!({
        "type": "track",
        "userId": "user-1",
        "anonymousId": "anon-1",
        "event": "Clicked",
        "traits": {"email": "ignored@example.com"},
        "context": {"traits": {
            "email": " ann@example.com ",
            "first_name": "Ann",
            "lastName": "Lee",
            "company": "Acme",
            "address": {"city": "Paris", "postal_code": "75001", "country": "FR"},
            "age": 41,
        }},
    })));
    assert_json(
        &event_body(&event, Revision::Current),
        r#"{"data":{"type":"event","attributes":{"properties":{},
            "metric":{"data":{"type":"metric","attributes":{"name":"Clicked"}}},
            "profile":{"data":{"type":"profile","attributes":{
                "email":"ann@example.com","external_id":"user-1","anonymous_id":"anon-1",
                "first_name":"Ann","last_name":"Lee","organization":"Acme",
                "location":{"city":"Paris","zip":"75001","country":"FR"},
                "properties":{"age":41}}}},
            "time":"2024-01-02T03:04:05+00:00","unique_id":"m-1"}}}"#,
    );
}

#[test]
fn camel_case_wins_over_snake_case() {
    let translation = run(json!({
        "type": "identify",
        "userId": "u",
        "traits": {"firstName": "Ann", "first_name": "Anne", "lastName": null, "last_name": "Lee",
                   "address": {"postalCode": "1", "postal_code": "2"}},
    }));
    assert_json(
        &upsert_body(translation),
        r#"{"data":{"type":"profile","attributes":{"external_id":"u","first_name":"Ann",
            "last_name":"Lee","location":{"zip":"1"}}}}"#,
    );
}

#[test]
fn unusable_email_and_phone_stay_custom_properties() {
    let translation = run(json!({
        "type": "identify",
        "userId": "u",
        "traits": {"email": "n/a", "phone": "555-0100", "title": 3, "avatar": ""},
    }));
    assert_json(
        &upsert_body(translation),
        r#"{"data":{"type":"profile","attributes":{"external_id":"u",
            "properties":{"email":"n/a","phone":"555-0100","title":3}}}}"#,
    );
}

#[test]
fn no_profile_identifier_is_rejected() {
    // Only an anonymous id: enough for an event in the current revisions…
    let anonymous = json!({"type": "track", "anonymousId": "anon-1", "event": "E"});
    assert!(matches!(run(anonymous.clone()), Translation::Events(_)));
    // …not in the flat 2023-01-24 profile, nor for profile-import.
    let flat = run_with(anonymous, &Mapping::default(), Revision::V2023_01_24);
    assert_eq!(reject_reason(flat), "no_profile_identifier");
    let identify =
        run(json!({"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "x"}}));
    assert_eq!(reject_reason(identify), "no_profile_identifier");
    // An email in the traits identifies the person.
    let identify =
        run(json!({"type": "identify", "anonymousId": "a", "traits": {"email": "a@b.co"}}));
    assert!(matches!(identify, Translation::Profile(_)));
    // Stored ids are never empty, but "" would not identify anyone.
    let empty = run(json!({"type": "track", "userId": "", "anonymousId": null, "event": "E"}));
    assert_eq!(reject_reason(empty), "no_profile_identifier");
}

// ---- Mapping config ----

#[test]
fn mapping_drops_events_and_types() {
    let mapping: Mapping = toml::from_str(
        r#"
        types = ["track", "identify"]
        events = { "Debug" = false, "Signed Up" = true }
        "#,
    )
    .unwrap();
    let track = |event: &str| json!({"type": "track", "userId": "u", "event": event});
    assert_eq!(
        run_with(track("Debug"), &mapping, Revision::Current),
        Translation::Skip {
            reason: "event_not_sent"
        }
    );
    assert_eq!(
        one_event(run_with(track("Signed Up"), &mapping, Revision::Current)).metric,
        "Signed Up"
    );
    for fields in [
        json!({"type": "page", "userId": "u"}),
        json!({"type": "screen", "userId": "u"}),
        json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"name": "A"}}),
    ] {
        assert_eq!(
            run_with(fields, &mapping, Revision::Current),
            Translation::Skip {
                reason: "type_not_sent"
            }
        );
    }
    // A skip comes before the identifier check: nothing to dead-letter.
    let anonymous = json!({"type": "track", "anonymousId": "a", "event": "Debug"});
    assert!(matches!(
        run_with(anonymous, &mapping, Revision::V2023_01_24),
        Translation::Skip { .. }
    ));
}

#[test]
fn mapping_config_example_reads() {
    let mapping: Mapping = toml::from_str(
        r#"
        types = ["track", "page", "screen", "identify", "group"]
        events = { "Order Completed" = "Placed Order", "Debug" = false }
        value_properties = ["revenue", "total", "value"]
        page_metric = "Viewed Page"
        screen_metric = "Viewed Screen"
        ordered_products = { enabled = true, order_event = "Order Completed", metric = "Ordered Product" }
        "#,
    )
    .unwrap();
    let mut expected = Mapping::default();
    expected.events.insert(
        "Order Completed".into(),
        EventRule::Rename(MetricName::try_from("Placed Order".to_string()).unwrap()),
    );
    expected.events.insert("Debug".into(), EventRule::Drop);
    assert_eq!(mapping, expected);
    assert_eq!(toml::from_str::<Mapping>("").unwrap(), Mapping::default());
    assert_eq!(mapping.metric_for("Order Completed"), Some("Placed Order"));
    assert_eq!(mapping.metric_for("Debug"), None);
    assert_eq!(mapping.metric_for("Other"), Some("Other"));
}

#[test]
fn mapping_config_errors_name_the_problem() {
    let error = |text: &str| toml::from_str::<Mapping>(text).unwrap_err().to_string();
    assert!(error(r#"types = ["track", "alias"]"#).contains("unknown variant `alias`"));
    assert!(error("colour = 1").contains("unknown field `colour`"));
    assert!(error("ordered_products = { metrc = \"x\" }").contains("unknown field `metrc`"));
    assert!(error(r#"events = { "A" = "" }"#).contains("1 to 127 characters"));
    let long = format!("events = {{ \"A\" = \"{}\" }}", "x".repeat(128));
    assert!(error(&long).contains("has 128"));
    assert!(error(r#"page_metric = """#).contains("1 to 127 characters"));
    assert!(error(r#"events = { "A" = 3 }"#).contains("a metric name, or false"));
}

// ---- Limits, per revision ----

fn track_with(properties: Value) -> Value {
    json!({"type": "track", "userId": "u", "event": "E", "properties": properties})
}

fn run_both(fields: Value) -> [Translation; 2] {
    [Revision::V2023_01_24, Revision::Current]
        .map(|revision| run_with(fields.clone(), &Mapping::default(), revision))
}

fn numbered_properties(count: usize) -> Value {
    Value::Object((0..count).map(|i| (format!("p{i}"), json!(i))).collect())
}

#[test]
fn limit_metric_name_127_characters() {
    let ok = "é".repeat(127);
    for t in run_both(json!({"type": "track", "userId": "u", "event": ok})) {
        assert!(matches!(t, Translation::Events(_)));
    }
    for t in run_both(json!({"type": "track", "userId": "u", "event": "x".repeat(128)})) {
        assert_eq!(
            reject_reason(t),
            "metric_name_too_long: 128 characters > 127"
        );
    }
}

#[test]
fn limit_properties_300_then_400() {
    let [flat, current] = run_both(track_with(numbered_properties(300)));
    assert!(matches!(flat, Translation::Events(_)));
    assert!(matches!(current, Translation::Events(_)));
    let [flat, current] = run_both(track_with(numbered_properties(301)));
    assert_eq!(reject_reason(flat), "too_many_properties: 301 > 300");
    assert!(matches!(current, Translation::Events(_)));
    let [_, current] = run_both(track_with(numbered_properties(400)));
    assert!(matches!(current, Translation::Events(_)));
    let [flat, current] = run_both(track_with(numbered_properties(412)));
    assert_eq!(reject_reason(flat), "too_many_properties: 412 > 300");
    assert_eq!(reject_reason(current), "too_many_properties: 412 > 400");
}

#[test]
fn limit_string_100_kb() {
    for t in run_both(track_with(json!({"big": "x".repeat(100_000)}))) {
        assert!(matches!(t, Translation::Events(_)));
    }
    for t in run_both(track_with(json!({"a": {"list": [1, "y".repeat(100_001)]}}))) {
        assert_eq!(
            reject_reason(t),
            "string_too_long: properties.a.list[1] is 100001 bytes > 100000"
        );
    }
    let mut key = "k".repeat(100_001);
    let properties = json!({ key.clone(): 1 });
    key.truncate(64);
    for t in run_both(track_with(properties.clone())) {
        assert_eq!(
            reject_reason(t),
            format!("string_too_long: the key properties.{key}… is 100001 bytes > 100000")
        );
    }
}

#[test]
fn limit_array_4000_elements() {
    for t in run_both(track_with(json!({"items": vec![0; 4000]}))) {
        assert!(matches!(t, Translation::Events(_)));
    }
    let properties = json!({"cart": {"lines": [{"tags": vec!["t"; 4001]}]}});
    for t in run_both(track_with(properties)) {
        assert_eq!(
            reject_reason(t),
            "array_too_long: properties.cart.lines[0].tags has 4001 elements > 4000"
        );
    }
}

/// Properties whose deepest container is at `levels` (the properties object being 1).
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({"leaf": true}), |inner, _| json!({ "a": inner }))
}

#[test]
fn limit_depth_10_levels() {
    for t in run_both(track_with(nested(10))) {
        assert!(matches!(t, Translation::Events(_)));
    }
    for t in run_both(track_with(nested(11))) {
        assert_eq!(
            reject_reason(t),
            format!(
                "properties_too_deep: properties{} is at level 11 > 10",
                ".a".repeat(10)
            )
        );
    }
    // Arrays are levels too.
    let arrays = json!({"m": [[[[[[[[[[1]]]]]]]]]]});
    for t in run_both(track_with(arrays)) {
        assert_eq!(
            reject_reason(t),
            "properties_too_deep: properties.m[0][0][0][0][0][0][0][0][0] is at level 11 > 10"
        );
    }
}

#[test]
fn limit_properties_5_mb() {
    let chunk = "z".repeat(99_000);
    let properties: Map<String, Value> = (0..51)
        .map(|i| (format!("part{i:02}"), Value::String(chunk.clone())))
        .collect();
    let size = serde_json::to_vec(&properties).unwrap().len();
    assert!(size > 5_000_000);
    for t in run_both(track_with(Value::Object(properties.clone()))) {
        assert_eq!(
            reject_reason(t),
            format!("properties_too_large: {size} bytes > 5000000")
        );
    }
    let under: Map<String, Value> = properties.into_iter().take(50).collect();
    for t in run_both(track_with(Value::Object(under))) {
        assert!(matches!(t, Translation::Events(_)));
    }
}

fn at(timestamp: &str) -> Value {
    json!({"type": "track", "userId": "u", "event": "E", "timestamp": timestamp})
}

#[test]
fn limit_time_after_2000_then_1990() {
    let [flat, current] = run_both(at("1999-12-31T23:59:59.999Z"));
    assert_eq!(
        reject_reason(flat),
        "time_too_old: 1999-12-31T23:59:59+00:00 is not after 2000-01-01T00:00:00+00:00"
    );
    assert_eq!(
        one_event(current).time.to_rfc3339(),
        "1999-12-31T23:59:59+00:00"
    );
    // Cut to the second first: half a second past midnight is midnight, not after it.
    let [flat, _] = run_both(at("2000-01-01T00:00:00.500Z"));
    assert!(reject_reason(flat).starts_with("time_too_old"));
    let [flat, _] = run_both(at("2000-01-01T00:00:01Z"));
    assert!(matches!(flat, Translation::Events(_)));
    let [_, current] = run_both(at("1990-01-01T00:00:00Z"));
    assert_eq!(
        reject_reason(current),
        "time_too_old: 1990-01-01T00:00:00+00:00 is not after 1990-01-01T00:00:00+00:00"
    );
}

#[test]
fn limit_time_at_most_365_days_ahead() {
    for t in run_both(at("2025-06-01T00:00:00.999Z")) {
        assert!(matches!(t, Translation::Events(_)));
    }
    for t in run_both(at("2025-06-01T00:00:01Z")) {
        assert_eq!(
            reject_reason(t),
            "time_too_far_ahead: 2025-06-01T00:00:01+00:00 is more than 365 days after \
             2024-06-01T00:00:00+00:00"
        );
    }
}

#[test]
fn time_is_cut_to_the_second_and_falls_back_to_received_at() {
    let event = one_event(run(at("2024-01-02T03:04:05.999999999+02:00")));
    assert_eq!(event.time.to_rfc3339(), "2024-01-02T01:04:05+00:00");
    let mut message: Value = serde_json::from_slice(&stored(json!({
        "type": "track", "userId": "u", "event": "E",
    })))
    .unwrap();
    message.as_object_mut().unwrap().remove("timestamp");
    let bytes = serde_json::to_vec(&message).unwrap();
    let Translation::Events(events) =
        translate(&bytes, &Mapping::default(), Revision::Current, now())
    else {
        panic!()
    };
    assert_eq!(events[0].time.to_rfc3339(), "2024-01-02T03:04:06+00:00");
}

#[test]
fn limit_unique_id_255_is_repaired_by_hash() {
    let order_id = "o".repeat(300);
    let fields = json!({
        "type": "track", "userId": "u", "event": "Order Completed",
        "properties": {"order_id": order_id, "products": [{"sku": "a"}]},
    });
    for t in run_both(fields) {
        let events = events(t);
        assert_eq!(events[0].unique_id, "m-1");
        let id = &events[1].unique_id;
        assert_eq!(id.len(), 255);
        let (prefix, hash) = id.split_at(222);
        assert_eq!(prefix, &"o".repeat(222));
        assert!(hash.starts_with('~') && hash[1..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
    // A unique_id within the limit is left alone.
    let exact = "u".repeat(255);
    let mut event = one_event(run(json!({"type": "track", "userId": "u", "event": "E"})));
    event.unique_id = exact.clone();
    limits::CURRENT.apply(&mut event, now()).unwrap();
    assert_eq!(event.unique_id, exact);
}

#[test]
fn one_bad_product_rejects_the_whole_order() {
    let fields = json!({
        "type": "track", "userId": "u", "event": "Order Completed",
        "properties": {"order_id": "o", "products": [{"sku": "a"}, {"sku": "b", "note": "n".repeat(100_001)}]},
    });
    assert_eq!(
        reject_reason(run(fields)),
        // The order event holds the product too, and is checked first.
        "string_too_long: properties.products[1].note is 100001 bytes > 100000"
    );
    let wide = numbered_properties(401);
    let fields = json!({
        "type": "track", "userId": "u", "event": "Order Completed",
        "properties": {"order_id": "o", "products": [{"sku": "a"}, wide]},
    });
    assert_eq!(
        reject_reason(run(fields)),
        "too_many_properties: 402 > 400 (in \"Ordered Product\" event 2)"
    );
}

// ---- Bodies of both revisions ----

/// The example of `target-format.md`, field for field.
#[test]
fn current_body_is_the_target_format_example() {
    let event = one_event(run(json!({
        "type": "track",
        "userId": "user-1",
        "anonymousId": "anon-1",
        "messageId": "msg-0001",
        "timestamp": "2024-01-02T03:04:05.250Z",
        "event": "Order Completed",
        "properties": {"revenue": 42.5, "currency": "USD"},
        "context": {"traits": {
            "email": "ann@example.com", "phone": "+15555550100", "firstName": "Ann",
            "lastName": "Lee", "company": {"name": "Acme"}, "title": "CTO",
            "avatar": "https://example.com/ann.png",
            "address": {"street": "1 Main St", "city": "Springfield", "state": "IL",
                        "postal_code": "62701", "country": "US"},
            "plan": "pro",
        }},
    })));
    let body = event_body(&event, Revision::Current);
    let expected = r#"{"data":{"type":"event","attributes":{"properties":{"currency":"USD","revenue":42.5},"metric":{"data":{"type":"metric","attributes":{"name":"Order Completed"}}},"profile":{"data":{"type":"profile","attributes":{"email":"ann@example.com","phone_number":"+15555550100","external_id":"user-1","anonymous_id":"anon-1","first_name":"Ann","last_name":"Lee","organization":"Acme","title":"CTO","image":"https://example.com/ann.png","location":{"address1":"1 Main St","city":"Springfield","region":"IL","zip":"62701","country":"US"},"properties":{"plan":"pro"}}}},"time":"2024-01-02T03:04:05+00:00","value":42.5,"value_currency":"USD","unique_id":"msg-0001"}}}"#;
    // Byte for byte: the key order is the doc's.
    assert_eq!(String::from_utf8(body).unwrap(), expected);
}

/// Seed 002's shape: flat attributes, `$`-keyed profile, `metric: {name}`.
#[test]
fn flat_body_is_seed_002_shape() {
    let event = one_event(run_with(
        json!({
            "type": "track",
            "userId": "user-1",
            "anonymousId": "anon-1",
            "event": "Viewed Product",
            "properties": {"ProductName": "Mug", "Categories": ["Kitchen"], "value": 9.99,
                           "currency": "USD", "$extra": {"URL": "https://example.com/mug"}},
            "context": {"traits": {
                "email": "ann@example.com", "phone": "+15555550100", "firstName": "Ann",
                "lastName": "Lee", "company": "Acme", "title": "CTO",
                "avatar": "https://example.com/ann.png",
                "address": {"street": "1 Main St", "city": "Springfield", "state": "IL",
                            "postalCode": "62701", "country": "US"},
                "plan": "pro", "$email": "shadow@example.com",
            }},
        }),
        &Mapping::default(),
        Revision::V2023_01_24,
    ));
    let body = event_body(&event, Revision::V2023_01_24);
    let expected = r#"{"data":{"type":"event","attributes":{"profile":{"$email":"ann@example.com","$phone_number":"+15555550100","$id":"user-1","$first_name":"Ann","$last_name":"Lee","$organization":"Acme","$title":"CTO","$image":"https://example.com/ann.png","$address1":"1 Main St","$city":"Springfield","$region":"IL","$zip":"62701","$country":"US","anonymous_id":"anon-1","plan":"pro"},"metric":{"name":"Viewed Product"},"properties":{"$extra":{"URL":"https://example.com/mug"},"Categories":["Kitchen"],"ProductName":"Mug","currency":"USD","value":9.99},"time":"2024-01-02T03:04:05+00:00","value":9.99,"unique_id":"m-1"}}}"#;
    assert_eq!(String::from_utf8(body).unwrap(), expected);
}

#[test]
fn profile_import_body_has_no_anonymous_id() {
    let translation = run(json!({
        "type": "identify", "userId": "user-1", "anonymousId": "anon-1",
        "traits": {"email": "ann@example.com"},
    }));
    assert_eq!(
        String::from_utf8(upsert_body(translation)).unwrap(),
        r#"{"data":{"type":"profile","attributes":{"email":"ann@example.com","external_id":"user-1"}}}"#
    );
}

#[test]
fn bulk_job_body() {
    let first = one_event(run(json!({
        "type": "track", "userId": "user-1", "anonymousId": "anon-1", "event": "A",
        "properties": {"revenue": 3, "currency": "USD"},
    })));
    let second = one_event(run(
        json!({"type": "page", "userId": "user-2", "messageId": "m-2"}),
    ));
    let mut out = Vec::new();
    write_bulk_job(&mut out, [&first, &second]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        concat!(
            r#"{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":["#,
            r#"{"type":"event-bulk-create","attributes":{"#,
            r#""profile":{"data":{"type":"profile","attributes":{"external_id":"user-1","anonymous_id":"anon-1"}}},"#,
            r#""events":{"data":[{"type":"event","attributes":{"properties":{"currency":"USD","revenue":3},"#,
            r#""metric":{"data":{"type":"metric","attributes":{"name":"A"}}},"#,
            r#""time":"2024-01-02T03:04:05+00:00","value":3.0,"value_currency":"USD","unique_id":"m-1"}}]}}},"#,
            r#"{"type":"event-bulk-create","attributes":{"#,
            r#""profile":{"data":{"type":"profile","attributes":{"external_id":"user-2"}}},"#,
            r#""events":{"data":[{"type":"event","attributes":{"properties":{},"#,
            r#""metric":{"data":{"type":"metric","attributes":{"name":"Viewed Page"}}},"#,
            r#""time":"2024-01-02T03:04:05+00:00","unique_id":"m-2"}}]}}}"#,
            r#"]}}}}"#,
        )
    );
}

// ---- Revisions and bad input ----

#[test]
fn revision_header_picks_the_shape() {
    assert_eq!(
        Revision::from_header("2023-01-24"),
        Ok(Revision::V2023_01_24)
    );
    assert_eq!(
        Revision::from_header("2023-01-24.pre"),
        Ok(Revision::V2023_01_24)
    );
    assert_eq!(Revision::from_header("2023-02-22"), Ok(Revision::Current));
    assert_eq!(
        Revision::from_header(Revision::DEFAULT_HEADER),
        Ok(Revision::Current)
    );
    for unsupported in ["2022-10-17", "2023-02-01", "latest", "", "2024-13-01"] {
        assert_eq!(
            Revision::from_header(unsupported),
            Err(UnsupportedRevision(unsupported.to_string()))
        );
    }
    assert_eq!(Revision::V2023_01_24.limits().max_properties, 300);
    assert_eq!(Revision::Current.limits().max_properties, 400);
}

#[test]
fn unreadable_messages_are_rejected() {
    let reject = |bytes: &[u8]| {
        reject_reason(translate(
            bytes,
            &Mapping::default(),
            Revision::Current,
            now(),
        ))
    };
    assert!(reject(b"{").starts_with("invalid_message: "));
    assert!(reject(br#"{"type":"track","userId":5}"#).starts_with("invalid_message: "));
    assert_eq!(
        reject(br#"{"type":"merge","userId":"u"}"#),
        r#"invalid_message: unknown type "merge""#
    );
    let no_id = br#"{"type":"track","userId":"u","event":"E","timestamp":"2024-01-02T03:04:05Z"}"#;
    assert_eq!(reject(no_id), "invalid_message: no messageId");
    let bad_time =
        br#"{"type":"track","userId":"u","event":"E","messageId":"m","timestamp":"soon"}"#;
    assert_eq!(
        reject(bad_time),
        r#"invalid_message: timestamp "soon" is not a date-time"#
    );
}
