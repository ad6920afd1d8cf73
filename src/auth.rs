//! Write keys → sources.
//!
//! Every form real clients use is accepted, in this order: `Authorization: Basic
//! base64(key:)`, `Authorization: Bearer key`, the seed APIs' `Authentication` header
//! (`Bearer key` or the bare key), and, when no header is sent, `writeKey` in the body
//! (the browser library). Keys are compared in constant time against every configured key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::{HeaderMap, AUTHORIZATION};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::functions::{FunctionSandbox, SourceFunction};
use crate::pace::RateLimiter;
use crate::tracking_plan::TrackingPlan;

/// The credential a request's headers carry.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    /// No auth header: the key may be in the body.
    Missing,
    Key(String),
    /// A header was sent but cannot be read as a key.
    Malformed(&'static str),
}

/// Reads the write key from the request headers.
pub fn credential(headers: &HeaderMap) -> Credential {
    if let Some(value) = headers.get(AUTHORIZATION) {
        return parse_header(value.as_bytes(), false);
    }
    if let Some(value) = headers.get("authentication") {
        return parse_header(value.as_bytes(), true);
    }
    Credential::Missing
}

fn parse_header(value: &[u8], bare_allowed: bool) -> Credential {
    let Ok(value) = std::str::from_utf8(value) else {
        return Credential::Malformed("authorization header is not valid UTF-8");
    };
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return Credential::Malformed("basic credentials are not valid base64");
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return Credential::Malformed("basic credentials are not valid UTF-8");
        };
        // The key is the user name; a few clients send it as the password instead.
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        let key = if user.is_empty() { password } else { user };
        return non_empty(key);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return non_empty(rest);
    }
    if bare_allowed && rest.is_empty() {
        return non_empty(scheme);
    }
    Credential::Malformed("unsupported authorization scheme (use Basic or Bearer)")
}

fn non_empty(key: &str) -> Credential {
    if key.is_empty() {
        Credential::Malformed("write key is empty")
    } else {
        Credential::Key(key.to_string())
    }
}

/// One sending application; its write keys authenticate its requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name used in logs, the queue and routing.
    pub name: String,
    /// Write keys written in the file (fine for development).
    #[serde(default)]
    pub write_keys: Vec<String>,
    /// Environment variable holding more write keys, comma-separated (for production).
    pub write_keys_env: Option<String>,
    /// `dedupe = { enabled = false }` turns messageId dedupe off for this source.
    #[serde(default)]
    pub dedupe: SourceDedupeConfig,
    /// What the browser library is told for this source's keys (`/v1/projects/…/settings`).
    #[serde(default)]
    pub browser: SourceBrowserConfig,
    /// A tracking plan file (JSON, path relative to the config file): which events and
    /// properties this source may send (`tracking_plan.rs`). Compiled where the sources
    /// are built (`auth::Sources::from_config`).
    pub tracking_plan: Option<PathBuf>,
    /// A source function: its JavaScript file (relative to the config file), or a table
    /// with the file and its sandbox keys (`settings`, `allow_hosts`, `fetch_hosts`,
    /// `timeout`, `memory_limit`). Its `onRequest(request, settings)` turns what
    /// `POST /v1/functions/{writeKey}` receives into messages of this source. Loaded where
    /// the sources are built.
    #[serde(default, deserialize_with = "crate::functions::file_or_table")]
    pub function: Option<FunctionSandbox>,
    /// The older place of the function's `settings` (kept working): handed to `onRequest`
    /// as `settings`; a key ending in `_env` names an environment variable, passed under
    /// the key without the suffix. Not both this and `function.settings`.
    #[serde(default)]
    pub function_settings: BTreeMap<String, serde_json::Value>,
    /// This source's quota, counted in events: past it, requests get 429 with
    /// `Retry-After`, so one noisy source cannot take every admission slot. Held by the
    /// whole cluster on the shared log (`queue.shared_limits`). Default: none.
    pub rate_limit: Option<SourceRateLimit>,
}

/// `rate_limit = { events_per_second = 1000, burst = 5000 }`: a token bucket in events
/// (a batch of 100 takes 100). A batch larger than `burst` is admitted once the bucket
/// is full, leaving a debt the following requests wait out, so that no batch a client
/// sends is refused forever.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRateLimit {
    /// Events accepted per second, on average.
    pub events_per_second: f64,
    /// Events accepted at once when the source has been quiet; default one second's
    /// worth (`events_per_second`, at least 1).
    pub burst: Option<u32>,
}

impl SourceRateLimit {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            self.events_per_second
                .ceil()
                .clamp(1.0, f64::from(u32::MAX)) as u32
        })
    }
}

/// `browser = { batching = { size = 10, timeout = "5s" } }`: the browser library batches
/// (its `deliveryStrategy`) instead of sending each call at once.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBrowserConfig {
    pub batching: Option<BrowserBatching>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserBatching {
    /// Calls per batch.
    pub size: u32,
    /// Longest a call waits for its batch.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Per-source dedupe switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDedupeConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for SourceDedupeConfig {
    fn default() -> Self {
        SourceDedupeConfig { enabled: true }
    }
}

