//! `preset = "NAME"`: a destination table shipped in the binary (`presets/NAME.toml` at
//! the repository root), merged under the user's keys before anything is parsed, so that
//! every key of a preset can be overridden and is checked as if the user had written it.
//!
//! A preset file is `preset.*` keys (what it is, the vendor's docs, the settings it
//! needs: removed before the merge) and ordinary destination keys.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::destinations::KeyError;

/// Every preset: its name and its file, embedded.
pub const PRESETS: &[(&str, &str)] = &[
    ("amplitude", include_str!("../../../presets/amplitude.toml")),
    ("mixpanel", include_str!("../../../presets/mixpanel.toml")),
    ("posthog", include_str!("../../../presets/posthog.toml")),
    ("ga4", include_str!("../../../presets/ga4.toml")),
    ("meta_capi", include_str!("../../../presets/meta_capi.toml")),
    (
        "customerio",
        include_str!("../../../presets/customerio.toml"),
    ),
    ("braze", include_str!("../../../presets/braze.toml")),
];

/// A preset file's `[preset]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// One line: what the preset sends where.
    pub description: String,
    /// The vendor's API documentation.
    pub docs: String,
    /// Setting name → its meaning: each must be set as `settings.NAME` or `NAME_env`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Same shape: settings the preset reads when given.
    #[serde(default)]
    pub optional_settings: BTreeMap<String, String>,
}

/// A preset's file as shipped.
pub fn source(name: &str) -> Option<&'static str> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// Name and description of every preset, for `fanout presets`.
pub fn list() -> Vec<(&'static str, String)> {
    PRESETS
        .iter()
        .map(|(name, text)| {
            let description =
                parse(name, text).map_or_else(|e| e.message, |(meta, _)| meta.description);
            (*name, description)
        })
        .collect()
}

/// A destination table with its `preset` expanded: the preset's keys under the user's.
/// A table without `preset` comes back as it was.
pub fn expand(mut table: toml::Table) -> Result<toml::Table, KeyError> {
    let Some(name) = table.remove("preset") else {
        return Ok(table);
    };
    let Some(name) = name.as_str() else {
        return Err(KeyError::new("preset", "a preset name, e.g. \"amplitude\""));
    };
    let Some(text) = source(name) else {
        let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(KeyError::new(
            "preset",
            format!("unknown preset `{name}`; known: {}", known.join(", ")),
        ));
    };
    apply(name, text, table)
}

/// Merges `user` over the preset `name` (its file `text`) and checks its settings.
fn apply(name: &str, text: &str, user: toml::Table) -> Result<toml::Table, KeyError> {
    let (meta, mut merged) = parse(name, text)?;
    if let (Some(theirs), Some(ours)) = (user.get("kind"), merged.get("kind")) {
        if theirs != ours {
            return Err(KeyError::new(
                "kind",
                format!("the preset `{name}` is of kind {ours}: leave `kind` out"),
            ));
        }
    }
    merge(&mut merged, user);
    check_settings(name, &meta, merged.get("settings"))?;
    Ok(merged)
}

/// The preset's meta table and its destination keys.
fn parse(name: &str, text: &str) -> Result<(Meta, toml::Table), KeyError> {
    // A shipped file that does not parse is a bug the unit tests catch; say whose it is.
    let broken = |e: String| KeyError::new("preset", format!("the preset `{name}` is broken: {e}"));
    let mut table: toml::Table = toml::from_str(text).map_err(|e| broken(e.to_string()))?;
    let meta = table
        .remove("preset")
        .ok_or_else(|| broken("no [preset] table".into()))?;
    let meta = Meta::deserialize(meta).map_err(|e| broken(e.to_string()))?;
    Ok((meta, table))
}

