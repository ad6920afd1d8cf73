//! Config parsing and validation: key paths and lines of errors.

use std::time::Duration;

use super::*;
use crate::queue::QueueBackend;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:9000"
data_dir = "/tmp/x"

[[sources]]
name = "web"
write_keys = ["k1"]

[[destinations]]
name = "out"
kind = "file"
path = "/tmp/x/out.jsonl"
"#;

#[test]
fn parses_the_documented_keys() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.server.listen.port(), 9000);
    assert_eq!(c.sources[0].write_keys, vec!["k1"]);
    assert_eq!(c.limits.max_message_bytes, 32 * 1024);
    assert_eq!(c.destinations[0].kind(), "file");
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = GOOD.replace("data_dir", "data_dri");
    let e = Config::parse(&text).unwrap_err();
    assert!(e.message.contains("data_dri"), "{e}");
    assert_eq!(e.key, "server.data_dri");
    assert_eq!(e.line, Some(4), "{e}");
}

#[test]
fn unknown_destination_key_is_located() {
    let text = GOOD.replace("path = ", "pth = ");
    let e = Config::parse(&text).unwrap_err();
    assert!(e.to_string().contains("destinations[0]"), "{e}");
    assert!(e.message.contains("pth"), "{e}");
    assert!(e.line.is_some_and(|l| l >= 10), "{e}");
}

#[test]
fn duplicate_write_key_is_refused_with_line() {
    let text = format!("{GOOD}\n[[sources]]\nname = \"app\"\nwrite_keys = [\"k1\"]\n");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "sources[1].write_keys[0]");
    assert_eq!(e.line, Some(17), "{e}");
}

#[test]
fn bad_value_type_names_the_key() {
    let text = GOOD.replace("\"127.0.0.1:9000\"", "9000");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "server.listen", "{e}");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn json_depth_is_bounded_by_what_every_stage_reads() {
    let with_depth =
        |depth: usize| Config::parse(&format!("{GOOD}\n[limits]\nmax_json_depth = {depth}\n"));
    for depth in [1, 64, MAX_JSON_DEPTH] {
        assert_eq!(with_depth(depth).unwrap().limits.max_json_depth, depth);
    }
    for depth in [0, MAX_JSON_DEPTH + 1, 200] {
        let e = with_depth(depth).unwrap_err();
        assert_eq!(e.key, "limits.max_json_depth", "{e}");
        assert_eq!(e.line, Some(16), "{e}");
        assert!(e.message.contains("from 1 to 100"), "{e}");
    }
}

fn parse_with(section: &str, lines: &str) -> Result<Config, ConfigError> {
    Config::parse(&GOOD.replacen(
        &format!("[{section}]\n"),
        &format!("[{section}]\n{lines}\n"),
        1,
    ))
}

#[test]
fn durations_have_the_old_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.server.retry_after, Duration::from_secs(1));
    assert_eq!(c.server.retry_after_secs(), 1);
    assert_eq!(c.server.body_timeout, Duration::from_secs(30));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.cors.max_age, Duration::from_secs(86_400));
}

#[test]
fn durations_parse_with_units() {
    let c = parse_with(
        "server",
        "retry_after = \"1m\"\nbody_timeout = \"30s\"\nshutdown_grace = \"1m 30s\"",
    )
    .unwrap();
    assert_eq!(c.server.retry_after_secs(), 60);
    assert_eq!(c.server.body_timeout, Duration::from_secs(30));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(90));
    let c = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"24h\"\n")).unwrap();
    assert_eq!(c.cors.max_age, Duration::from_secs(86_400));
    let c = parse_with("server", "body_timeout = \"250ms\"").unwrap();
    assert_eq!(c.server.body_timeout, Duration::from_millis(250));
}

#[test]
fn a_bare_integer_duration_is_refused_with_key_and_line() {
    let e = parse_with("server", "body_timeout = 30").unwrap_err();
    assert_eq!(e.key, "server.body_timeout", "{e}");
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("\"30s\""), "{e}");
    let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = 86400\n")).unwrap_err();
    assert_eq!(e.key, "cors.max_age", "{e}");
    assert_eq!(e.line, Some(16), "{e}");
}