const fn default_true() -> bool {
    true
}

/// The configured sources and their keys.
pub struct Sources {
    keys: Vec<(Box<[u8]>, Arc<str>)>,
    /// Per source, how the browser library should batch (`browser.batching`).
    batching: HashMap<Arc<str>, BrowserBatching>,
    /// Per source, its tracking plan (swapped with the keys on reload).
    plans: HashMap<Arc<str>, Arc<TrackingPlan>>,
    /// Per source, its source function (swapped with the keys on reload).
    functions: HashMap<Arc<str>, Arc<SourceFunction>>,
    /// Per source with a `rate_limit`, its bucket (a reload starts it full; the cluster's
    /// shared bucket carries on).
    quotas: HashMap<Arc<str>, Arc<RateLimiter>>,
}

impl Sources {
    /// Compiles each source's tracking plan (its file relative to `dir`, the config
    /// file's directory) and collects keys from the config and from each source's
    /// `write_keys_env` variable. Refuses a bad plan at its source's `tracking_plan` key,
    /// a key that two sources share (the file's keys are checked with their lines by
    /// `Config::parse`; this also sees the environment's) and a set of sources without any
    /// key, which would refuse every request.
    pub fn from_config(sources: &[SourceConfig], dir: &Path) -> anyhow::Result<Sources> {
        let mut plans = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            if let Some(file) = &source.tracking_plan {
                let plan = TrackingPlan::load(dir, file)
                    .map_err(|why| anyhow::anyhow!("`sources[{i}].tracking_plan`: {why}"))?;
                plans.insert(Arc::from(source.name.as_str()), Arc::new(plan));
            }
        }
        let mut functions = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            if let Some(sandbox) = &source.function {
                // `Config::validate` refuses both at once.
                let (key, table) = if sandbox.settings.is_empty() {
                    ("function_settings", &source.function_settings)
                } else {
                    ("function.settings", &sandbox.settings)
                };
                let settings = crate::functions::settings_from(table, |var| {
                    std::env::var(var).ok().filter(|v| !v.is_empty())
                })
                .map_err(|why| anyhow::anyhow!("`sources[{i}].{key}`: {why}"))?;
                let function = SourceFunction::load(dir, sandbox, settings)
                    .map_err(|why| anyhow::anyhow!("`sources[{i}].function`: {why}"))?;
                functions.insert(Arc::from(source.name.as_str()), Arc::new(function));
            }
        }
        let mut keys: Vec<(Box<[u8]>, Arc<str>)> = Vec::new();
        let mut owners: HashMap<String, (Arc<str>, &'static str)> = HashMap::new();
        let mut batching = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            let name: Arc<str> = Arc::from(source.name.as_str());
            if let Some(b) = &source.browser.batching {
                batching.insert(name.clone(), b.clone());
            }
            let mut source_keys: Vec<(String, &'static str)> = source
                .write_keys
                .iter()
                .map(|k| (k.clone(), "write_keys"))
                .collect();
            if let Some(var) = &source.write_keys_env {
                let value = std::env::var(var).map_err(|_| {
                    anyhow::anyhow!(
                        "`sources[{i}].write_keys_env`: source `{}`: environment variable {var} \
                         is not set",
                        source.name
                    )
                })?;
                source_keys.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(|k| (k.to_string(), "write_keys_env")),
                );
            }
            if source_keys.is_empty() {
                tracing::warn!(source = %source.name, "source has no write keys: nothing can send to it");
            }
            for (key, origin) in source_keys {
                // The key itself is never named: errors reach logs and terminals.
                if let Some((owner, first)) = owners.get(&key) {
                    if **owner != *source.name {
                        anyhow::bail!(
                            "`sources[{i}].{origin}`: source `{}`: a write key from its {origin} \
                             is also a key of source `{owner}` (from its {first}); each key must \
                             name one source",
                            source.name
                        );
                    }
                    continue;
                }
                owners.insert(key.clone(), (name.clone(), origin));
                keys.push((key.into_bytes().into_boxed_slice(), name.clone()));
            }
        }
        if keys.is_empty() {
            anyhow::bail!(
                "no source has a write key (write_keys or write_keys_env): every request \
                 would be refused with 401"
            );
        }
        Ok(Sources {
            keys,
            batching,
            plans,
            functions,
            quotas: sources
                .iter()
                .filter_map(|source| {
                    let limit = source.rate_limit.as_ref()?;
                    let key = format!("s.{}", source.name);
                    let bucket = RateLimiter::named(&key, limit.events_per_second, limit.burst());
                    Some((Arc::from(source.name.as_str()), Arc::new(bucket)))
                })
                .collect(),
        })
    }

    /// `source`'s quota, if it has one.
    pub fn quota(&self, source: &str) -> Option<&Arc<RateLimiter>> {
        self.quotas.get(source)
    }

    /// How the browser library should batch for `source`, if it should.
    pub fn batching(&self, source: &str) -> Option<&BrowserBatching> {
        self.batching.get(source)
    }

    /// `source`'s tracking plan, if it has one.
    pub fn plan(&self, source: &str) -> Option<&Arc<TrackingPlan>> {
        self.plans.get(source)
    }

    /// `source`'s source function, if it has one.
    pub fn function(&self, source: &str) -> Option<&Arc<SourceFunction>> {
        self.functions.get(source)
    }

    /// The source owning `key`. Compares against every key so timing says nothing of
    /// which key (or how much of it) matched.
    pub fn authenticate(&self, key: &str) -> Option<Arc<str>> {
        let mut found = None;
        for (candidate, source) in &self.keys {
            if bool::from(candidate.as_ref().ct_eq(key.as_bytes())) {
                found = Some(source.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn reads_every_header_form() {
        let key = |c| match c {
            Credential::Key(k) => k,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            key(credential(&headers(
                "authorization",
                "Basic d2tfc2VnbWVudF9weXRob246"
            ))),
            "wk_segment_python"
        );
        assert_eq!(
            key(credential(&headers(
                "authorization",
                "Basic OndrX3Bhc3N3b3Jk"
            ))),
            "wk_password"
        );
        assert_eq!(
            key(credential(&headers("authorization", "Bearer tok"))),
            "tok"
        );
        assert_eq!(
            key(credential(&headers("authentication", "Bearer tok"))),
            "tok"
        );
        assert_eq!(key(credential(&headers("authentication", "tok"))), "tok");
        assert_eq!(credential(&HeaderMap::new()), Credential::Missing);
        assert!(matches!(
            credential(&headers("authorization", "Digest x")),
            Credential::Malformed(_)
        ));
        assert!(matches!(
            credential(&headers("authorization", "Basic !!!")),
            Credential::Malformed(_)
        ));
        assert!(matches!(
            credential(&headers("authorization", "Bearer ")),
            Credential::Malformed(_)
        ));
    }

    #[test]
    fn maps_keys_to_sources() {
        let sources = Sources::from_config(
            &[
                source("web", &["k1"], None),
                source("app", &["k2", "k3"], None),
            ],
            Path::new(""),
        )
        .unwrap();
        assert_eq!(sources.authenticate("k3").as_deref(), Some("app"));
        assert_eq!(sources.authenticate("k1").as_deref(), Some("web"));
        assert_eq!(sources.authenticate("k"), None);
        assert_eq!(sources.authenticate(""), None);
    }

    fn source(name: &str, keys: &[&str], env: Option<&str>) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            write_keys: keys.iter().map(|k| k.to_string()).collect(),
            write_keys_env: env.map(String::from),
            dedupe: Default::default(),
            browser: Default::default(),
            tracking_plan: None,
            function: None,
            function_settings: BTreeMap::new(),
            rate_limit: None,
        }
    }

    #[test]
    fn a_key_shared_through_the_environment_is_refused_unnamed() {
        std::env::set_var("FANOUT_TEST_AUTH_DUP", "k9, secret-shared");
        let e = Sources::from_config(
            &[
                source("web", &["secret-shared"], None),
                source("app", &[], Some("FANOUT_TEST_AUTH_DUP")),
            ],
            Path::new(""),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("source `app`") && e.contains("source `web`"),
            "{e}"
        );
        assert!(e.contains("write_keys_env"), "{e}");
        assert!(!e.contains("secret-shared"), "the key is not shown: {e}");
        // The same key twice in one source is harmless.
        std::env::set_var("FANOUT_TEST_AUTH_SAME", "k1,k1");
        let s = Sources::from_config(
            &[source("web", &["k1"], Some("FANOUT_TEST_AUTH_SAME"))],
            Path::new(""),
        )
        .unwrap();
        assert_eq!(s.authenticate("k1").as_deref(), Some("web"));
    }

    #[test]
    fn plans_are_compiled_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plans")).unwrap();
        std::fs::write(dir.path().join("plans/web.json"), r#"{"events": {}}"#).unwrap();
        let mut web = source("web", &["k1"], None);
        web.tracking_plan = Some("plans/web.json".into());
        let sources =
            Sources::from_config(&[web.clone(), source("app", &["k2"], None)], dir.path()).unwrap();
        assert_eq!(sources.plan("web").unwrap().file(), "plans/web.json");
        assert!(sources.plan("app").is_none());

        std::fs::write(dir.path().join("plans/web.json"), "{ not json").unwrap();
        let e = Sources::from_config(&[source("app", &["k2"], None), web], dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`sources[1].tracking_plan`") && e.contains("plans/web.json: not JSON"),
            "{e}"
        );
    }

    #[test]
    fn sources_without_any_key_are_refused() {
        std::env::set_var("FANOUT_TEST_AUTH_EMPTY", " , ");
        let e = Sources::from_config(
            &[source("web", &[], Some("FANOUT_TEST_AUTH_EMPTY"))],
            Path::new(""),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("401"), "{e}");
        assert!(Sources::from_config(&[], Path::new("")).is_err());
    }
}
