use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value as Json};

use super::context::{Names, Scope};
use super::template::{environment, Mapping};
use super::*;
use crate::destinations::{Check, DestinationConfig, Prepared};
use crate::json::doc::Doc;

const MESSAGE: &str = r#"{"type":"identify","messageId":"m1","userId":"u 1","anonymousId":null,
  "timestamp":"2024-03-01T12:00:00.250Z","traits":{"email":"  Jane@Example.COM ","plan":null,
  "age":"42","score":3.456,"tags":["a","b"],"vip":true,"address":{"city":"Paris"}}}"#;

/// Renders one TOML value (e.g. `"{{ traits.email }}"`) against `MESSAGE`.
fn render_with(value: &str, keep_nulls: bool) -> Option<Json> {
    let value: toml::Value =
        toml::from_str::<toml::Table>(&format!("v = {value}")).unwrap()["v"].clone();
    let mut env = environment();
    let mapping = Mapping::compile(&mut env, "v", &value, &mut BTreeSet::new()).unwrap();
    mapping.render(&env, &scope(), keep_nulls).unwrap().value
}

fn render(value: &str) -> Option<Json> {
    render_with(value, false)
}

/// `MESSAGE` with `env.TOKEN` and the unit tests' `settings` set.
fn scope() -> Scope<'static> {
    let message = Doc::parse(MESSAGE.as_bytes()).unwrap();
    let names = Names::default()
        .with("env", json!({"TOKEN": "s3cret"}))
        .with("settings", json!({"region": "eu", "limit": 3}));
    Scope::new(message, Arc::new(names))
}