#[test]
fn duration_bounds_are_checked_with_key_and_line() {
    let cases = [
        ("server", "retry_after = \"0s\"", "server.retry_after"),
        ("server", "retry_after = \"1500ms\"", "server.retry_after"),
        ("server", "retry_after = \"2h\"", "server.retry_after"),
        ("server", "body_timeout = \"0s\"", "server.body_timeout"),
        ("server", "shutdown_grace = \"0s\"", "server.shutdown_grace"),
    ];
    for (section, lines, key) in cases {
        let e = parse_with(section, lines).unwrap_err();
        assert_eq!(e.key, key, "{lines}: {e}");
        assert_eq!(e.line, Some(3), "{lines}: {e}");
    }
    let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"1.5s\"\n")).unwrap_err();
    assert_eq!(e.key, "cors.max_age", "{e}");
    assert_eq!(e.line, Some(16), "{e}");
    assert!(Config::parse(&format!("{GOOD}\n[cors]\nmax_age = \"0s\"\n")).is_ok());
}

#[test]
fn renamed_keys_say_what_to_write() {
    let e = parse_with("server", "retry_after_secs = 1").unwrap_err();
    assert_eq!(e.key, "server.retry_after_secs");
    assert_eq!(e.line, Some(3), "{e}");
    assert_eq!(
        e.message,
        "`server.retry_after_secs` was renamed: use `retry_after = \"1s\"`"
    );
    let e = parse_with("server", "shutdown_grace_secs = 90").unwrap_err();
    assert_eq!(
        e.message,
        "`server.shutdown_grace_secs` was renamed: use `shutdown_grace = \"90s\"`"
    );
    let e = parse_with("server", "body_timeout_secs = 120").unwrap_err();
    assert_eq!(
        e.message,
        "`server.body_timeout_secs` was renamed: use `body_timeout = \"2m\"`"
    );
    let e = Config::parse(&format!("{GOOD}\n[cors]\nmax_age_secs = 86400\n")).unwrap_err();
    assert_eq!(e.key, "cors.max_age_secs");
    assert_eq!(e.line, Some(16), "{e}");
    assert_eq!(
        e.to_string(),
        "`cors.max_age_secs` (line 16): `cors.max_age_secs` was renamed: use `max_age = \"24h\"`"
    );
    // Not a number: the suggestion falls back to the default.
    let e = parse_with("server", "retry_after_secs = \"x\"").unwrap_err();
    assert!(e.message.ends_with("use `retry_after = \"1s\"`"), "{e}");
}

#[test]
fn errors_do_not_quote_secret_values() {
    let text = GOOD.replace("[\"k1\"]", "\"wk_live_secret\"");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "sources[0].write_keys", "{e}");
    assert!(!e.to_string().contains("wk_live_secret"), "{e}");
    assert!(e.message.contains("expected a sequence"), "{e}");
    let text = format!("{GOOD}headers = \"Authorization: Bearer s3cret\"\n");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "destinations[0].headers", "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    // Other keys still quote what was refused.
    let e = parse_with("server", "body_timeout = \"soon\"").unwrap_err();
    assert!(e.message.contains("\"soon\""), "{e}");
}

#[test]
fn unsafe_destination_name_is_refused() {
    let text = GOOD.replace("name = \"out\"", "name = \"../etc\"");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key, "destinations[0].name");
}

/// A config with sources `web` and `ios` and one file destination ending in `rules`
/// (its first line is line 12).
fn routed(rules: &str) -> Result<Config, ConfigError> {
    Config::parse(&format!(
        "[[sources]]\nname = \"web\"\nwrite_keys = [\"k1\"]\n\n[[sources]]\nname = \"ios\"\n\n\
             [[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/f\"\n{rules}"
    ))
}

