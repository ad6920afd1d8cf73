//! A function's sandbox as configured: its file, its `settings`, the hosts its `fetch`
//! may reach, its time and memory limits. One struct for the three places a function
//! runs (a `kind = "function"` destination, a destination's `insert_function`, a
//! source's `function`), so the keys mean the same everywhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{Function, HostPolicy, Options};

/// The smallest `memory_limit`: QuickJS needs about this much to start at all.
const MIN_MEMORY_LIMIT: u64 = 1024 * 1024;
/// The longest `timeout`: a call holds its function's thread that long.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// `{ file = "…", settings = {…}, allow_hosts = […], fetch_hosts = {…}, timeout = "5s",
/// memory_limit = … }`; for a destination function these keys sit in its own table
/// (and `timeout` is the destination's shared key).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSandbox {
    /// The JavaScript file, relative to the config file's directory.
    pub file: String,
    /// Handed to each handler as `settings`; a key ending in `_env` names an environment
    /// variable, passed under the key without the suffix.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Hosts `fetch` may reach; default any public host (never loopback or private
    /// addresses unless listed here).
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Host → base URL its `fetch` requests go to instead; the code sees its own URL.
    #[serde(default)]
    pub fetch_hosts: BTreeMap<String, String>,
    /// The time limit of one call (default 5 s).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Bytes the function's JavaScript heap may use (default 64 MiB).
    pub memory_limit: Option<u64>,
    /// The file's text, read when the config is loaded: a reload that finds the file
    /// changed sees a changed config.
    #[serde(skip)]
    pub source: Option<String>,
}

/// A started function and the `settings` its handlers get.
pub struct Sandboxed {
    pub function: Function,
    /// `settings` as JSON text, the environment's values in.
    pub settings: String,
}

impl FunctionSandbox {
    /// Only a file: the runtime's defaults for the rest.
    pub fn file(file: impl Into<String>) -> FunctionSandbox {
        FunctionSandbox {
            file: file.into(),
            ..FunctionSandbox::default()
        }
    }

    /// Checks what serde cannot; the error is (key relative to the sandbox, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.memory_limit.is_some_and(|m| m < MIN_MEMORY_LIMIT) {
            return Err((
                "memory_limit".into(),
                format!("must be at least 1 MiB ({MIN_MEMORY_LIMIT})"),
            ));
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > MAX_TIMEOUT {
                return Err((
                    "timeout".into(),
                    "must be more than 0 and at most 3600s".into(),
                ));
            }
        }
        for (host, base) in &self.fetch_hosts {
            let parsed = reqwest::Url::parse(base);
            let http = parsed
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !http {
                // The value is not quoted: a URL may carry a token.
                return Err((
                    format!("fetch_hosts.{host}"),
                    "is not an http(s) URL".into(),
                ));
            }
        }
        Ok(())
    }

    /// Reads the file (relative to `dir`) and checks its syntax.
    pub fn load(&mut self, dir: &Path) -> Result<(), String> {
        self.source = Some(super::read_script(&dir.join(&self.file), &self.file)?);
        Ok(())
    }

    /// `settings` with the environment's values in; the error names the key and the
    /// variable, never a value.
    pub fn settings(&self) -> Result<serde_json::Value, String> {
        super::settings_from(&self.settings, |var| {
            std::env::var(var).ok().filter(|v| !v.is_empty())
        })
    }

    /// The runtime's options; `timeout` wins over the sandbox's own (a destination
    /// function's shared key).
    pub fn options(&self, timeout: Option<Duration>) -> Options {
        Options {
            name: self.file.clone(),
            timeout: timeout.or(self.timeout).unwrap_or(super::DEFAULT_TIMEOUT),
            memory_limit: self.memory_limit.unwrap_or(super::DEFAULT_MEMORY_LIMIT),
            hosts: HostPolicy {
                allow: self.allow_hosts.clone(),
                remap: self
                    .fetch_hosts
                    .iter()
                    .map(|(h, base)| (h.to_ascii_lowercase(), base.clone()))
                    .collect(),
            },
        }
    }

    /// Starts the loaded file (`load`) with its settings and limits.
    pub fn start(&self, timeout: Option<Duration>) -> anyhow::Result<Sandboxed> {
        let Some(source) = &self.source else {
            anyhow::bail!("`{}` was not loaded", self.file);
        };
        let settings = self.settings().map_err(|e| anyhow::anyhow!("{e}"))?;
        let function = Function::load(source, self.options(timeout))?;
        Ok(Sandboxed {
            function,
            settings: settings.to_string(),
        })
    }
}

/// For keys that take a file name or a sandbox table: `insert_function = "f.js"` or
/// `insert_function = { file = "f.js", timeout = "1s" }`.
pub fn file_or_table<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<FunctionSandbox>, D::Error> {
    struct FileOrTable;
    impl<'de> serde::de::Visitor<'de> for FileOrTable {
        type Value = FunctionSandbox;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(
                "a JavaScript file name, or a table { file = \"…\", settings, allow_hosts, \
                 fetch_hosts, timeout, memory_limit }",
            )
        }
        fn visit_str<E: serde::de::Error>(self, file: &str) -> Result<FunctionSandbox, E> {
            Ok(FunctionSandbox::file(file))
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            map: M,
        ) -> Result<FunctionSandbox, M::Error> {
            FunctionSandbox::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_any(FileOrTable).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_settings_variable_stops_the_start_naming_key_and_variable() {
        let mut sandbox = FunctionSandbox::file("f.js");
        sandbox.source = Some("function onTrack(e) { return e; }".into());
        sandbox.settings.insert(
            "tag_env".into(),
            serde_json::json!("FANOUT_TEST_SANDBOX_UNSET"),
        );
        let e = sandbox.start(None).err().unwrap().to_string();
        assert!(e.contains("settings.tag_env"), "{e}");
        assert!(e.contains("FANOUT_TEST_SANDBOX_UNSET"), "{e}");
    }

    #[test]
    fn a_destination_s_timeout_wins_over_the_sandbox_s() {
        let mut sandbox = FunctionSandbox::file("f.js");
        assert_eq!(
            sandbox.options(None).timeout,
            crate::functions::DEFAULT_TIMEOUT
        );
        sandbox.timeout = Some(Duration::from_secs(2));
        assert_eq!(sandbox.options(None).timeout, Duration::from_secs(2));
        let shared = Some(Duration::from_secs(7));
        assert_eq!(sandbox.options(shared).timeout, Duration::from_secs(7));
    }
}
