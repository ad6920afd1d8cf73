use serde_json::json;

use super::*;

const PLAN: &str = r#"{
  "events": { "Order Completed": { "type": "object", "required": ["revenue"],
                                   "properties": { "revenue": {"type": "number"},
                                                   "currency": {"type": "string"} } } },
  "identify": { "type": "object", "properties": { "email": {"type": "string"} } },
  "unplanned_events": "block",
  "violations": "block",
  "unplanned_properties": "omit" }"#;

fn plan(settings: &str) -> TrackingPlan {
    let mut file: Value = serde_json::from_str(PLAN).unwrap();
    let settings: Value = serde_json::from_str(settings).unwrap();
    for (k, v) in settings.as_object().unwrap() {
        file[k] = v.clone();
    }
    TrackingPlan::parse(&file.to_string(), "plans/web.json").unwrap()
}

fn track(event: &str, properties: Value) -> Value {
    json!({ "type": "track", "event": event, "userId": "u1", "properties": properties })
}

#[test]
fn a_planned_valid_event_passes_unchanged() {
    let plan = plan("{}");
    let mut message = track("Order Completed", json!({ "revenue": 12.5 }));
    let before = message.clone();
    assert_eq!(plan.apply(&mut message), Verdict::deliver());
    assert_eq!(message, before);
}

/// Frames each of `messages` as ingest would, for `apply_to_batch`.
fn records(messages: &[&str]) -> RecordBatch {
    let mut records = RecordBatch::with_capacity(0);
    for json in messages {
        records
            .push_with("web", MessageType::Track, |out| {
                out.extend_from_slice(json.as_bytes());
                Ok::<_, ()>(Tag::default())
            })
            .unwrap();
    }
    records
}

fn stored(records: &RecordBatch) -> Vec<String> {
    let mut bytes = records.bytes();
    let mut out = Vec::new();
    while let ReadOutcome::Record { json, .. } = read_record(&mut bytes).unwrap() {
        out.push(String::from_utf8(json).unwrap());
    }
    out
}

