//! `fanout check`: validates a config without starting, naming key and line on error.

use std::process::Command;

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("check")
        .arg("--config")
        .arg(&path)
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
