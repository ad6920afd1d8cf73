use super::*;
use crate::destinations::klaviyo::action_calls::{group, job_body, per_call, Row};
use crate::destinations::klaviyo::KlaviyoConfig;
use crate::destinations::{deserialize_table, Kind};
use serde_json::json;

fn config(actions: &str) -> Result<KlaviyoConfig, KeyError> {
    let text = format!("api_key_env = \"K\"\n{actions}");
    let config: KlaviyoConfig = deserialize_table(text.parse::<toml::Table>().unwrap())?;
    config.validate()?;
    Ok(config)
}

fn key_of(actions: &str) -> String {
    config(actions).expect_err("should be refused").key
}

#[test]
fn action_keys_are_checked_with_their_path() {
    let ok = config(
        "[[actions]]\nwhen = { events = [\"Subscribed\"] }\ndo = \"subscribe\"\n\
         channels = [\"email\", \"sms\"]\nlist_id = \"Xy12Ab\"\nconsented_at = \"timestamp\"\n",
    )
    .unwrap();
    assert_eq!(ok.actions[0].action, KlaviyoActionKind::Subscribe);
    assert_eq!(
        key_of("[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"subscrib\"\n"),
        "actions[0].do"
    );
    assert_eq!(
        key_of("[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"add_to_list\"\n"),
        "actions[0].list_id"
    );
    assert_eq!(
        key_of(
            "[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"subscribe\"\n\
             channels = [\"email\", \"fax\"]\n"
        ),
        "actions[0].channels[1]"
    );
    assert_eq!(
        key_of(
            "[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"suppress\"\nchannels = [\"sms\"]\n"
        ),
        "actions[0].channels"
    );
    assert_eq!(
        key_of(
            "[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"add_to_list\"\nlist_id = \"a/b\"\n"
        ),
        "actions[0].list_id"
    );
    assert_eq!(
        key_of("[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"suppress\"\nlist_id = \"L\"\n"),
        "actions[0].list_id"
    );
    assert_eq!(
        key_of("[[actions]]\nwhen = { events = [] }\ndo = \"subscribe\"\n"),
        "actions[0].when.events"
    );
    assert_eq!(
        key_of("[[actions]]\nwhen = { event = \"a\" }\ndo = \"subscribe\"\n"),
        "actions[0].when.event"
    );
    assert_eq!(
        key_of(
            "[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"unsubscribe\"\nconsented_at = \"t\"\n"
        ),
        "actions[0].consented_at"
    );
    assert_eq!(
        key_of("revision = \"2023-01-24\"\n[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"subscribe\"\n"),
        "actions"
    );
    assert_eq!(
        key_of("[[actions]]\nwhen = { events = [\"a\"] }\ndo = \"subscribe\"\nlist = \"L\"\n"),
        "actions[0].list"
    );
}

fn compiled(actions: &str) -> Vec<KlaviyoAction> {
    config(actions)
        .unwrap()
        .actions
        .iter()
        .map(KlaviyoAction::compile)
        .collect()
}

fn now() -> DateTime<Utc> {
    "2026-12-07T12:00:00Z".parse().unwrap()
}

#[test]
fn contacts_come_from_traits_then_properties_and_are_required() {
    let actions = compiled(
        "[[actions]]\nwhen = { events = [\"Signed Up\"] }\ndo = \"subscribe\"\n\
         channels = [\"email\", \"sms\"]\n",
    );
    let message = |body: serde_json::Value| serde_json::to_vec(&body).unwrap();
    let from_context = message(
        json!({"type": "track", "event": "Signed Up", "userId": "u1",
        "context": {"traits": {"email": "a@example.com"}}, "properties": {"phone": "+1 555 555 0100"}}),
    );
    let items = plan(&actions, &from_context, now()).unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].email.as_deref(), Some("a@example.com"));
    assert_eq!(items[0].phone_number.as_deref(), Some("+15555550100"));
    let other_event = message(json!({"type": "track", "event": "Other", "userId": "u1"}));
    assert_eq!(plan(&actions, &other_event, now()).unwrap(), Vec::new());
    let none = message(
        json!({"type": "track", "event": "Signed Up", "userId": "u1",
        "properties": {"email": "not an email"}}),
    );
    let detail = plan(&actions, &none, now()).unwrap_err();
    assert!(
        detail.starts_with(
            "no_contact_for_action: actions[0] (subscribe) needs an email or an E.164 phone"
        ),
        "{detail}"
    );
}

