//! Table tests: (destination config, source, stored message) → decision.

use super::*;
use crate::destinations::DestinationConfig;
use serde_json::json;

/// A destination named `crm` of kind `klaviyo`, with `rules` added.
fn route(rules: &str) -> Route {
    let text = format!("name = \"crm\"\nkind = \"klaviyo\"\napi_key_env = \"K\"\n{rules}");
    let config: DestinationConfig =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{rules}: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{rules}: {e:?}"));
    Route::new(&config.name, config.kind(), &config.route)
}

#[derive(Debug)]
enum Expect {
    /// Sent as stored (borrowed, not copied).
    Same,
    /// Sent edited: the JSON written out.
    Edited(&'static str),
    Skip(Skip),
}

fn check(rules: &str, source: &str, message: &str, expected: Expect) {
    let decision = route(rules).decide(source, message.as_bytes());
    let ok = match (&decision, &expected) {
        (Decision::Send(Cow::Borrowed(m)), Expect::Same) => *m == message.as_bytes(),
        (Decision::Send(Cow::Owned(m)), Expect::Edited(json)) => m == json.as_bytes(),
        (Decision::Skip(got), Expect::Skip(want)) => got == want,
        _ => false,
    };
    let shown = match &decision {
        Decision::Send(m) => format!(
            "Send({:?}, {})",
            matches!(m, Cow::Owned(_)),
            String::from_utf8_lossy(m)
        ),
        Decision::Skip(s) => format!("{s:?}"),
    };
    assert!(
        ok,
        "rules:\n{rules}\nsource {source}, message {message}\nexpected {expected:?}, got {shown}"
    );
}

const TRACK: &str = r#"{"type":"track","messageId":"m1","userId":"u","event":"Order Completed","properties":{"total":3,"plan":{"tier":"pro"},"coupon":null,"paid":true},"context":{"ip":"1.2.3.4"}}"#;
const IDENTIFY: &str =
    r#"{"type":"identify","messageId":"m2","userId":"u","traits":{"plan":"pro","age":30}}"#;
const PAGE: &str =
    r#"{"type":"page","messageId":"m3","anonymousId":"a","name":"Home","properties":{"path":"/"}}"#;

#[test]
fn routing_table() {
    use Expect::{Edited, Same, Skip as S};
    let cases: &[(&str, &str, &str, Expect)] = &[
        // No rules: everything goes, unparsed.
        ("", "web", TRACK, Same),
        ("", "web", "not json at all", Same),
        // sources
        ("sources = [\"web\", \"ios\"]", "ios", TRACK, Same),
        ("sources = [\"web\"]", "ios", TRACK, S(Skip::Source)),
        ("sources = [\"web\"]", "ios", "not json", S(Skip::Source)),
        // types
        (
            "filter = { types = [\"track\", \"page\"] }",
            "web",
            TRACK,
            Same,
        ),
        (
            "filter = { types = [\"track\", \"page\"] }",
            "web",
            PAGE,
            Same,
        ),
        (
            "filter = { types = [\"track\"] }",
            "web",
            IDENTIFY,
            S(Skip::Type),
        ),
        // The same without the fast path (type not first).
        (
            "filter = { types = [\"track\"] }",
            "web",
            r#"{"userId":"u","type":"identify"}"#,
            S(Skip::Type),
        ),
        (
            "filter = { types = [\"identify\"] }",
            "web",
            r#"{"userId":"u","type":"identify"}"#,
            Same,
        ),
        ("filter = { types = [\"track\"] }", "web", "not json", Same),
        // events: exact and globs; other types are not constrained
        (
            "filter = { events = [\"Order Completed\"] }",
            "web",
            TRACK,
            Same,
        ),
        ("filter = { events = [\"Order *\"] }", "web", TRACK, Same),
        (
            "filter = { events = [\"Order ?ompleted\"] }",
            "web",
            TRACK,
            Same,
        ),
        (
            "filter = { events = [\"Order\", \"Signed *\"] }",
            "web",
            TRACK,
            S(Skip::Event),
        ),
        (
            "filter = { events = [\"order completed\"] }",
            "web",
            TRACK,
            S(Skip::Event),
        ),
        (
            "filter = { events = [\"Signed *\"] }",
            "web",
            IDENTIFY,
            Same,
        ),
        ("filter = { events = [\"Signed *\"] }", "web", PAGE, Same),
        (
            "filter = { events = [\"Signed *\"] }",
            "web",
            r#"{"type":"track","event":"Signed\u0020Up"}"#,
            Same,
        ),
        (
            "filter = { events = [\"Signed *\"], types = [\"track\"] }",
            "web",
            PAGE,
            S(Skip::Type),
        ),
        // properties: equals (numbers by value, strings, bools, objects), exists
        (
            "[filter.properties]\ntotal = { equals = 3 }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\ntotal = { equals = 3.0 }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\ntotal = { equals = 4 }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        (
            "[filter.properties]\ntotal = { equals = \"3\" }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        (
            "[filter.properties]\n\"plan.tier\" = { equals = \"pro\" }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\n\"plan.tier\" = { equals = \"free\" }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        (
            "[filter.properties]\nplan = { equals = { tier = \"pro\" } }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\npaid = { equals = true }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\npaid = { equals = false }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        (
            "[filter.properties]\npaid = { exists = true }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\ncoupon = { exists = true }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        (
            "[filter.properties]\ncoupon = { exists = false }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\n\"plan.tier.x\" = { exists = false }",
            "web",
            TRACK,
            Same,
        ),
        (
            "[filter.properties]\nnope = { exists = true }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        // All conditions must hold.
        (
            "[filter.properties]\ntotal = { equals = 3 }\npaid = { equals = false }",
            "web",
            TRACK,
            S(Skip::Property),
        ),
        // identify and group: under traits
        (
            "[filter.properties]\nplan = { equals = \"pro\" }",
            "web",
            IDENTIFY,
            Same,
        ),
        (
            "[filter.properties]\nage = { equals = 30.0 }",
            "web",
            IDENTIFY,
            Same,
        ),
        (
            "[filter.properties]\nplan = { exists = true }",
            "web",
            PAGE,
            S(Skip::Property),
        ),
        // integrations = "ignore": the message's switches do not apply here
        (
            r#"integrations = "ignore""#,
            "web",
            r#"{"type":"track","integrations":{"All":false,"Mixpanel":true}}"#,
            Same,
        ),
        (
            r#"integrations = "ignore""#,
            "web",
            r#"{"type":"track","integrations":{"crm":false}}"#,
            Same,
        ),
        // consent_categories: denied or missing from the preferences skips; none stated goes
        (
            r#"consent_categories = ["Advertising"]"#,
            "web",
            r#"{"type":"track","context":{"consent":{"categoryPreferences":{"Advertising":false,"Analytics":true}}}}"#,
            S(Skip::Consent),
        ),
        (
            r#"consent_categories = ["Advertising"]"#,
            "web",
            r#"{"type":"track","context":{"consent":{"categoryPreferences":{"Analytics":true}}}}"#,
            S(Skip::Consent),
        ),
        (
            r#"consent_categories = ["Advertising", "Analytics"]"#,
            "web",
            r#"{"type":"track","context":{"consent":{"categoryPreferences":{"Advertising":true,"Analytics":true}}}}"#,
            Same,
        ),
        (
            r#"consent_categories = ["Advertising"]"#,
            "web",
            r#"{"type":"track","context":{"ip":"1.2.3.4"}}"#,
            Same,
        ),
        (
            r#"consent_categories = ["Advertising"]"#,
            "web",
            r#"{"type":"track"}"#,
            Same,
        ),
        (
            r#"consent_categories = ["Advertising"]
               drop_fields = ["context.ip"]"#,
            "web",
            r#"{"type":"track","context":{"ip":"1.2.3.4","consent":{"categoryPreferences":{"Advertising":false}}}}"#,
            S(Skip::Consent),
        ),
        // hash_fields: strings at the paths become SHA-256 hex of the trimmed, lower-cased
        // value (phones: digits and a leading +); the rest is kept byte for byte
        (
            r#"hash_fields = ["traits.email", "context.traits.email", "properties.phone", "traits.age"]"#,
            "web",
            r#"{"type":"identify","traits":{"email":"  Jane@Example.COM ","age":30},"properties":{"phone":"+1 (555) 010-0100"},"context":{"ip":"1.2.3.4"}}"#,
            Edited(concat!(
                r#"{"type":"identify","traits":{"email":"#,
                r#""8c87b489ce35cf2e2f39f80e282cb2e804932a56a213983eeeb428407d43b52d","age":30},"#,
                r#""properties":{"phone":"e54d0c436486638a52c63894af2b2c2d5fa395441fa879df310cdbe87db907e9"},"#,
                r#""context":{"ip":"1.2.3.4"}}"#
            )),
        ),
        // integrations: name, else kind, else All/all; case-insensitive keys
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":false}}"#,
            S(Skip::Integrations),
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"all":false}}"#,
            S(Skip::Integrations),
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":true}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":false,"crm":true}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"all":false,"CRM":true}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":false,"crm":{"listId":"x"}}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"crm":false}}"#,
            S(Skip::Integrations),
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"Klaviyo":false}}"#,
            S(Skip::Integrations),
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"Klaviyo":false,"crm":true}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":false,"Klaviyo":true}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"All":true,"Klaviyo":{}}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"Other":false}}"#,
            Same,
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{"crm":null,"All":false}}"#,
            S(Skip::Integrations),
        ),
        ("", "web", r#"{"type":"track","integrations":{}}"#, Same),
        // An empty one elsewhere does not hide the top-level switch.
        (
            "",
            "web",
            r#"{"type":"track","properties":{"integrations":{}},"integrations":{"all":false}}"#,
            S(Skip::Integrations),
        ),
        (
            "",
            "web",
            r#"{"type":"track","integrations":{ },"context":{}}"#,
            Same,
        ),
        ("", "web", r#"{"type":"track","integrations":null}"#, Same),
        // Only the top-level `integrations` counts.
        (
            "",
            "web",
            r#"{"type":"track","properties":{"integrations":{"All":false}}}"#,
            Same,
        ),
        (
            "filter = { types = [\"track\"] }",
            "web",
            r#"{"type":"track","integrations":{"All":false}}"#,
            S(Skip::Integrations),
        ),
        // drop_fields / rename: edited copies; nothing to edit leaves it borrowed
        (
            "drop_fields = [\"context.ip\"]",
            "web",
            TRACK,
            Edited(
                r#"{"type":"track","messageId":"m1","userId":"u","event":"Order Completed","properties":{"total":3,"plan":{"tier":"pro"},"coupon":null,"paid":true},"context":{}}"#,
            ),
        ),
        ("drop_fields = [\"context.ip\"]", "web", IDENTIFY, Same),
        (
            "rename = { \"properties.plan.tier\" = \"properties.tier\" }",
            "web",
            TRACK,
            Edited(
                r#"{"type":"track","messageId":"m1","userId":"u","event":"Order Completed","properties":{"total":3,"plan":{},"coupon":null,"paid":true,"tier":"pro"},"context":{"ip":"1.2.3.4"}}"#,
            ),
        ),
        (
            "drop_fields = [\"context\"]\nrename = { \"userId\" = \"traits.id\" }",
            "web",
            IDENTIFY,
            Edited(
                r#"{"type":"identify","messageId":"m2","traits":{"plan":"pro","age":30,"id":"u"}}"#,
            ),
        ),
        // Filters see the message before its edits; skips win over edits.
        (
            "drop_fields = [\"properties.total\"]\n[filter.properties]\ntotal = { equals = 3 }",
            "web",
            TRACK,
            Edited(
                r#"{"type":"track","messageId":"m1","userId":"u","event":"Order Completed","properties":{"plan":{"tier":"pro"},"coupon":null,"paid":true},"context":{"ip":"1.2.3.4"}}"#,
            ),
        ),
        (
            "drop_fields = [\"context.ip\"]",
            "web",
            r#"{"type":"track","integrations":{"crm":false},"context":{"ip":"x"}}"#,
            S(Skip::Integrations),
        ),
        ("drop_fields = [\"context.ip\"]", "web", "[1,2]", Same),
        ("drop_fields = [\"context.ip\"]", "web", "{\"type\":", Same),
    ];
    for (rules, source, message, expected) in cases {
        check(
            rules,
            source,
            message,
            match expected {
                Same => Same,
                Edited(json) => Edited(json),
                S(skip) => S(*skip),
            },
        );
    }
}

