use super::*;
use crate::destinations::KindSettings;

const BASE: &str = "name = \"archive\"\nkind = \"s3\"\nbucket = \"events\"\n\
    region = \"eu-west-1\"\naccess_key_id_env = \"K\"\nsecret_access_key_env = \"S\"\n";

fn parse(extra: &str) -> Result<DestinationConfig, KeyError> {
    let table: toml::Table = toml::from_str(&format!("{BASE}{extra}")).unwrap();
    let config = DestinationConfig::from_table(table)?;
    config.validate()?;
    Ok(config)
}

fn own(config: &DestinationConfig) -> &S3Config {
    match &config.settings {
        KindSettings::S3(own) => own,
        other => panic!("{other:?}"),
    }
}

#[test]
fn reads_the_keys_with_their_defaults() {
    let d = parse("endpoint = \"https://s3.eu-west-1.amazonaws.com\"\n").unwrap();
    let s3 = own(&d);
    assert_eq!(s3.prefix, "segment-logs");
    assert_eq!(s3.part_size, 16 * 1024 * 1024);
    assert_eq!(s3.session_token_env, None);
    let limits = d.batch_limits();
    assert_eq!(limits.max_bytes, 64 * 1024 * 1024);
    assert_eq!(limits.max_events, 100_000);
    assert_eq!(limits.linger, std::time::Duration::from_secs(60));
}

#[test]
fn path_style_by_default_only_for_ip_addresses_and_localhost() {
    for (endpoint, path_style) in [
        ("https://s3.eu-west-1.amazonaws.com", false),
        ("http://127.0.0.1:9000", true),
        ("http://[::1]:9000", true),
        ("http://localhost:9000", true),
        ("https://minio.internal", false),
    ] {
        let d = parse(&format!("endpoint = \"{endpoint}\"\n")).unwrap();
        let s3 = own(&d);
        let url = s3.endpoint_url().unwrap();
        assert_eq!(s3.path_style(&url), path_style, "{endpoint}");
        let base = s3.bucket().unwrap().base_url().to_string();
        assert_eq!(base.contains("/events/"), path_style, "{base}");
    }
    let d = parse("endpoint = \"https://minio.internal\"\npath_style = true\n").unwrap();
    let base = own(&d).bucket().unwrap().base_url().to_string();
    assert_eq!(base, "https://minio.internal/events/");
}

#[test]
fn check_names_the_key_at_fault() {
    let cases = [
        ("endpoint = \"ftp://h\"\n", "endpoint"),
        ("endpoint = \"http://h\"\nbucket2 = \"x\"\n", "bucket2"),
        ("endpoint = \"http://h\"\nprefix = \"a/../b\"\n", "prefix"),
        ("endpoint = \"http://h\"\nprefix = \"a b\"\n", "prefix"),
        ("endpoint = \"http://h\"\npart_size = 1024\n", "part_size"),
        (
            "endpoint = \"http://127.0.0.1:9000\"\npath_style = false\n",
            "path_style",
        ),
        (
            "endpoint = \"http://h\"\nsession_token_env = \"\"\n",
            "session_token_env",
        ),
    ];
    for (extra, key) in cases {
        let e = parse(extra).unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
    }
    let table: toml::Table =
        toml::from_str("name = \"a\"\nkind = \"s3\"\nbucket = \"Events!\"\nendpoint = \"http://h\"\nregion = \"r\"\naccess_key_id_env = \"K\"\nsecret_access_key_env = \"S\"\n").unwrap();
    let e = DestinationConfig::from_table(table)
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(e.key, "bucket");
    let table: toml::Table =
        toml::from_str("name = \"a\"\nkind = \"s3\"\nbucket = \"b\"\n").unwrap();
    let e = DestinationConfig::from_table(table).unwrap_err();
    assert!(e.message.contains("`s3` needs"), "{e}");
}

#[test]
fn route_shows_the_object_a_message_goes_to() {
    let d = parse("endpoint = \"http://127.0.0.1:9000\"\nprefix = \"raw\"\n").unwrap();
    let message = br#"{"type":"track","event":"E","receivedAt":"2026-12-07T05:20:00.123Z"}"#;
    let Preview::Send(shown) = d.settings.preview("web", message, Clock::system()).unwrap() else {
        panic!("an archive takes every message");
    };
    let key = shown["key"].as_str().unwrap();
    assert!(
        key.starts_with("raw/web/1796601600000/20261207T052000.123Z-") && key.ends_with(".gz"),
        "{key}"
    );
    assert_eq!(shown["bucket"], "events");
    assert_eq!(shown["line"]["event"], "E");
}

#[test]
fn secrets_come_from_the_environment() {
    let table: toml::Table = toml::from_str(
        "name = \"a\"\nkind = \"s3\"\nbucket = \"events\"\nendpoint = \"http://127.0.0.1:9000\"\n\
         region = \"r\"\naccess_key_id_env = \"FANOUT_S3_TEST_UNSET_KEY\"\n\
         secret_access_key_env = \"FANOUT_S3_TEST_UNSET_SECRET\"\n",
    )
    .unwrap();
    let e = DestinationConfig::from_table(table)
        .unwrap()
        .try_build()
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("FANOUT_S3_TEST_UNSET_KEY"), "{e}");
}