#[test]
fn routing_errors_name_key_and_line() {
    let cases = [
        (
            "sources = [\"web\", \"android\"]\n",
            "destinations[0].sources[1]",
            12,
            "android",
        ),
        ("sources = []\n", "destinations[0].sources", 12, "empty"),
        (
            "filter = { types = [\"track\", \"click\"] }\n",
            "destinations[0].filter.types[1]",
            12,
            "click",
        ),
        (
            "filter = { types = [] }\n",
            "destinations[0].filter.types",
            12,
            "empty",
        ),
        (
            "filter = {}\n",
            "destinations[0].filter",
            12,
            "at least one",
        ),
        (
            "filter = { event = [\"x\"] }\n",
            "destinations[0].filter.event",
            12,
            "event",
        ),
        (
            "filter = { events = [\"a\", \"\"] }\n",
            "destinations[0].filter.events[1]",
            12,
            "empty",
        ),
        (
            "[destinations.filter.properties]\nplan = { equals = 1, exists = true }\n",
            "destinations[0].filter.properties.plan",
            13,
            "only one",
        ),
        (
            "[destinations.filter.properties]\nplan = {}\n",
            "destinations[0].filter.properties.plan",
            13,
            "equals",
        ),
        (
            "[destinations.filter.properties]\nplan = { equal = 1 }\n",
            "destinations[0].filter.properties.plan.equal",
            13,
            "equal",
        ),
        (
            "[destinations.filter.properties]\nplan = { equals = nan }\n",
            "destinations[0].filter.properties.plan.equals",
            13,
            "nan",
        ),
        (
            "[destinations.filter.properties]\n\"a..b\" = { exists = true }\n",
            "destinations[0].filter.properties.\"a..b\"",
            12,
            "empty segment",
        ),
        (
            "drop_fields = [\"context.ip\", \"type\"]\n",
            "destinations[0].drop_fields[1]",
            12,
            "type",
        ),
        (
            "drop_fields = [\"\"]\n",
            "destinations[0].drop_fields[0]",
            12,
            "dotted path",
        ),
        (
            "rename = { type = \"kind\" }\n",
            "destinations[0].rename.type",
            12,
            "type",
        ),
        (
            "rename = { \"properties.a\" = \"context.ip\" }\ndrop_fields = [\"context\"]\n",
            "destinations[0].rename.\"properties.a\"",
            12,
            "drop_fields",
        ),
        (
            "rename = { \"context.ip\" = \"properties.ip\" }\ndrop_fields = [\"context.ip\"]\n",
            "destinations[0].rename.\"context.ip\"",
            12,
            "removed",
        ),
        (
            "rename = { a = \"b\", c = \"b.x\" }\n",
            "destinations[0].rename.a",
            12,
            "overlaps",
        ),
        (
            "rename = { a = \"a\" }\n",
            "destinations[0].rename.a",
            12,
            "itself",
        ),
        (
            "rename = { a = \"b.\" }\n",
            "destinations[0].rename.a",
            12,
            "b.",
        ),
    ];
    for (rules, key, line, says) in cases {
        let e = routed(rules).unwrap_err();
        assert_eq!(e.key, key, "{rules}: {e}");
        assert_eq!(e.line, Some(line), "{rules}: {e}");
        assert!(e.message.contains(says), "{rules}: {e}");
    }
}

fn with_queue(lines: &str) -> Result<Config, ConfigError> {
    Config::parse(&format!("{GOOD}\n[queue]\n{lines}\n"))
}

#[test]
fn the_queue_is_local_unless_nats_is_named() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.queue.backend, QueueBackend::Local);
    let c = with_queue(
        "backend = \"nats\"\nservers = [\"nats://n1:4222\", \"tls://n2:4222\"]\nreplicas = 3",
    )
    .unwrap();
    assert_eq!(c.queue.backend, QueueBackend::Nats);
    assert_eq!(c.queue.stream, "fanout");
    assert_eq!(c.queue.replicas, 3);
    assert_eq!(
        c.queue.partitions, None,
        "unset: 32 for a new stream, its own for one there"
    );
    assert_eq!(c.queue.ack_wait, Duration::from_secs(30));
}