#[test]
fn integrations_fall_back_to_the_kind_for_other_kinds() {
    let config: DestinationConfig =
        toml::from_str("name = \"archive\"\nkind = \"file\"\npath = \"/tmp/x\"\n").unwrap();
    let r = Route::new(&config.name, config.kind(), &config.route);
    let off = |json: &str| r.decide("web", json.as_bytes()) == Decision::Skip(Skip::Integrations);
    assert!(off(r#"{"type":"track","integrations":{"File":false}}"#));
    assert!(off(
        r#"{"type":"track","integrations":{"ARCHIVE":false,"file":true}}"#
    ));
    assert!(!off(r#"{"type":"track","integrations":{"Klaviyo":false}}"#));
}

#[test]
fn skip_labels() {
    let labels: Vec<_> = [
        Skip::Source,
        Skip::Type,
        Skip::Event,
        Skip::Property,
        Skip::Integrations,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    assert_eq!(
        labels,
        ["source", "type", "event", "property", "integrations"]
    );
}

#[test]
fn user_key_prefers_anonymous_id() {
    let both = user_key(br#"{"userId":"u1","anonymousId":"a1"}"#);
    assert_eq!(both, user_key(br#"{"anonymousId":"a1"}"#));
    assert_ne!(both, user_key(br#"{"userId":"u1"}"#));
    assert_eq!(
        user_key(br#"{"userId":"u1","anonymousId":null}"#),
        user_key(br#"{"userId":"u1"}"#)
    );
    assert_eq!(user_key(br#"{"event":"x"}"#), 0);
    assert_eq!(user_key(b"not json"), 0);
}

#[test]
fn deciding_reports_the_user_when_it_read_the_message() {
    let message = br#"{"type":"track","anonymousId":"a1","event":"E","properties":{"x":1}}"#;
    let (_, user) = route("").decide_with_user("web", message);
    assert_eq!(user, None, "no rules: not parsed");
    let (_, user) = route("drop_fields = [\"anonymousId\"]").decide_with_user("web", message);
    assert_eq!(user, Some(user_key(message)), "taken before the edit");
    let (_, user) = route("filter = { events = [\"E\"] }").decide_with_user("web", message);
    assert_eq!(user, Some(user_key(message)));
}

#[test]
fn a_sample_keeps_a_tenth_of_users_each_whole() {
    let sampled = route("sample = 0.1");
    let mut kept = 0;
    for n in 0..10_000 {
        let user = format!("user-{n}");
        // The same user from a browser (with one anonymousId, then another) and a server.
        let messages = [
            json!({"type": "track", "event": "E", "userId": user, "anonymousId": format!("a-{n}")}),
            json!({"type": "identify", "userId": user}),
            json!({"type": "page", "userId": user, "anonymousId": format!("b-{n}")}),
        ];
        let decisions: Vec<bool> = messages
            .iter()
            .map(|m| {
                let text = m.to_string();
                match sampled.decide("web", text.as_bytes()) {
                    Decision::Send(_) => true,
                    Decision::Skip(why) => {
                        assert_eq!(why, Skip::Sampled);
                        false
                    }
                }
            })
            .collect();
        assert!(
            decisions.iter().all(|&d| d == decisions[0]),
            "{user} split: {decisions:?}"
        );
        kept += usize::from(decisions[0]);
    }
    assert!((800..=1200).contains(&kept), "kept {kept} of 10000 users");
    // The same users every time: a route made again (another instance) decides alike.
    let again = route("sample = 0.1");
    for n in 0..200 {
        let m = json!({"type": "identify", "userId": format!("user-{n}")}).to_string();
        assert_eq!(
            sampled.decide("web", m.as_bytes()),
            again.decide("web", m.as_bytes())
        );
    }
    // Anonymous-only messages are sampled by anonymousId; without any id, they go.
    let anonymous = (0..1000)
        .map(|n| json!({"type": "page", "anonymousId": format!("a-{n}")}).to_string())
        .filter(|m| matches!(sampled.decide("web", m.as_bytes()), Decision::Send(_)))
        .count();
    assert!((50..=150).contains(&anonymous), "{anonymous}");
    check(
        "sample = 0.1",
        "web",
        r#"{"type":"track","event":"E"}"#,
        Expect::Same,
    );
    // A whole sample reads nothing.
    check("sample = 1", "web", TRACK, Expect::Same);
}

#[test]
fn sample_must_be_a_share() {
    for (value, says) in [
        ("0", "above 0"),
        ("-0.5", "above 0"),
        ("1.5", "at most 1"),
        ("nan", "above 0"),
        ("\"half\"", "a number"),
    ] {
        let text = format!("name = \"w\"\nkind = \"file\"\npath = \"x\"\nsample = {value}\n");
        let table: toml::Table = toml::from_str(&text).unwrap();
        let e = match DestinationConfig::from_table(table) {
            Ok(d) => d.validate().unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(e.key, "sample", "{value}");
        assert!(e.message.contains(says), "{value}: {}", e.message);
    }
}
