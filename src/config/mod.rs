//! The TOML configuration: one file, validated as a whole before anything starts.
//!
//! Every struct denies unknown keys, so a typo is an error with its key path and line,
//! not a silently ignored setting.

mod errors;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;

pub use errors::ConfigError;
pub use sections::{AdminConfig, DeadLettersConfig, ServerConfig};

pub use crate::auth::{BrowserBatching, SourceBrowserConfig, SourceConfig, SourceDedupeConfig};
pub use crate::dedupe::{DedupeBackend, DedupeConfig, RedisFailure};
pub use crate::http::{BrowserConfig, CorsConfig};
pub use crate::identity::{IdentityBackend, IdentityConfig};
pub use crate::ingest::{LimitsConfig, MAX_JSON_DEPTH};

use crate::destinations::DestinationConfig;
use crate::queue::dead_letters::Bounds as DeadLetterBounds;
use crate::queue::QueueConfig;
use errors::{hide_secret, line_of, renamed_key, with_duration_hint, LineIndex};

/// The whole configuration file. `D` is how a destination is held: its typed config,
/// or, while the file is read, its TOML table (each kind reads its own keys from it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<D = DestinationConfig> {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cors: CorsConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    /// Each source owns write keys; a request's key says which source sent it.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Where accepted messages go; each reads the queue from its own cursor.
    #[serde(default)]
    pub destinations: Vec<D>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub browser: BrowserConfig,
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// The directory the file's relative paths (`sources[].tracking_plan`, a function's
    /// `file`, `insert_function`) are taken from: the file's own.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: Some(path.display().to_string()),
            key: String::new(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        Config::parse_in(&text, base).map_err(|mut e| {
            e.origin = Some(path.display().to_string());
            e
        })
    }

    /// Parses and validates config text; files it names are relative to the current
    /// directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, Path::new(""))
    }

    /// Parses and validates config text whose file names are relative to `base`.
    pub fn parse_in(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let doc = DeTable::parse(text).map_err(|e| ConfigError {
            origin: None,
            key: String::new(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().to_string(),
        })?;
        let lines = LineIndex {
            text,
            doc: doc.clone(),
        };
        let mut raw: Config<toml::Table> =
            serde_path_to_error::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." { String::new() } else { key };
                let inner = e.into_inner();
                let line = inner
                    .span()
                    .map(|s| line_of(text, s.start))
                    .or_else(|| lines.line(&key));
                let message = renamed_key(&key, &lines)
                    .unwrap_or_else(|| with_duration_hint(inner.message()));
                let message = hide_secret(&key, message);
                ConfigError {
                    origin: None,
                    key,
                    line,
                    message,
                }
            })?;
        raw.dir = base.to_path_buf();
        let config = raw.read_destinations(&lines)?;
        config.validate(&lines)?;
        Ok(config)
    }
}

impl<D> Config<D> {
    /// The bytes of dead letters kept: `dead_letters.max_bytes`, by default a tenth of
    /// `server.max_queue_bytes`.
    pub fn dead_letter_bytes(&self) -> u64 {
        self.dead_letters
            .max_bytes
            .unwrap_or(self.server.max_queue_bytes / 10)
    }

    /// The queue's disk budget: `server.max_queue_bytes` less what the dead letters have
    /// reserved, so that both together stay within it.
    pub fn queue_bytes(&self) -> u64 {
        self.server
            .max_queue_bytes
            .saturating_sub(self.dead_letter_bytes())
    }

    /// How much the dead-letter store keeps: `[dead_letters]`.
    pub fn dead_letter_bounds(&self) -> DeadLetterBounds {
        DeadLetterBounds {
            max_bytes: self.dead_letter_bytes(),
            retention: self.dead_letters.retention,
        }
    }
}

impl Config<toml::Table> {
    /// Reads each destination's table as its kind's config, locating errors in the file.
    fn read_destinations(self, lines: &LineIndex<'_>) -> Result<Config, ConfigError> {
        let mut destinations = Vec::with_capacity(self.destinations.len());
        for (i, table) in self.destinations.into_iter().enumerate() {
            let at = format!("destinations[{i}]");
            let mut destination =
                DestinationConfig::from_table(table).map_err(|e| lines.error(&at, e))?;
            destination
                .load_files(&self.dir)
                .map_err(|e| lines.error(&at, e))?;
            destinations.push(destination);
        }
        Ok(Config {
            server: self.server,
            limits: self.limits,
            cors: self.cors,
            dedupe: self.dedupe,
            identity: self.identity,
            queue: self.queue,
            sources: self.sources,
            destinations,
            admin: self.admin,
            browser: self.browser,
            dead_letters: self.dead_letters,
            dir: self.dir,
        })
    }
}