/// `over`'s keys into `base`: tables merged key by key, any other value replaced whole.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Every required setting given (as `NAME` or `NAME_env`), and no setting the preset does
/// not read.
fn check_settings(
    preset: &str,
    meta: &Meta,
    settings: Option<&toml::Value>,
) -> Result<(), KeyError> {
    let empty = toml::Table::new();
    let settings = match settings {
        None => &empty,
        Some(toml::Value::Table(table)) => table,
        Some(_) => return Err(KeyError::new("settings", "a table: setting name → value")),
    };
    for (name, meaning) in &meta.settings {
        if !settings.contains_key(name) && !settings.contains_key(&format!("{name}_env")) {
            return Err(KeyError::new(
                format!("settings.{name}"),
                format!(
                    "the preset `{preset}` needs `settings.{name}` (or `{name}_env`, an \
                     environment variable): {meaning}"
                ),
            ));
        }
    }
    for key in settings.keys() {
        let name = key.strip_suffix("_env").unwrap_or(key);
        if !meta.settings.contains_key(name) && !meta.optional_settings.contains_key(name) {
            let known: Vec<&str> = meta
                .settings
                .keys()
                .chain(meta.optional_settings.keys())
                .map(String::as_str)
                .collect();
            return Err(KeyError::new(
                format!("settings.{key}"),
                format!(
                    "the preset `{preset}` has no setting `{name}`; it reads: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESET: &str = r#"
preset.description = "Test events to a test API"
preset.docs = "https://example.com/docs"
preset.settings.api_key = "the project's API key"
preset.optional_settings.region = "`eu` for the EU region"

kind = "http"
base_url = "https://api.example.com"
batch = { max_events = 50, body = { events = "{{ batch }}" } }
headers = { "X-Client" = "fanout", "X-Other" = "x" }

[[actions]]
name = "track"
path = "/track"
body = { event = "{{ event }}" }
"#;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    fn user(text: &str) -> toml::Table {
        table(&format!("name = \"d\"\n{text}"))
    }

    #[test]
    fn every_shipped_preset_parses_and_passes_check() {
        for (name, text) in PRESETS {
            let (meta, keys) = parse(name, text).unwrap();
            assert!(!meta.description.is_empty() && meta.docs.starts_with("https://"));
            assert_eq!(keys["kind"].as_str(), Some("http"), "{name}");
            let mut settings = toml::Table::new();
            for setting in meta.settings.keys() {
                settings.insert(format!("{setting}_env"), "SOME_VAR".into());
            }
            let mut destination = user(&format!("preset = \"{name}\""));
            destination.insert("settings".into(), settings.into());
            let config = crate::destinations::DestinationConfig::from_table(destination)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn the_users_keys_win_and_tables_merge_key_by_key() {
        let merged = apply(
            "test",
            PRESET,
            user(
                r#"settings = { api_key_env = "K" }
base_url = "http://127.0.0.1:9"
batch = { max_events = 10 }
headers = { "X-Client" = "mine" }"#,
            ),
        )
        .unwrap();
        assert_eq!(merged["base_url"].as_str(), Some("http://127.0.0.1:9"));
        assert_eq!(merged["batch"]["max_events"].as_integer(), Some(10));
        assert!(merged["batch"]["body"].is_table(), "kept from the preset");
        assert_eq!(merged["headers"]["X-Client"].as_str(), Some("mine"));
        assert_eq!(merged["headers"]["X-Other"].as_str(), Some("x"));
        assert_eq!(merged["kind"].as_str(), Some("http"));
        assert_eq!(merged["name"].as_str(), Some("d"));
        assert!(
            !merged.contains_key("preset"),
            "the meta table is not a key"
        );
    }

    #[test]
    fn arrays_are_replaced_whole() {
        let merged = apply(
            "test",
            PRESET,
            user(
                r#"settings = { api_key = "k" }
[[actions]]
path = "/mine""#,
            ),
        )
        .unwrap();
        let actions = merged["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].get("name"), None);
        assert_eq!(actions[0]["path"].as_str(), Some("/mine"));
    }

    #[test]
    fn a_table_without_preset_is_left_as_it_is() {
        let t = user("kind = \"http\"\nurl = \"https://x\"");
        assert_eq!(expand(t.clone()).unwrap(), t);
    }

    #[test]
    fn errors_name_the_key() {
        let e = expand(user("preset = \"nope\"")).unwrap_err();
        assert_eq!(e.key, "preset");
        assert!(e.message.contains("known: amplitude, mixpanel"), "{e}");

        let e = expand(user("preset = 3")).unwrap_err();
        assert_eq!(e.key, "preset");

        let e = apply("test", PRESET, user("kind = \"webhook\"")).unwrap_err();
        assert_eq!(e.key, "kind");
        assert!(e.message.contains("\"http\""), "{e}");
        assert!(apply(
            "test",
            PRESET,
            user("kind = \"http\"\nsettings = { api_key = \"k\" }")
        )
        .is_ok());

        let e = apply("test", PRESET, user("")).unwrap_err();
        assert_eq!(e.key, "settings.api_key");
        assert!(e.message.contains("the project's API key"), "{e}");

        let e = apply(
            "test",
            PRESET,
            user("settings = { api_key = \"k\", regoin = \"eu\" }"),
        )
        .unwrap_err();
        assert_eq!(e.key, "settings.regoin");
        assert!(e.message.contains("api_key, region"), "{e}");

        let e = apply("test", PRESET, user("settings = \"k\"")).unwrap_err();
        assert_eq!(e.key, "settings");
    }

    #[test]
    fn a_preset_key_overridden_is_checked_as_the_users() {
        let mut t =
            user("preset = \"amplitude\"\nsettings = { api_key = \"k\" }\nbase_url = \"ftp://x\"");
        t.insert("kind".into(), "http".into());
        let e = crate::destinations::DestinationConfig::from_table(t)
            .and_then(|d| d.validate().map(|()| d))
            .unwrap_err();
        assert_eq!(e.key, "base_url");
    }

    #[test]
    fn the_list_has_every_preset_with_its_description() {
        let listed = list();
        assert_eq!(listed.len(), PRESETS.len());
        assert!(
            listed.iter().all(|(_, d)| !d.contains("broken")),
            "{listed:?}"
        );
    }
}