#[test]
fn queue_errors_name_key_and_line() {
    let nats = "backend = \"nats\"\n";
    let servers = "servers = [\"nats://127.0.0.1:4222\"]\n";
    let cases = [
        // A missing key points at its section.
        (nats.to_string(), "queue.servers", 15),
        (
            format!("{nats}servers = [\"nats://a:4222\", \"http://b c\"]"),
            "queue.servers[1]",
            17,
        ),
        (
            format!("{nats}{servers}stream = \"a.b\""),
            "queue.stream",
            18,
        ),
        (format!("{nats}{servers}replicas = 0"), "queue.replicas", 18),
        (
            format!("{nats}{servers}partitions = 65"),
            "queue.partitions",
            18,
        ),
        (
            format!("{nats}{servers}ack_wait = \"0s\""),
            "queue.ack_wait",
            18,
        ),
        (
            format!("{nats}{servers}user_env = \"U\""),
            "queue.user_env",
            18,
        ),
        (
            format!("{nats}{servers}backend_x = 1"),
            "queue.backend_x",
            18,
        ),
        (
            format!("{nats}{servers}member_heartbeat = \"0s\""),
            "queue.member_heartbeat",
            18,
        ),
        (
            // Not in the file: the section's line.
            format!("{nats}{servers}member_heartbeat = \"5s\""),
            "queue.member_ttl",
            15,
        ),
    ];
    for (lines, key, line) in cases {
        let e = with_queue(&lines).unwrap_err();
        assert_eq!(e.key, key, "{lines}: {e}");
        assert_eq!(e.line, Some(line), "{lines}: {e}");
    }
}

#[test]
fn on_nats_a_destination_name_cannot_hold_a_dot() {
    let text = GOOD.replace("name = \"out\"", "name = \"out.v2\"");
    assert!(Config::parse(&text).is_ok(), "fine on the local log");
    let e = Config::parse(&format!(
        "{text}\n[queue]\nbackend = \"nats\"\nservers = [\"nats://127.0.0.1:4222\"]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "destinations[0].name", "{e}");
    assert!(e.message.contains("JetStream"), "{e}");
}

#[test]
fn trusted_proxies_are_networks_or_single_addresses() {
    assert!(Config::parse(GOOD)
        .unwrap()
        .server
        .trusted_proxies
        .is_empty());
    let c = parse_with(
        "server",
        r#"trusted_proxies = ["10.1.2.3/8", "192.168.1.7", "fd00::/8"]"#,
    )
    .unwrap();
    let nets: Vec<String> = c
        .server
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]);
    let e = parse_with("server", r#"trusted_proxies = ["10.0.0.0/33"]"#).unwrap_err();
    assert_eq!(e.key, "server.trusted_proxies[0]", "{e}");
    assert!(e.message.contains("`10.0.0.0/33` is not a network"), "{e}");
}

#[test]
fn dead_letters_take_a_tenth_of_the_queue_budget_unless_told() {
    let c = Config::parse(GOOD).unwrap();
    let tenth = c.server.max_queue_bytes / 10;
    assert_eq!(c.dead_letter_bytes(), tenth);
    assert_eq!(c.queue_bytes(), c.server.max_queue_bytes - tenth);
    assert_eq!(c.dead_letters.retention, Duration::from_secs(14 * 86_400));
    let c = Config::parse(&format!(
        "{GOOD}\n[dead_letters]\nmax_bytes = 1048576\nretention = \"2d\"\n"
    ))
    .unwrap();
    assert_eq!(c.dead_letter_bytes(), 1 << 20);
    assert_eq!(c.queue_bytes(), c.server.max_queue_bytes - (1 << 20));
    assert_eq!(c.dead_letters.retention, Duration::from_secs(2 * 86_400));
}

#[test]
fn a_queue_budget_the_dead_letters_leave_too_small_is_refused() {
    // Twice the segment exactly: the dead letters' default tenth leaves too little.
    let e = parse_with(
        "server",
        "segment_bytes = 1048576\nmax_queue_bytes = 2097152",
    )
    .unwrap_err();
    assert_eq!(e.key, "server.max_queue_bytes", "{e}");
    assert!(e.message.contains("dead_letters.max_bytes"), "{e}");
    let e = Config::parse(&format!("{GOOD}\n[dead_letters]\nmax_bytes = 1\n")).unwrap_err();
    assert_eq!(e.key, "dead_letters.max_bytes", "{e}");
    assert_eq!(e.line, Some(16), "{e}");
}

#[test]
fn the_live_view_limits_have_defaults_and_bounds() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.admin.max_viewers, 16);
    assert_eq!(c.admin.viewer_buffer_bytes, 8 * 1024 * 1024);
    let with_admin = |lines: &str| Config::parse(&format!("{GOOD}\n[admin]\n{lines}\n"));
    let c = with_admin("max_viewers = 2\nviewer_buffer_bytes = 65536").unwrap();
    assert_eq!(c.admin.max_viewers, 2);
    assert_eq!(c.admin.viewer_buffer_bytes, 65536);
    for (lines, key) in [
        ("max_viewers = 0", "admin.max_viewers"),
        ("viewer_buffer_bytes = 1000", "admin.viewer_buffer_bytes"),
        ("max_viewer = 3", "admin.max_viewer"),
    ] {
        let e = with_admin(lines).unwrap_err();
        assert_eq!(e.key, key, "{lines}: {e}");
        assert!(e.line.is_some(), "{lines}: {e}");
    }
}

