//! `fanout check`: validates a config without starting, naming key and line on error.

use std::io::Write;
use std::process::{Command, Stdio};

fn check(config: &str) -> (bool, String, String) {
    check_with_env(config, &[])
}

/// `fanout check` of `config` with `env` set.
fn check_with_env(config: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Each config is refused, naming its key and line.
fn assert_refused(cases: &[(String, &str, &str)]) {
    for (config, key, line) in cases {
        let (ok, _, stderr) = check(config);
        assert!(!ok, "should fail: {config}");
        assert!(
            stderr.contains(key) && stderr.contains(line),
            "want {key} at {line}: {stderr}"
        );
    }
}

#[test]
fn the_shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 sources, 1 destinations"));
    // The file may also be given as the argument of `check`.
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn errors_name_the_key_and_line() {
    let good = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/x\"\n";
    assert!(check(good).0);
    let cases = [
        (good.replace("listen", "lisen"), "server.lisen", "line 2"),
        (
            good.replace("kind = \"file\"", "kind = \"carrier-pigeon\""),
            "destinations[0].kind",
            "line 10",
        ),
        (
            good.replace("name = \"f\"", "name = \"a/b\""),
            "destinations[0].name",
            "line 9",
        ),
        (
            good.replace("[\"k\"]", "[\"\"]"),
            "sources[0].write_keys[0]",
            "line 6",
        ),
        (
            good.replace("\"127.0.0.1:1\"", "\"localhost\""),
            "server.listen",
            "line 2",
        ),
        (
            format!("{good}\n[[sources]]\nname = \"web\"\n"),
            "sources[1].name",
            "line 14",
        ),
        ("[server\n".to_string(), "", "line 1"),
        (
            good.replace("[server]\n", "[server]\nbody_timeout = 30\n"),
            "server.body_timeout",
            "line 2",
        ),
        (
            good.replace("[server]\n", "[server]\nretry_after = \"0s\"\n"),
            "server.retry_after",
            "line 2",
        ),
        // Deeper than every stage can read (serde_json stops at 128 levels).
        (
            format!("{good}\n[limits]\nmax_json_depth = 200\n"),
            "limits.max_json_depth",
            "line 14",
        ),
        (
            good.replace(
                "[server]\n",
                "[server]\ntrusted_proxies = [\"10.0.0.0/8\",\n  \"10.0.0/8\"]\n",
            ),
            "server.trusted_proxies[1]",
            "line 3",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn renamed_duration_keys_name_the_new_key() {
    let (ok, _, stderr) = check("[server]\nlisten = \"127.0.0.1:1\"\nshutdown_grace_secs = 10\n");
    assert!(!ok);
    assert!(
        stderr.contains(
            "`server.shutdown_grace_secs` (line 3): `server.shutdown_grace_secs` was renamed: \
             use `shutdown_grace = \"10s\"`"
        ),
        "{stderr}"
    );
    let (ok, _, stderr) = check("[cors]\nmax_age_secs = 600\n");
    assert!(!ok);
    assert!(
        stderr.contains("was renamed: use `max_age = \"10m\"`"),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["check", "--config", "/nonexistent/fanout.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn a_config_without_sources_is_refused() {
    for config in [
        "",
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/x\"\n",
    ] {
        let (ok, stdout, stderr) = check(config);
        assert!(!ok, "accepted: {stdout}");
        assert!(stderr.contains("`sources`"), "{stderr}");
        assert!(stderr.contains("401"), "{stderr}");
    }
}

#[test]
fn the_queue_section_is_checked_without_connecting() {
    let good = "[queue]\nbackend = \"nats\"\nservers = [\"nats://127.0.0.1:1\"]\nreplicas = 3\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"hook\"\nkind = \"file\"\npath = \"/tmp/x\"\n";
    // Nothing listens on port 1: `check` validates, it does not connect.
    let (ok, _, stderr) = check(good);
    assert!(ok, "{stderr}");
    let cases = [
        (
            good.replace("servers = [\"nats://127.0.0.1:1\"]\n", ""),
            "queue.servers",
            "line 1",
        ),
        (
            good.replace("nats://127.0.0.1:1", "nats://:x"),
            "queue.servers[0]",
            "line 3",
        ),
        (
            good.replace("replicas = 3", "replicas = 7"),
            "queue.replicas",
            "line 4",
        ),
        (
            good.replace("replicas = 3", "replica = 3"),
            "queue.replica",
            "line 4",
        ),
        (
            good.replace("replicas = 3", "ack_wait = 30"),
            "queue.ack_wait",
            "line 4",
        ),
        (
            good.replace("backend = \"nats\"", "backend = \"kafka\""),
            "queue.backend",
            "line 2",
        ),
        (
            good.replace("name = \"hook\"", "name = \"hook.v2\""),
            "destinations[0].name",
            "line 11",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn the_dead_letters_section_is_checked() {
    let good = "[server]\nmax_queue_bytes = 1073741824\n\n[dead_letters]\nmax_bytes = 1048576\nretention = \"14d\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n";
    let (ok, _, stderr) = check(good);
    assert!(ok, "{stderr}");
    let cases = [
        (
            good.replace("retention = \"14d\"", "retention = \"0s\""),
            "dead_letters.retention",
            "line 6",
        ),
        (
            good.replace("retention = \"14d\"", "retention = 14"),
            "dead_letters.retention",
            "line 6",
        ),
        (
            good.replace("max_bytes = 1048576", "max_bytes = 1024"),
            "dead_letters.max_bytes",
            "line 5",
        ),
        // The queue keeps less than twice a 64 MiB segment beside them.
        (
            good.replace("max_bytes = 1048576", "max_bytes = 1000000000"),
            "dead_letters.max_bytes",
            "line 5",
        ),
        (
            good.replace("max_bytes = 1048576", "max_byte = 1048576"),
            "dead_letters.max_byte",
            "line 5",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn a_write_key_the_environment_shares_with_another_source_is_refused() {
    let config = "[[sources]]\nname = \"web\"\nwrite_keys = [\"secret-shared\"]\n\n\
                  [[sources]]\nname = \"app\"\nwrite_keys_env = \"FANOUT_TEST_CHECK_KEYS\"\n";
    let (ok, _, stderr) = check_with_env(config, &[("FANOUT_TEST_CHECK_KEYS", "k2,secret-shared")]);
    assert!(!ok, "accepted");
    assert!(
        stderr.contains("`sources[1].write_keys_env`")
            && stderr.contains("source `app`")
            && stderr.contains("source `web`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret-shared"),
        "the key is not shown: {stderr}"
    );
    let (ok, _, stderr) = check_with_env(config, &[("FANOUT_TEST_CHECK_KEYS", "k2")]);
    assert!(ok, "{stderr}");
}

#[test]
fn a_closed_standard_output_ends_commands_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n\
         [[destinations]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/x\"\n",
    )
    .unwrap();
    let message = br#"{"type": "track", "event": "E", "userId": "u"}"#;
    for (command, input) in [("check", None), ("route", Some(message))] {
        // The reader is gone before the command writes: `fanout route | head -0`.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .arg(command)
            .arg("--config")
            .arg(&path)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            // `route` reads all of it before it writes anything.
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {}: {stderr}", out.status);
        assert_eq!(stderr, "", "{command}");
    }
}

#[test]
fn klaviyo_metric_names_are_checked_with_their_key() {
    let klaviyo = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"kl\"\nkind = \"klaviyo\"\napi_key_env = \"KL_KEY\"\necommerce_names = false\nmetric_names = { \"Signed Up\" = \"Registered\" }\n";
    let env = [("KL_KEY", "pk_test")];
    let (ok, _, stderr) = check_with_env(klaviyo, &env);
    assert!(ok, "{stderr}");
    let twice = format!("{klaviyo}mapping = {{ events = {{ \"Signed Up\" = false }} }}\n");
    let (ok, _, stderr) = check_with_env(&twice, &env);
    assert!(!ok, "a rule in both tables");
    assert!(
        stderr.contains("metric_names.\"Signed Up\"") && stderr.contains("mapping.events"),
        "{stderr}"
    );
    let empty = klaviyo.replace("\"Registered\"", "\"\"");
    let (ok, _, stderr) = check_with_env(&empty, &env);
    assert!(!ok, "an empty metric name");
    assert!(stderr.contains("metric_names"), "{stderr}");
}

#[test]
fn the_postgres_section_is_checked_with_key_paths() {
    let good = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[sources]]\nname = \"web\"\nwrite_keys = [\"k\"]\n\n[[destinations]]\nname = \"wh\"\nkind = \"postgres\"\nurl_env = \"WH_URL\"\nschema = \"{source}\"\n";
    assert!(check(good).0, "{}", check(good).2);
    let cases = [
        (
            good.replace("\"{source}\"", "\"Web App\""),
            "destinations[0].schema",
            "line 12",
        ),
        (
            good.replace("url_env = \"WH_URL\"\n", ""),
            "destinations[0].url_env",
            "",
        ),
        (
            good.replace("schema =", "tabel ="),
            "destinations[0].tabel",
            "line 12",
        ),
        (
            format!("{good}batch = {{ max_events = 200000 }}\n"),
            "destinations[0].batch.max_events",
            "line 13",
        ),
    ];
    assert_refused(&cases);
}