#[test]
fn consent_older_than_a_day_is_historical_newer_is_not() {
    let actions = compiled(
        "[[actions]]\nwhen = { types = [\"identify\"] }\ndo = \"subscribe\"\n\
         consented_at = \"traits.consent.at\"\n",
    );
    let at = |when: &str| {
        serde_json::to_vec(&json!({"type": "identify", "userId": "u",
            "traits": {"email": "a@example.com", "consent": {"at": when}}}))
        .unwrap()
    };
    let old = plan(&actions, &at("2026-12-05T12:00:00Z"), now()).unwrap();
    assert_eq!(
        old[0].consented_at,
        Some("2026-12-05T12:00:00Z".parse().unwrap())
    );
    let recent = plan(&actions, &at("2026-12-07T01:00:00Z"), now()).unwrap();
    assert_eq!(recent[0].consented_at, None);
    let bad = plan(&actions, &at("yesterday"), now()).unwrap_err();
    assert!(bad.starts_with("invalid_consented_at: actions[0]"), "{bad}");
}

fn item(action: usize, email: &str) -> ActionItem {
    ActionItem {
        action,
        email: Some(email.to_string()),
        phone_number: None,
        external_id: None,
        consented_at: None,
    }
}

#[test]
fn a_batch_merges_per_action_and_profile_and_splits_per_call() {
    let kinds = |a: usize| match a {
        0 => (KlaviyoActionKind::Subscribe, Some("L1".to_string())),
        _ => (KlaviyoActionKind::Unsubscribe, None),
    };
    // Messages 0 and 2 subscribe the same profile: one row, both messages.
    let items = vec![
        (0, item(0, "a@example.com")),
        (1, item(1, "b@example.com")),
        (2, item(0, "a@example.com")),
    ];
    let groups = group(items, kinds);
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].rows.len(), 1);
    assert_eq!(groups[0].rows[0].messages, vec![0, 2]);
    let rows: Vec<&Row> = groups[0].rows.iter().collect();
    let body = job_body(&groups[0], &rows);
    assert_eq!(
        body,
        json!({"data": {"type": "profile-subscription-bulk-create-job",
            "attributes": {"profiles": {"data": [{"type": "profile", "attributes": {
                "email": "a@example.com",
                "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}}}}]}},
            "relationships": {"list": {"data": {"type": "list", "id": "L1"}}}}})
    );
    assert_eq!(per_call(KlaviyoActionKind::Subscribe), 1000);
    assert_eq!(per_call(KlaviyoActionKind::Unsubscribe), 100);
    assert_eq!(per_call(KlaviyoActionKind::Suppress), 100);
    assert_eq!(per_call(KlaviyoActionKind::AddToList), 1000);
}

#[test]
fn historical_consent_goes_in_its_own_job_with_both_fields() {
    let kinds = |_| (KlaviyoActionKind::Subscribe, None);
    let mut old = item(0, "old@example.com");
    old.consented_at = Some("2026-01-01T00:00:00Z".parse().unwrap());
    let groups = group(vec![(0, old), (1, item(0, "new@example.com"))], kinds);
    assert_eq!(groups.len(), 2);
    let historical = groups.iter().find(|g| g.historical).unwrap();
    let rows: Vec<&Row> = historical.rows.iter().collect();
    let body = job_body(historical, &rows);
    assert_eq!(body["data"]["attributes"]["historical_import"], true);
    assert_eq!(
        body["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"]["email"]
            ["marketing"]["consented_at"],
        "2026-01-01T00:00:00+00:00"
    );
    let current = groups.iter().find(|g| !g.historical).unwrap();
    let rows: Vec<&Row> = current.rows.iter().collect();
    let body = job_body(current, &rows);
    assert!(body["data"]["attributes"]
        .get("historical_import")
        .is_none());
    assert!(body.to_string().find("consented_at").is_none());
}