#[test]
fn a_source_function_takes_a_file_or_a_sandbox_table() {
    let plain = GOOD.replace(
        "write_keys = [\"k1\"]",
        "write_keys = [\"k1\"]\nfunction = \"functions/a.js\"",
    );
    let c = Config::parse(&plain).unwrap();
    let function = c.sources[0].function.as_ref().unwrap();
    assert_eq!(function.file, "functions/a.js");
    assert_eq!(function.timeout, None);

    let table = GOOD.replace(
        "write_keys = [\"k1\"]",
        "write_keys = [\"k1\"]\nfunction = { file = \"functions/a.js\", timeout = \"250ms\", \
         memory_limit = 2097152, allow_hosts = [\"127.0.0.1\"], \
         fetch_hosts = { \"api.example.com\" = \"http://127.0.0.1:9\" }, \
         settings = { key_env = \"K\" } }",
    );
    let c = Config::parse(&table).unwrap();
    let function = c.sources[0].function.as_ref().unwrap();
    assert_eq!(function.timeout, Some(Duration::from_millis(250)));
    assert_eq!(function.memory_limit, Some(2 * 1024 * 1024));
    assert_eq!(function.allow_hosts, ["127.0.0.1"]);
    assert_eq!(function.settings["key_env"], "K");
}

#[test]
fn a_source_function_s_sandbox_errors_name_their_key() {
    let with = |function: &str| {
        let text = GOOD.replace(
            "write_keys = [\"k1\"]",
            &format!("write_keys = [\"k1\"]\n{function}"),
        );
        Config::parse(&text).unwrap_err()
    };
    let e = with("function = { file = \"a.js\", timout = \"1s\" }");
    assert_eq!(e.key, "sources[0].function.timout", "{e}");
    assert!(e.message.contains("timout"), "{e}");
    let e = with("function = { file = \"a.js\", memory_limit = 1000 }");
    assert_eq!(e.key, "sources[0].function.memory_limit", "{e}");
    let e = with("function = { file = \"a.js\", timeout = \"0s\" }");
    assert_eq!(e.key, "sources[0].function.timeout", "{e}");
    let e = with("function = { file = \"a.js\", fetch_hosts = { \"a.com\" = \"ftp://x\" } }");
    assert_eq!(e.key, "sources[0].function.fetch_hosts.a.com", "{e}");
    let e = with("function = { settings = {} }");
    assert!(e.message.contains("file"), "{e}");
    let e = with("function = 3");
    assert_eq!(e.key, "sources[0].function", "{e}");
    let e =
        with("function = { file = \"a.js\", settings = { a = 1 } }\nfunction_settings = { b = 2 }");
    assert_eq!(e.key, "sources[0].function_settings", "{e}");
    assert!(e.message.contains("not both"), "{e}");
}