#[test]
fn a_message_the_plan_stage_cannot_read_becomes_a_dead_letter_saying_why() {
    let plan = plan(r#"{"unplanned_events": "allow"}"#);
    // Deeper than serde_json reads (128 levels): readable as raw JSON, not as a Value.
    let deep = format!(
        r#"{{"type":"track","event":"Deep","userId":"u1","properties":{{"a":{}1{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let fine = r#"{"type":"track","event":"Other","userId":"u1"}"#;
    let (kept, blocked) = apply_to_batch(&plan, "web", records(&[&deep, fine]));
    assert_eq!(stored(&kept), [fine]);
    assert_eq!(
        blocked.len(),
        1,
        "the unreadable message is neither kept nor blocked"
    );
    assert_eq!(blocked[0].json, deep.as_bytes());
    assert_eq!(blocked[0].violations[0].path, "");
    assert!(
        blocked[0].violations[0]
            .message
            .starts_with("the tracking plan cannot read the message: recursion limit"),
        "{:?}",
        blocked[0].violations
    );
}

#[test]
fn a_message_the_plan_rewrites_stays_on_one_line() {
    let plan = plan("{}");
    // `coupon` is omitted, so the message is written again, with its line separators.
    let message = "{\"type\":\"track\",\"event\":\"Order Completed\",\"userId\":\"u1\",\
                   \"properties\":{\"revenue\":1,\"currency\":\"a\u{2028}b\u{85}\",\"coupon\":\"X\"}}";
    let (kept, blocked) = apply_to_batch(&plan, "web", records(&[message]));
    assert!(blocked.is_empty());
    let stored = stored(&kept);
    assert!(!crate::json::breaks_lines(&stored[0]), "{:?}", stored[0]);
    let stored: Value = serde_json::from_str(&stored[0]).unwrap();
    assert_eq!(
        stored["properties"],
        json!({ "revenue": 1, "currency": "a\u{2028}b\u{85}" })
    );
}

#[test]
fn unplanned_events_are_blocked_or_allowed() {
    let mut message = track("Signed Up", json!({}));
    match plan("{}").apply(&mut message) {
        Verdict::Blocked { violations } => {
            assert_eq!(violations[0].path, "/event");
            assert!(
                violations[0].message.contains("Signed Up"),
                "{violations:?}"
            );
        }
        other => panic!("not blocked: {other:?}"),
    }
    let allowed = plan(r#"{"unplanned_events": "allow"}"#);
    assert_eq!(allowed.apply(&mut message), Verdict::deliver());
}

#[test]
fn violations_are_blocked_or_flagged_in_context() {
    let mut message = track("Order Completed", json!({ "revenue": "lots" }));
    match plan("{}").apply(&mut message) {
        Verdict::Blocked { violations } => {
            assert_eq!(violations.len(), 1);
            assert_eq!(violations[0].path, "/properties/revenue");
        }
        other => panic!("not blocked: {other:?}"),
    }
    let allowed = plan(r#"{"violations": "allow"}"#);
    let verdict = allowed.apply(&mut message);
    assert!(verdict.changed());
    assert_eq!(
        message["context"]["violations"][0]["path"],
        "/properties/revenue"
    );
    assert_eq!(message["context"]["violations"][0]["type"], "tracking_plan");
    assert_eq!(message["properties"]["revenue"], "lots");
}

#[test]
fn a_missing_required_property_is_a_violation_even_without_properties() {
    let mut message = json!({ "type": "track", "event": "Order Completed", "userId": "u1" });
    match plan("{}").apply(&mut message) {
        Verdict::Blocked { violations } => {
            assert_eq!(violations[0].path, "/properties");
            assert!(violations[0].message.contains("revenue"));
        }
        other => panic!("not blocked: {other:?}"),
    }
}

#[test]
fn unplanned_properties_are_omitted_or_kept() {
    let mut message = track(
        "Order Completed",
        json!({ "revenue": 3, "coupon": "X", "currency": "EUR" }),
    );
    let verdict = plan("{}").apply(&mut message);
    assert_eq!(
        verdict,
        Verdict::Deliver {
            omitted: vec!["coupon".into()],
            violations: vec![]
        }
    );
    assert_eq!(
        message["properties"],
        json!({ "revenue": 3, "currency": "EUR" })
    );
    let mut message = track("Order Completed", json!({ "revenue": 3, "coupon": "X" }));
    let keep = plan(r#"{"unplanned_properties": "allow"}"#);
    assert!(!keep.apply(&mut message).changed());
    assert_eq!(message["properties"]["coupon"], "X");
}

#[test]
fn identify_traits_have_their_schema_and_other_types_pass() {
    let plan = plan("{}");
    let mut bad = json!({ "type": "identify", "userId": "u1", "traits": { "email": 7 } });
    assert!(matches!(plan.apply(&mut bad), Verdict::Blocked { .. }));
    let mut extra = json!({ "type": "identify", "userId": "u1", "traits": { "email": "a@b.c", "plan": "pro" } });
    assert!(plan.apply(&mut extra).changed());
    assert_eq!(extra["traits"], json!({ "email": "a@b.c" }));
    // No group schema in the plan, and pages are not planned.
    for mut other in [
        json!({ "type": "group", "groupId": "g", "traits": { "anything": 1 } }),
        json!({ "type": "page", "name": "Home", "properties": { "x": 1 } }),
    ] {
        let before = other.clone();
        assert_eq!(plan.apply(&mut other), Verdict::deliver());
        assert_eq!(other, before);
    }
}

#[test]
fn bad_plan_files_are_errors_naming_file_and_pointer() {
    let err = TrackingPlan::parse("{ nope", "plans/web.json").unwrap_err();
    assert!(err.starts_with("plans/web.json: not JSON"), "{err}");
    let err = TrackingPlan::parse(r#"{"events": {}, "colour": 1}"#, "p.json").unwrap_err();
    assert!(err.contains("colour"), "{err}");
    let err = TrackingPlan::parse(r#"{"violations": "shout"}"#, "p.json").unwrap_err();
    assert!(err.contains("/violations"), "{err}");
    let err = TrackingPlan::parse(
        r#"{"events": {"A/B": {"properties": {"n": {"type": "integr"}}}}}"#,
        "p.json",
    )
    .unwrap_err();
    assert!(err.contains("at /events/A~1B/properties/n/type"), "{err}");
    let err = TrackingPlan::parse(r#"{"identify": 5}"#, "p.json").unwrap_err();
    assert!(err.contains("at /identify"), "{err}");
}

/// A plan whose `Signed Up` event has `schema` (and whose other settings allow).
fn plan_with(schema: Value) -> Result<TrackingPlan, String> {
    let file = json!({ "events": { "Signed Up": schema } });
    TrackingPlan::parse(&file.to_string(), "plans/web.json")
}

#[test]
fn patterns_that_need_backtracking_are_refused_at_load_naming_where() {
    let cases = [
        (
            json!({"properties": {"code": {"type": "string", "pattern": "^(a|aa)+(?!b)$"}}}),
            "at /events/Signed Up/properties/code/pattern",
        ),
        (
            json!({"patternProperties": {"^(a)\\1$": {}}}),
            "at /events/Signed Up/patternProperties/^(a)\\1$",
        ),
        (
            json!({"propertyNames": {"pattern": "(?<=a)b"}}),
            "at /events/Signed Up/propertyNames/pattern",
        ),
        (
            json!({"properties": {"x": {"items": {"pattern": "^(?=a)\\w+$"}}}}),
            "at /events/Signed Up/properties/x/items/pattern",
        ),
    ];
    for (schema, at) in cases {
        let error = plan_with(schema.clone()).expect_err(&schema.to_string());
        assert!(error.starts_with("plans/web.json: "), "{error}");
        assert!(error.contains(at), "want {at}: {error}");
        assert!(error.contains("linear time"), "{error}");
    }
}

#[test]
fn ordinary_patterns_still_validate_messages() {
    let plan = plan_with(json!({
        "properties": { "plan": { "type": "string", "pattern": "^(free|pro)-[0-9]{2,4}$" } },
        "patternProperties": { "^utm_[a-z]+$": { "type": "string" } },
    }))
    .unwrap();
    let mut good = track(
        "Signed Up",
        json!({ "plan": "pro-2024", "utm_source": "ad" }),
    );
    assert_eq!(plan.apply(&mut good), Verdict::deliver());
    let mut bad = track("Signed Up", json!({ "plan": "gold-1", "utm_source": 7 }));
    let Verdict::Deliver { violations, .. } = plan.apply(&mut bad) else {
        panic!("violations are allowed by default");
    };
    let paths: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/properties/plan", "/properties/utm_source"],
        "{violations:?}"
    );
}
