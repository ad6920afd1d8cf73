//! The keys presets brought to `kind = "http"`, checked: `base_url` + `path` (where each
//! request goes), `settings` (values and secrets templates read) and `drop_on`.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use super::{template, ActionConfig, DropOn, MappedConfig};
use crate::destinations::{check_url, KeyError};

impl MappedConfig {
    /// One action's URL template and the key it comes from: the action's `url` or
    /// `base_url` + `path` before the destination's.
    pub(super) fn url_of(
        &self,
        prefix: &str,
        action: &ActionConfig,
    ) -> Result<(String, String), KeyError> {
        for (at, url, path) in [
            (prefix, &action.url, &action.path),
            ("", &self.url, &self.path),
        ] {
            if url.is_some() && path.is_some() {
                return Err(KeyError::new(
                    format!("{at}path"),
                    "give `url` or `path` (which follows `base_url`), not both",
                ));
            }
        }
        let base = |path_key: String, path: &str| -> Result<(String, String), KeyError> {
            let (base_key, base) = match (&action.base_url, &self.base_url) {
                (Some(base), _) => (format!("{prefix}base_url"), base),
                (None, Some(base)) => ("base_url".to_string(), base),
                (None, None) => {
                    return Err(KeyError::new(path_key, "`path` needs `base_url`"));
                }
            };
            check_base_url(&base_key, base)?;
            // The key names the compiled template: the destination's path after an
            // action's own base_url is another template, under the action's key.
            let key = if base_key.starts_with(prefix) && !prefix.is_empty() && path_key == "path" {
                base_key
            } else {
                path_key
            };
            Ok((key, format!("{}{path}", base.trim_end_matches('/'))))
        };
        match (&action.url, &action.path, &self.url, &self.path) {
            (Some(url), ..) => Ok((format!("{prefix}url"), url.clone())),
            (None, Some(path), ..) => base(format!("{prefix}path"), path),
            (None, None, Some(url), _) => Ok(("url".to_string(), url.clone())),
            (None, None, None, Some(path)) => base("path".to_string(), path),
            (None, None, None, None) => {
                let key = if prefix.is_empty() { "url" } else { "actions" };
                Err(KeyError::new(
                    key,
                    "kind `http` needs `url` or `base_url` + `path` (for the destination, \
                     or for every action)",
                ))
            }
        }
    }
}

/// Scheme, host and maybe a path prefix: no template, query or fragment.
fn check_base_url(key: &str, base: &str) -> Result<(), KeyError> {
    if template::has_template(base) || base.contains(['?', '#']) {
        return Err(KeyError::new(
            key,
            "scheme and host (port, path prefix) only: no template, query or fragment",
        ));
    }
    check_url(key, base)
}

/// The values of `settings`, and NAME → environment variable for each `NAME_env`.
type Settings = (Map<String, Json>, BTreeMap<String, String>);

/// `settings` as templates read them, checked.
pub(super) fn settings(settings: &BTreeMap<String, toml::Value>) -> Result<Settings, KeyError> {
    let (mut values, mut secrets) = (Map::new(), BTreeMap::new());
    for (key, value) in settings {
        let at = format!("settings.{key}");
        match key.strip_suffix("_env") {
            Some(name) => {
                let Some(var) = value.as_str().filter(|v| !v.is_empty()) else {
                    return Err(KeyError::new(at, "the name of an environment variable"));
                };
                if settings.contains_key(name) {
                    return Err(KeyError::new(
                        at,
                        format!("give `{name}` or `{key}`, not both"),
                    ));
                }
                secrets.insert(name.to_string(), var.to_string());
            }
            None => {
                let json = serde_json::to_value(value)
                    .map_err(|e| KeyError::new(at, format!("not a JSON value: {e}")))?;
                values.insert(key.clone(), json);
            }
        }
    }
    Ok((values, secrets))
}

/// `drop_on` or `retry_on` (`key`): 4xx statuses only.
pub(super) fn check_drop_on(key: &str, entries: &[DropOn]) -> Result<(), KeyError> {
    for (i, entry) in entries.iter().enumerate() {
        if !(400..=499).contains(&entry.status) {
            return Err(KeyError::new(
                format!("{key}[{i}].status"),
                "a 4xx status: other answers are delivered, retried or dead-lettered",
            ));
        }
    }
    Ok(())
}