#[test]
fn one_expression_keeps_its_type() {
    assert_eq!(render(r#""{{ traits.score }}""#), Some(json!(3.456)));
    assert_eq!(render(r#""{{ traits.vip }}""#), Some(json!(true)));
    assert_eq!(render(r#""{{ traits.tags }}""#), Some(json!(["a", "b"])));
    assert_eq!(
        render(r#""{{ traits.address }}""#),
        Some(json!({"city": "Paris"}))
    );
    assert_eq!(render(r#""{{ traits.age }}""#), Some(json!("42")));
    assert_eq!(render(r#""{{- traits.vip -}}""#), Some(json!(true)));
}

#[test]
fn undefined_drops_the_key_and_null_unless_kept() {
    assert_eq!(render(r#""{{ traits.missing.deeper }}""#), None);
    assert_eq!(render(r#""{{ traits.plan }}""#), None);
    assert_eq!(
        render_with(r#""{{ traits.plan }}""#, true),
        Some(json!(null))
    );
    assert_eq!(
        render(
            r#"{ plan = "{{ traits.plan }}", email = "{{ traits.nope }}", id = "{{ userId }}" }"#
        ),
        Some(json!({"id": "u 1"}))
    );
    assert_eq!(
        render(r#"["{{ traits.nope }}", "{{ userId }}", 1]"#),
        Some(json!(["u 1", 1]))
    );
}

#[test]
fn mixed_text_is_a_string_and_literals_map_recursively() {
    assert_eq!(render(r#""id={{ traits.age }}""#), Some(json!("id=42")));
    assert_eq!(
        render(r#""{{ traits.age }}{{ traits.age }}""#),
        Some(json!("4242"))
    );
    assert_eq!(render(r#""a {{ traits.nope }}b""#), Some(json!("a b")));
    assert_eq!(
        render(
            r#"{ n = 3, f = 1.5, b = false, nested = { list = [1, "x", "{{ traits.vip }}"] } }"#
        ),
        Some(json!({"n": 3, "f": 1.5, "b": false, "nested": {"list": [1, "x", true]}}))
    );
    assert_eq!(
        render("1979-05-27T07:32:00Z"),
        Some(json!("1979-05-27T07:32:00Z"))
    );
}

#[test]
fn filters() {
    let cases = [
        (r#""{{ traits.plan | default('free') }}""#, json!("free")),
        (r#""{{ traits.nope | default('free') }}""#, json!("free")),
        (r#""{{ userId | default('free') }}""#, json!("u 1")),
        (
            r#""{{ traits.email | trim | lower }}""#,
            json!("jane@example.com"),
        ),
        (
            r#""{{ traits.email | trim | upper }}""#,
            json!("JANE@EXAMPLE.COM"),
        ),
        (
            // sha256("jane@example.com"): trimmed and lower-cased first.
            r#""{{ traits.email | sha256 }}""#,
            json!("8c87b489ce35cf2e2f39f80e282cb2e804932a56a213983eeeb428407d43b52d"),
        ),
        (r#""{{ timestamp | unix }}""#, json!(1709294400)),
        (r#""{{ timestamp | unix_ms }}""#, json!(1709294400250i64)),
        (
            r#""{{ 1709294400 | iso8601 }}""#,
            json!("2024-03-01T12:00:00.000Z"),
        ),
        (
            r#""{{ '2024-03-01T13:00:00+01:00' | iso8601 }}""#,
            json!("2024-03-01T12:00:00.000Z"),
        ),
        (
            r#""{{ traits.address | json }}""#,
            json!(r#"{"city":"Paris"}"#),
        ),
        (r#""{{ traits.score | string }}""#, json!("3.456")),
        (r#""{{ traits.age | number }}""#, json!(42)),
        (r#""{{ '2.5' | number }}""#, json!(2.5)),
        (r#""{{ traits.score | round }}""#, json!(3)),
        (r#""{{ traits.score | round(2) }}""#, json!(3.46)),
        (r#""{{ 'a,b,c' | split(',') }}""#, json!(["a", "b", "c"])),
        (r#""{{ traits.tags | join('|') }}""#, json!("a|b")),
        (r#""{{ traits.nope | lower }}""#, Json::Null),
        (
            r#""{{ traits.nope | sha256 | default('none') }}""#,
            json!("none"),
        ),
        (r#""{{ env.TOKEN }}""#, json!("s3cret")),
        (r#""{{ settings.region }}""#, json!("eu")),
        (r#""{{ settings.limit }}""#, json!(3)),
        (r#""{{ settings.nope }}""#, Json::Null),
        (r#""{{ 'user:pass' | base64 }}""#, json!("dXNlcjpwYXNz")),
        (
            r#""{{ traits.address | merge({'zip': '75001', 'no': traits.nope, 'n': none}) }}""#,
            json!({"city": "Paris", "zip": "75001"}),
        ),
        (
            r#""{{ traits | omit('email', 'plan', 'age', 'score', 'tags', 'vip') }}""#,
            json!({"address": {"city": "Paris"}}),
        ),
        (r#""{{ traits.nope | omit('a') | merge({}) }}""#, Json::Null),
        (
            r#""{{ {'a': 1, 'b': traits.nope} | merge(traits.nope) }}""#,
            json!({"a": 1}),
        ),
        (
            r#""{{ {'a': 1, 'b': traits.nope, 'c': traits.plan} | compact }}""#,
            json!({"a": 1}),
        ),
    ];
    for (template, expected) in cases {
        let got = render(template).unwrap_or(Json::Null);
        assert_eq!(got, expected, "{template}");
    }
}

#[test]
fn sha256_does_not_hash_a_digest_twice() {
    let digest = filters::sha256("jane@example.com");
    assert_eq!(filters::sha256(&digest.to_uppercase()), digest);
}

#[test]
fn a_filter_error_names_the_key_not_the_value() {
    let value = toml::Value::String("{{ traits.email | number }}".into());
    let mut env = environment();
    let mapping = Mapping::compile(&mut env, "body.n", &value, &mut BTreeSet::new()).unwrap();
    let e = mapping.render(&env, &scope(), false).unwrap_err();
    assert!(e.starts_with("`body.n`: template error on line 1"), "{e}");
    assert!(!e.contains("Jane"), "{e}");
}

proptest! {
    /// Text with no Jinja syntax comes out as it went in, alone or around an expression.
    #[test]
    fn text_without_expressions_renders_the_literal(text in "[^{}]*") {
        prop_assert_eq!(render(&toml_string(&text)), Some(json!(text.clone())));
        let around = format!("{text}<{{{{ traits.nope }}}}>{text}");
        prop_assert_eq!(render(&toml_string(&around)), Some(json!(format!("{text}<>{text}"))));
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn destination(toml_text: &str) -> Result<DestinationConfig, KeyError> {
    let table: toml::Table = toml::from_str(toml_text).unwrap();
    let d = DestinationConfig::from_table(table)?;
    d.validate()?;
    Ok(d)
}

#[test]
fn a_bad_template_is_named_by_key_and_line() {
    let e = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         body = { a = { b = \"\"\"line one\n{{ traits.email | }}\"\"\" } }\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "body.a.b");
    assert!(e.message.contains("line 2"), "{e}");
    let e = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         [[actions]]\nbody = \"{{ x\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "actions[0].body");
    let e = destination("name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\nheaders = { A = \"{{ env['X'] }}\" }\n")
        .unwrap_err();
    assert_eq!(e.key, "headers.A");
    let e = destination("name = \"c\"\nkind = \"http\"\nurl = \"ftp://h/\"\n").unwrap_err();
    assert_eq!(e.key, "url");
    let e = destination("name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\nmethod = \"YANK\"\n")
        .unwrap_err();
    assert_eq!(e.key, "method");
    let e =
        destination("name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\nwhen = { types = [] }\n")
            .unwrap_err();
    assert_eq!(e.key, "when.types");
}

#[test]
fn batch_body_belongs_to_the_http_kind() {
    let d = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         batch = { max_events = 10, body = { contacts = \"{{ batch }}\" } }\n",
    )
    .unwrap();
    assert_eq!(d.batch_limits().max_events, 10);
    let d = destination("name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n").unwrap();
    assert_eq!(d.batch_limits().max_events, 1);
    let e = destination(
        "name = \"w\"\nkind = \"webhook\"\nurl = \"http://h/\"\nbatch = { body = {} }\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "batch.body");
    assert_eq!(e.message, "`batch.body` does not apply to kind `webhook`");
}

fn config(toml_text: &str) -> MappedConfig {
    match destination(toml_text).unwrap().settings {
        crate::destinations::KindSettings::Http(c) => c,
        _ => unreachable!(),
    }
}

#[test]
fn actions_first_match_wins_unless_all() {
    let text = "name = \"c\"\nkind = \"http\"\nurl = \"http://h/{{ type }}\"\n\
                [[actions]]\nname = \"ident\"\nwhen = { types = [\"identify\"] }\n\
                [[actions]]\nname = \"any\"\nurl = \"http://h/any\"\n";
    let names = |c: &MappedConfig, message: &str| -> Vec<String> {
        let compiled = c.compile().unwrap();
        let Preview::Send(shown) = send::preview(&compiled, message.as_bytes()) else {
            return Vec::new();
        };
        shown["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r["action"], r["url"]))
            .collect()
    };
    let first = config(text);
    assert_eq!(names(&first, MESSAGE), ["\"ident\" \"http://h/identify\""]);
    assert_eq!(
        names(&first, r#"{"type":"track"}"#),
        ["\"any\" \"http://h/any\""]
    );
    let all = config(&format!("all = true\n{text}"));
    assert_eq!(names(&all, MESSAGE).len(), 2);
    let none = config(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         [[actions]]\nwhen = { types = [\"page\"] }\n",
    );
    let compiled = none.compile().unwrap();
    assert!(matches!(
        send::preview(&compiled, MESSAGE.as_bytes()),
        Preview::Skip("no action")
    ));
}

#[test]
fn route_shows_the_request_with_secrets_masked() {
    let c = config(
        "name = \"c\"\nkind = \"http\"\nmethod = \"put\"\n\
         url = \"https://api.example.com/v2/contacts/{{ userId | urlencode }}\"\n\
         query = { key = \"{{ env.CRM_KEY }}\", skip = \"{{ nope }}\" }\n\
         headers = { X-Token = \"Token {{ env.CRM_KEY }}\" }\n\
         bearer_env = \"CRM_TOKEN\"\nsigning_secret_env = \"CRM_SIGN\"\n\
         body = { email = \"{{ traits.email | trim }}\", seen = \"{{ timestamp | unix }}\" }\n",
    );
    let compiled = c.compile().unwrap();
    let Preview::Send(shown) = send::preview(&compiled, MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(
        shown["requests"][0],
        json!({
            "action": "request",
            "method": "PUT",
            "url": "https://api.example.com/v2/contacts/u%201?key=***",
            "headers": {
                "x-token": "Token ***",
                "authorization": "Bearer ***",
                "x-fanout-signature": "sha256=***",
            },
            "body": {"email": "Jane@Example.COM", "seen": 1709294400},
        })
    );
}

#[test]
fn a_message_the_mapping_cannot_render_is_refused() {
    let c = config("name = \"c\"\nkind = \"http\"\nurl = \"{{ traits.tags }}\"\n");
    let compiled = c.compile().unwrap();
    let env = Arc::new(Names::default());
    assert!(matches!(
        send::render(&compiled, MESSAGE.as_bytes(), &env),
        Check::Refuse { .. }
    ));
    assert!(matches!(
        send::render(&compiled, b"[1]", &env),
        Check::Refuse { .. }
    ));
    let c = config(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\nwhen = { types = [\"track\"] }\n",
    );
    let compiled = c.compile().unwrap();
    assert!(matches!(
        send::render(&compiled, MESSAGE.as_bytes(), &env),
        Check::Skip("when")
    ));
    let c = config("name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n");
    let compiled = c.compile().unwrap();
    let Check::Send(Some(Prepared::Http(_))) = send::render(&compiled, MESSAGE.as_bytes(), &env)
    else {
        panic!("sent");
    };
}

#[test]
fn the_live_view_shows_the_requests_with_secrets_masked() {
    // Names no other test reads; the values must never be shown.
    std::env::set_var("MAPPED_LIVE_TEST_TOKEN", "live-secret");
    std::env::set_var("MAPPED_LIVE_TEST_KEY", "live-key");
    let d = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/{{ userId }}\"\n\
         headers = { X-Token = \"{{ env.MAPPED_LIVE_TEST_TOKEN }}\" }\n\
         api_key = { header = \"X-Key\", env = \"MAPPED_LIVE_TEST_KEY\" }\n\
         body = { t = \"{{ env.MAPPED_LIVE_TEST_TOKEN }}\", e = \"{{ traits.email | trim }}\" }\n",
    )
    .unwrap();
    let running = d.build(None, crate::clock::Clock::system()).unwrap();
    let shown = running.live_payload(MESSAGE.as_bytes()).unwrap();
    assert!(!shown.to_string().contains("live-"), "{shown}");
    assert_eq!(
        shown["requests"][0],
        json!({
            "action": "request",
            "method": "POST",
            "url": "http://h/u%201",
            "headers": {"x-token": "***", "x-key": "***"},
            "body": {"t": "***", "e": "Jane@Example.COM"},
        })
    );
    // What is sent carries the real values.
    let Check::Send(Some(Prepared::Http(requests))) = running.check(MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(
        requests.body_of_first(),
        Some(json!({"t": "live-secret", "e": "Jane@Example.COM"}))
    );
}

#[test]
fn a_missing_secret_stops_the_start_by_name() {
    let d = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         headers = { A = \"{{ env.MAPPED_TEST_NEVER_SET }}\" }\n",
    )
    .unwrap();
    let e = d.build(None, crate::clock::Clock::system()).err().unwrap();
    assert!(e.to_string().contains("MAPPED_TEST_NEVER_SET"), "{e}");
}

/// Compiles one TOML value (e.g. `"{{ traits.email }}"`) as the mapping at `v`.
fn compiled(value: &str) -> (minijinja::Environment<'static>, Mapping) {
    let value: toml::Value =
        toml::from_str::<toml::Table>(&format!("v = {value}")).unwrap()["v"].clone();
    let mut env = environment();
    let mapping = Mapping::compile(&mut env, "v", &value, &mut BTreeSet::new()).unwrap();
    (env, mapping)
}

/// Templates over `traits.a`, `traits.b`, `userId` and `timestamp`: every filter, the
/// type rules, text, and forms the fast path leaves to minijinja.
const AGREEING: [&str; 44] = [
    r#""{{ traits.a }}""#,
    r#""{{ traits['a'] }}""#,
    r#""{{- traits.a -}}""#,
    r#""{{ traits.a.x }}""#,
    r#""{{ traits.a[0] }}""#,
    r#""{{ traits.a[1].x }}""#,
    r#""{{ traits.nope.deeper }}""#,
    r#""{{ traits.a | default('free') }}""#,
    r#""{{ traits.a | default(3, true) }}""#,
    r#""{{ traits.a | d }}""#,
    r#""{{ traits.a | default(none) }}""#,
    r#""{{ traits.a | lower }}""#,
    r#""{{ traits.a | upper() }}""#,
    r#""{{ traits.a | trim }}""#,
    r#""{{ traits.a | sha256 }}""#,
    r#""{{ traits.a | string }}""#,
    r#""{{ traits.a | unix }}""#,
    r#""{{ traits.a | unix_ms }}""#,
    r#""{{ traits.a | iso8601 }}""#,
    r#""{{ traits.a | json }}""#,
    r#""{{ traits.a | number }}""#,
    r#""{{ traits.a | round }}""#,
    r#""{{ traits.a | round(2) }}""#,
    r#""{{ traits.a | split }}""#,
    r#""{{ traits.a | split(',') }}""#,
    r#""{{ traits.a | join }}""#,
    r#""{{ traits.a | join('|') }}""#,
    r#""{{ traits.a | trim | lower | sha256 }}""#,
    r#""{{ traits.b | number | round(1) | string }}""#,
    r#""{{ traits.b | default('x') | upper }}""#,
    r#""id={{ traits.a }}""#,
    r#""{{ traits.a }}-{{ traits.b | upper }}/{{ userId }}""#,
    r#""a {{ traits.nope }}b""#,
    r#""{{ timestamp | unix }}""#,
    r#""{{ userId }}""#,
    r#""{{ traits }}""#,
    r#""{{ env.TOKEN }}""#,
    r#""{{ 'a,b' | split(',') }}""#,
    r#""{{ 5 | iso8601 }}""#,
    // Left to minijinja: a filter of its own, an expression as argument, a statement.
    r#""{{ traits.a | first }}""#,
    r#""{{ traits.b | default(traits.a) }}""#,
    r#""{% if traits.a %}yes{% endif %}""#,
    r#"{ a = "{{ traits.a | length }}", b = "{{ traits.b }}", c = [1, "{{ userId }}"] }"#,
    r#"{ a = "{{ traits.a }}", b = { c = "x", d = [true, 1.5] } }"#,
];

/// A value a message field can hold.
fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        (-1e7..1e7f64).prop_map(Json::from),
        "[ a-zA-Z0-9@.,:|-]{0,12}".prop_map(Json::from),
        // Escaped in JSON text: read into an owned string.
        r#"[a-zé"\\\n]{0,6}"#.prop_map(Json::from),
        "-?[0-9]{1,5}(\\.[0-9]{1,3})?".prop_map(Json::from),
        "20[0-9]{2}-0[1-9]-[12][0-9]T[01][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{3})?Z"
            .prop_map(Json::from),
        prop::collection::vec("[a-z]{0,3}".prop_map(Json::from), 0..3).prop_map(Json::from),
        "[a-z]{0,4}".prop_map(|x| json!([{"x": x}, {"x": x}])),
        "[a-z]{0,4}".prop_map(|x| json!({"x": x})),
    ]
}

proptest! {
    /// The fast path renders what minijinja renders (value, dropped key or error), and
    /// the body written as text is that value serialised.
    #[test]
    fn the_fast_path_and_minijinja_agree(
        a in prop::option::of(leaf()),
        b in prop::option::of(leaf()),
        user in leaf(),
        timestamp in leaf(),
        keep_nulls in any::<bool>(),
    ) {
        let mut traits = serde_json::Map::new();
        traits.extend(a.map(|a| ("a".to_string(), a)));
        traits.extend(b.map(|b| ("b".to_string(), b)));
        let message = json!({"userId": user, "timestamp": timestamp, "traits": traits});
        let names = Names::default().with("env", json!({"TOKEN": "s3cret"}));
        let text = serde_json::to_vec(&message).unwrap();
        let scope = Scope::new(Doc::parse(&text).unwrap(), Arc::new(names));
        for template in AGREEING {
            let (env, mapping) = compiled(template);
            let fast = mapping.render(&env, &scope, keep_nulls).map(|r| r.value);
            let slow = mapping.render_slow(&env, &scope, keep_nulls).map(|r| r.value);
            prop_assert_eq!(&fast, &slow, "{}", template);
            let mut written = Vec::new();
            let wrote = mapping.write(&env, &scope, keep_nulls, &mut written);
            if let Ok(value) = fast {
                prop_assert!(wrote.is_ok());
                let value = value.unwrap_or(Json::Null);
                prop_assert_eq!(written, serde_json::to_vec(&value).unwrap(), "{}", template);
            }
        }
    }

    /// Tables and arrays without templates render as they are, at any depth.
    #[test]
    fn a_mapping_without_expressions_renders_the_literal(
        text in "[^{}\"\\\\]{0,8}",
        n in any::<i64>(),
        b in any::<bool>(),
    ) {
        let toml_value = format!(
            "{{ s = {}, n = {n}, list = [{n}, {b}, {{ deep = {} }}], b = {b} }}",
            toml_string(&text),
            toml_string(&text),
        );
        let expected = json!({"s": text, "n": n, "list": [n, b, {"deep": text}], "b": b});
        let (env, mapping) = compiled(&toml_value);
        prop_assert_eq!(mapping.render(&env, &scope(), false).unwrap().value, Some(expected.clone()));
        let mut written = Vec::new();
        mapping.write(&env, &scope(), false, &mut written).unwrap();
        prop_assert_eq!(written, serde_json::to_vec(&expected).unwrap());
    }
}

#[test]
fn the_common_forms_take_the_fast_path() {
    let fast = [
        r#""{{ traits.email }}""#,
        r#"'{{ properties["Order Id"] }}'"#,
        r#""{{ traits.tags[0] }}""#,
        r#""{{ traits.plan | default('free') | lower | sha256 }}""#,
        r#""{{ traits.score | round(2) }}""#,
        r#""{{ 'a,b' | split(',') | join('|') }}""#,
        r#""{{ traits.d | default('x', true) }}""#,
        r#""order {{ properties.orderId }} of {{ userId | upper }}""#,
        r#""{{ env.TOKEN }}""#,
    ];
    for template in fast {
        assert_eq!(compiled(template).1.fast_slots(), 1, "{template}");
    }
    let slow = [
        r#""{{ traits.tags | first }}""#,
        r#""{{ traits.a | default(traits.b) }}""#,
        r#""{{ traits.a ~ 'x' }}""#,
        r#""{{ range }}""#,
        r#""{{ none }}""#,
        r#""{{ traits.a | round(2.5) }}""#,
        r#""{{ traits.a | lower('x') }}""#,
        r#""{{ 'a\\b' }}""#,
        r#""{{- traits.a }} x""#,
        r#""{% if x %}y{% endif %}""#,
    ];
    for template in slow {
        assert_eq!(compiled(template).1.fast_slots(), 0, "{template}");
    }
}

#[test]
fn a_mapping_with_slow_slots_renders_the_fast_ones_beside() {
    let (env, mapping) =
        compiled(r#"{ a = "{{ traits.tags | first }}", b = "{{ userId | upper }}", c = "x" }"#);
    assert_eq!(mapping.fast_slots(), 1);
    assert_eq!(
        mapping.render(&env, &scope(), false).unwrap().value,
        Some(json!({"a": "a", "b": "U 1", "c": "x"}))
    );
    // A filter's error on the fast path is minijinja's error, with the key and line.
    let (env, mapping) =
        compiled(r#"{ a = "{{ traits.tags | first }}", n = "{{ traits.email | number }}" }"#);
    let e = mapping.render(&env, &scope(), false).unwrap_err();
    assert!(e.starts_with("`v.n`: template error on line 1"), "{e}");
}

#[test]
fn the_benchmarked_mapping_takes_the_fast_path_everywhere() {
    // benches/http_kind.rs's destination: every template is of a common form.
    let c = config(
        "name = \"b\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/v1/events/{{ userId }}\"\n\
         headers = { X-Source = \"fanout {{ context.library.name }}\" }\n\
         [body]\nevent = \"{{ event }}\"\nuser_id = \"{{ userId }}\"\n\
         insert_id = \"{{ messageId }}\"\ntime = \"{{ timestamp | unix_ms }}\"\n\
         email = \"{{ context.traits.email | sha256 }}\"\n\
         revenue = \"{{ properties.revenue }}\"\n\
         currency = \"{{ properties.currency | default('USD') | lower }}\"\n\
         order = \"order {{ properties.orderId }}\"\n\
         products = \"{{ properties.products }}\"\nip = \"{{ context.ip }}\"\n",
    );
    let compiled = c.compile().unwrap();
    let action = &compiled.actions[0];
    let body = action.body.as_ref().unwrap();
    assert_eq!((body.fast_slots(), body.slot_count()), (10, 10));
    assert_eq!(action.url.fast_slots(), 1);
    assert!(matches!(action.url_form, url_form::UrlForm::Prefix { .. }));
    assert_eq!(action.headers[0].1.fast_slots(), 1);
}

/// The URL of each request `fanout route` shows for `MESSAGE`.
fn urls(c: &MappedConfig) -> Vec<String> {
    let compiled = c.compile().unwrap();
    let Preview::Send(shown) = send::preview(&compiled, MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    let requests = shown["requests"].as_array().unwrap();
    requests.iter().map(|r| r["url"].to_string()).collect()
}

#[test]
fn base_url_and_path_make_the_url_and_an_action_overrides_either() {
    let head = "name = \"c\"\nkind = \"http\"\nall = true\nbase_url = \"http://h:1/v1/\"\n";
    let c = config(&format!(
        "{head}path = \"/d/{{{{ type }}}}\"\n\
         [[actions]]\n\
         [[actions]]\npath = \"/a\"\n\
         [[actions]]\nbase_url = \"https://eu.h\"\n\
         [[actions]]\nurl = \"http://other/x\"\n"
    ));
    assert_eq!(
        urls(&c),
        [
            "\"http://h:1/v1/d/identify\"",
            "\"http://h:1/v1/a\"",
            "\"https://eu.h/d/identify\"",
            "\"http://other/x\"",
        ]
    );
}

#[test]
fn a_url_taken_without_parsing_gets_its_query_as_a_parsed_one_would() {
    let c = config(
        "name = \"c\"\nkind = \"http\"\nall = true\nurl = \"http://h/c/{{ type }}\"\n\
         [[actions]]\nquery = { a = \"{{ traits.email }}\", b = \"x y&z\", c = \"{{ nope }}\" }\n\
         [[actions]]\nquery = { c = \"{{ nope }}\" }\n\
         [[actions]]\n",
    );
    let compiled = c.compile().unwrap();
    assert!(matches!(
        compiled.actions[0].url_form,
        url_form::UrlForm::Prefix { .. }
    ));
    let mut both = url::Url::parse("http://h/c/identify").unwrap();
    both.query_pairs_mut()
        .append_pair("a", "  Jane@Example.COM ")
        .append_pair("b", "x y&z");
    let mut none = url::Url::parse("http://h/c/identify").unwrap();
    none.query_pairs_mut();
    let shown = |url: url::Url| Json::from(url.as_str()).to_string();
    assert_eq!(
        urls(&c),
        [
            shown(both),
            shown(none),
            "\"http://h/c/identify\"".to_string()
        ]
    );
}

#[test]
fn base_url_and_path_errors_name_the_key() {
    let head = "name = \"c\"\nkind = \"http\"\n";
    let cases = [
        (
            "url = \"http://h/\"\npath = \"/x\"\nbase_url = \"http://h\"\n",
            "path",
        ),
        ("path = \"/x\"\n", "path"),
        (
            "base_url = \"http://h/{{ userId }}\"\npath = \"/x\"\n",
            "base_url",
        ),
        ("base_url = \"http://h/?a=1\"\npath = \"/x\"\n", "base_url"),
        ("base_url = \"ftp://h\"\npath = \"/x\"\n", "base_url"),
        (
            "base_url = \"http://h\"\n[[actions]]\nurl = \"http://h/\"\npath = \"/x\"\n",
            "actions[0].path",
        ),
        (
            "base_url = \"http://h\"\n[[actions]]\nbase_url = \"h\"\npath = \"/x\"\n",
            "actions[0].base_url",
        ),
        ("base_url = \"http://h\"\n", "url"),
    ];
    for (keys, key) in cases {
        let e = destination(&format!("{head}{keys}")).unwrap_err();
        assert_eq!(e.key, key, "{keys}: {e}");
    }
}

#[test]
fn settings_are_read_by_templates_and_secret_ones_masked() {
    std::env::set_var("MAPPED_SETTINGS_TEST_KEY", "settings-secret");
    let d = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/{{ settings.region }}\"\n\
         settings = { region = \"eu\", n = 2, key_env = \"MAPPED_SETTINGS_TEST_KEY\" }\n\
         body = { key = \"{{ settings.key }}\", n = \"{{ settings.n }}\" }\n",
    )
    .unwrap();
    let running = d.build(None, crate::clock::Clock::system()).unwrap();
    let shown = running.live_payload(MESSAGE.as_bytes()).unwrap();
    assert_eq!(shown["requests"][0]["url"], "http://h/eu");
    assert_eq!(shown["requests"][0]["body"], json!({"key": "***", "n": 2}));
    let Check::Send(Some(Prepared::Http(requests))) = running.check(MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(
        requests.body_of_first(),
        Some(json!({"key": "settings-secret", "n": 2}))
    );
    let crate::destinations::KindSettings::Http(c) = &d.settings else {
        unreachable!()
    };
    let compiled = c.compile().unwrap();
    let Preview::Send(routed) = send::preview(&compiled, MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(routed["requests"][0]["body"]["key"], "***");

    let missing = destination(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         settings = { key_env = \"MAPPED_SETTINGS_NEVER_SET\" }\n",
    )
    .unwrap();
    let e = missing
        .build(None, crate::clock::Clock::system())
        .err()
        .unwrap();
    assert!(e.to_string().contains("settings.key_env"), "{e}");
    assert!(e.to_string().contains("MAPPED_SETTINGS_NEVER_SET"), "{e}");
}

#[test]
fn settings_and_drop_on_errors_name_the_key() {
    let head = "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n";
    let cases = [
        (
            "settings = { key = \"a\", key_env = \"B\" }\n",
            "settings.key_env",
        ),
        ("settings = { key_env = 3 }\n", "settings.key_env"),
        (
            "drop_on = [{ status = 400 }, { status = 500 }]\n",
            "drop_on[1].status",
        ),
        ("drop_on = [{ status = 400, body = \"x\" }]\n", "drop_on[0]"),
        ("retry_on = [{ status = 503 }]\n", "retry_on[0].status"),
    ];
    for (keys, key) in cases {
        let e = destination(&format!("{head}{keys}")).unwrap_err();
        assert!(e.key.starts_with(key), "{keys}: {e}");
    }
}

#[test]
fn drop_on_matches_status_and_body_text() {
    let entry = DropOn {
        status: 400,
        body_contains: Some("invalid".into()),
    };
    assert!(entry.matches(400, r#"{"error":"invalid event"}"#));
    assert!(!entry.matches(400, r#"{"error":"missing key"}"#));
    assert!(!entry.matches(422, "invalid"));
    let any = DropOn {
        status: 413,
        body_contains: None,
    };
    assert!(any.matches(413, ""));
}

#[test]
fn an_action_whose_body_renders_to_nothing_is_not_taken() {
    let c = config(
        "name = \"c\"\nkind = \"http\"\nurl = \"http://h/\"\n\
         [[actions]]\nname = \"anon\"\nbody = \"{{ {'a': anonymousId} if anonymousId }}\"\n\
         [[actions]]\nname = \"user\"\nbody = { u = \"{{ userId }}\" }\n",
    );
    let compiled = c.compile().unwrap();
    let Preview::Send(shown) = send::preview(&compiled, MESSAGE.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(shown["requests"][0]["action"], "user");
    assert_eq!(shown["requests"][0]["body"], json!({"u": "u 1"}));
    let anon = r#"{"type":"track","anonymousId":"a1"}"#;
    let Preview::Send(shown) = send::preview(&compiled, anon.as_bytes()) else {
        panic!("sent");
    };
    assert_eq!(shown["requests"][0]["action"], "anon");
}