#[test]
fn an_insert_function_s_sandbox_errors_name_their_key() {
    let with = |insert: &str| {
        let text = format!("{GOOD}insert_function = {insert}\n");
        Config::parse(&text).unwrap_err()
    };
    let e = with("{ file = \"a.js\", memory_limit = 1000 }");
    assert_eq!(e.key, "destinations[0].insert_function.memory_limit", "{e}");
    let e = with("{ file = \"a.js\", timeout = \"2h\" }");
    assert_eq!(e.key, "destinations[0].insert_function.timeout", "{e}");
    let e = with("{ file = \"a.js\", allow = [] }");
    assert_eq!(e.key, "destinations[0].insert_function.allow", "{e}");
    // The file is read once the keys are right: its error is the table's.
    let e = with("{ file = \"no/such/file.js\", timeout = \"1s\" }");
    assert_eq!(e.key, "destinations[0].insert_function", "{e}");
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn identity_section_and_enrich_identity_defaults_and_errors() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.identity, IdentityConfig::default());
    assert_eq!(c.identity.ttl, Duration::from_secs(90 * 24 * 3600));
    assert!(
        !c.destinations[0].enrich_identity,
        "off for kinds other than klaviyo"
    );
    let klaviyo = "\n[[destinations]]\nname = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"K\"\n";
    let c = Config::parse(&format!("{GOOD}{klaviyo}")).unwrap();
    assert!(c.destinations[1].enrich_identity, "on for klaviyo");
    let c = Config::parse(&format!("{GOOD}{klaviyo}enrich_identity = false\n")).unwrap();
    assert!(!c.destinations[1].enrich_identity);
    let c = Config::parse(&format!("{GOOD}enrich_identity = true\n")).unwrap();
    assert!(c.destinations[0].enrich_identity);

    let cases = [
        ("[identity]\nttl = \"0s\"\n", "identity.ttl"),
        ("[identity]\nmax_entries = 0\n", "identity.max_entries"),
        ("[identity]\nbackend = \"redis\"\n", "identity.backend"),
        ("[identity]\nbackend = \"disk\"\n", "identity.backend"),
        ("[identity]\nmax_entry = 5\n", "identity.max_entry"),
    ];
    for (section, key) in cases {
        let e = Config::parse(&format!("{section}{GOOD}")).unwrap_err();
        assert_eq!(e.key, key, "{section}: {e}");
    }
    let e = Config::parse(&format!("{GOOD}enrich_identity = \"yes\"\n")).unwrap_err();
    assert!(e.to_string().contains("enrich_identity"), "{e}");
}

#[test]
fn quota_and_sample_errors_name_their_key_and_line() {
    let with_source = |lines: &str| {
        let text = GOOD.replace(
            "write_keys = [\"k1\"]",
            &format!("write_keys = [\"k1\"]\n{lines}"),
        );
        Config::parse(&text)
    };
    let c = with_source("rate_limit = { events_per_second = 1000, burst = 5000 }").unwrap();
    let quota = c.sources[0].rate_limit.as_ref().unwrap();
    assert_eq!((quota.events_per_second, quota.burst()), (1000.0, 5000));
    let e = with_source("rate_limit = { events_per_second = 0 }").unwrap_err();
    assert_eq!(e.key, "sources[0].rate_limit.events_per_second", "{e}");
    assert!(e.line.is_some(), "{e}");
    let e = with_source("rate_limit = { events_per_second = 5, burst = 0 }").unwrap_err();
    assert_eq!(e.key, "sources[0].rate_limit.burst", "{e}");
    let e = with_source("rate_limit = { events_per_second = 5, bursts = 9 }").unwrap_err();
    assert_eq!(e.key, "sources[0].rate_limit.bursts", "{e}");

    let e = routed("sample = 1.5\n").unwrap_err();
    assert_eq!(e.key, "destinations[0].sample", "{e}");
    assert_eq!(e.line, Some(12), "{e}");
    assert_eq!(
        routed("sample = 0.25\n").unwrap().destinations[0]
            .route
            .sample,
        Some(0.25)
    );
}
