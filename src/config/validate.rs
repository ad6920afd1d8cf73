//! What serde cannot check of a config: values within bounds, names that are safe and
//! unique, write keys given to one source, routing to sources that exist.

use std::collections::HashSet;

use super::errors::{ConfigError, LineIndex};
use super::{Config, DedupeBackend};

/// Viewers read up to 64 KiB at a time: a smaller buffer loses events to one keeping up.
const MIN_VIEWER_BUFFER_BYTES: usize = 64 * 1024;

impl Config {
    /// Checks what serde cannot: uniqueness, non-empty keys, safe names.
    pub(super) fn validate(&self, lines: &LineIndex<'_>) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError {
            origin: None,
            line: lines.line(&key),
            key,
            message,
        };
        let retry_after = self.server.retry_after;
        if retry_after.subsec_nanos() != 0 || !(1..=3600).contains(&retry_after.as_secs()) {
            return Err(err(
                "server.retry_after".into(),
                "must be whole seconds from 1s to 1h (it is sent as `Retry-After: <seconds>`)"
                    .into(),
            ));
        }
        for (key, value) in [
            ("server.body_timeout", self.server.body_timeout),
            ("server.body_deadline", self.server.body_deadline),
            ("server.header_timeout", self.server.header_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
        ] {
            if value.is_zero() {
                return Err(err(key.into(), "must be more than 0, e.g. \"30s\"".into()));
            }
        }
        if let Some(protocol) = &self.browser.protocol {
            if protocol != "http" && protocol != "https" {
                return Err(err(
                    "browser.protocol".into(),
                    "must be \"http\" or \"https\"".into(),
                ));
            }
        }
        if let Some(host) = &self.browser.api_host {
            if host.is_empty() || host.contains("://") || host.contains('/') {
                return Err(err(
                    "browser.api_host".into(),
                    "must be host[:port] without scheme or path, e.g. \"events.example.com\" \
                     (fanout adds /v1)"
                        .into(),
                ));
            }
        }
        for (i, source) in self.sources.iter().enumerate() {
            if let Some(function) = &source.function {
                if let Err((key, message)) = function.validate() {
                    return Err(err(format!("sources[{i}].function.{key}"), message));
                }
                if !function.settings.is_empty() && !source.function_settings.is_empty() {
                    return Err(err(
                        format!("sources[{i}].function_settings"),
                        "give the settings in one place: `function.settings` or \
                         `function_settings`, not both"
                            .into(),
                    ));
                }
            }
            if let Some(limit) = &source.rate_limit {
                if !(limit.events_per_second.is_finite() && limit.events_per_second >= 0.001) {
                    return Err(err(
                        format!("sources[{i}].rate_limit.events_per_second"),
                        "must be at least 0.001 (events per second)".into(),
                    ));
                }
                if limit.burst == Some(0) {
                    return Err(err(
                        format!("sources[{i}].rate_limit.burst"),
                        "must be at least 1 (events)".into(),
                    ));
                }
            }
            if let Some(batching) = &source.browser.batching {
                if batching.size == 0 || batching.timeout.is_zero() {
                    return Err(err(
                        format!("sources[{i}].browser.batching"),
                        "size and timeout must be more than 0, e.g. { size = 10, timeout = \"5s\" }"
                            .into(),
                    ));
                }
            }
        }
        if self.cors.max_age.subsec_nanos() != 0 {
            return Err(err(
                "cors.max_age".into(),
                "must be whole seconds (it is sent as `Access-Control-Max-Age: <seconds>`)".into(),
            ));
        }
        if self.dedupe.ttl.as_secs() == 0 {
            return Err(err(
                "dedupe.ttl".into(),
                "must be at least one second".into(),
            ));
        }
        if self.dedupe.backend == DedupeBackend::Redis
            && self.dedupe.redis_url.is_none()
            && self.dedupe.redis_url_env.is_none()
        {
            return Err(err(
                "dedupe.backend".into(),
                "redis needs dedupe.redis_url or dedupe.redis_url_env".into(),
            ));
        }
        if self.dedupe.max_entries == 0 {
            return Err(err(
                "dedupe.max_entries".into(),
                "must be at least 1".into(),
            ));
        }
        if let Err((key, problem)) = self.identity.validate() {
            return Err(err(key.into(), problem.into()));
        }
        self.validate_dead_letters(&err)?;
        if self.server.max_connections == 0 {
            return Err(err(
                "server.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.server.max_in_flight == 0 {
            return Err(err(
                "server.max_in_flight".into(),
                "must be at least 1".into(),
            ));
        }
        if !(1..=super::MAX_JSON_DEPTH).contains(&self.limits.max_json_depth) {
            return Err(err(
                "limits.max_json_depth".into(),
                format!(
                    "must be from 1 to {}: the tracking plan and the Klaviyo translation read \
                     messages with serde_json, which stops at 128 levels, and messages also \
                     travel nested in batches and listings",
                    super::MAX_JSON_DEPTH
                ),
            ));
        }
        if self.limits.max_message_bytes > self.limits.max_request_bytes {
            return Err(err(
                "limits.max_message_bytes".into(),
                "must not exceed limits.max_request_bytes".into(),
            ));
        }
        if self.admin.max_viewers == 0 {
            return Err(err(
                "admin.max_viewers".into(),
                "must be at least 1 (leave admin.token_env out to have no live view)".into(),
            ));
        }
        if self.admin.viewer_buffer_bytes < MIN_VIEWER_BUFFER_BYTES {
            return Err(err(
                "admin.viewer_buffer_bytes".into(),
                format!("must be at least {MIN_VIEWER_BUFFER_BYTES} (64 KiB)"),
            ));
        }
        if self.admin.listen == Some(self.server.listen) {
            return Err(err(
                "admin.listen".into(),
                "must differ from server.listen (leave it out to share that address)".into(),
            ));
        }
        if let Err((key, message)) = self.queue.validate() {
            return Err(err(key, message));
        }
        // An empty file (or one cut before its sources) would answer 401 to every client,
        // and Segment's libraries drop events on a 401.
        if self.sources.is_empty() {
            return Err(err(
                "sources".into(),
                "no [[sources]]: at least one source with write keys is needed, or every \
                 request is refused (401)"
                    .into(),
            ));
        }
        let mut source_names = HashSet::new();
        let mut keys = HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if !is_safe_name(&source.name) {
                return Err(err(format!("sources[{i}].name"), NAME_RULE.into()));
            }
            if !source_names.insert(source.name.as_str()) {
                return Err(err(
                    format!("sources[{i}].name"),
                    format!("source `{}` is defined twice", source.name),
                ));
            }
            for (k, key) in source.write_keys.iter().enumerate() {
                if key.is_empty() {
                    return Err(err(
                        format!("sources[{i}].write_keys[{k}]"),
                        "write key is empty".into(),
                    ));
                }
                if !keys.insert(key.as_str()) {
                    return Err(err(
                        format!("sources[{i}].write_keys[{k}]"),
                        "write key is used by more than one source".into(),
                    ));
                }
            }
        }
        let mut dest_names = HashSet::new();
        for (i, dest) in self.destinations.iter().enumerate() {
            if !is_safe_name(&dest.name) {
                return Err(err(format!("destinations[{i}].name"), NAME_RULE.into()));
            }
            if dest.name == crate::tracking_plan::DEAD_LETTER_NAME {
                return Err(err(
                    format!("destinations[{i}].name"),
                    format!(
                        "`{}` is reserved: the dead letters of messages a tracking plan \
                         blocked are filed under it",
                        dest.name
                    ),
                ));
            }
            if !dest_names.insert(dest.name.as_str()) {
                return Err(err(
                    format!("destinations[{i}].name"),
                    format!("destination `{}` is defined twice", dest.name.as_str()),
                ));
            }
            if let Err(message) = self.queue.check_destination_name(&dest.name) {
                return Err(err(format!("destinations[{i}].name"), message));
            }
            if let Err(e) = dest.validate() {
                return Err(lines.error(&format!("destinations[{i}]"), e));
            }
            for (j, name) in dest.route.sources.iter().flatten().enumerate() {
                if !source_names.contains(name.as_str()) {
                    return Err(err(
                        format!("destinations[{i}].sources[{j}]"),
                        format!("no source named `{name}` in [[sources]]"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// `[dead_letters]`: a retention, a cap one letter fits in, and a queue budget left
    /// beside it.
    fn validate_dead_letters(
        &self,
        err: &impl Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.dead_letters.retention.as_secs() == 0 {
            return Err(err(
                "dead_letters.retention".into(),
                "must be at least one second, e.g. \"14d\"".into(),
            ));
        }
        let max_message = self.limits.max_message_bytes as u64;
        // Not held against the default tenth: a toy budget still starts.
        if self
            .dead_letters
            .max_bytes
            .is_some_and(|max| max < max_message)
        {
            return Err(err(
                "dead_letters.max_bytes".into(),
                format!("must be at least limits.max_message_bytes ({max_message}), so that a letter fits"),
            ));
        }
        if self.queue_bytes() < 2 * self.server.segment_bytes {
            let key = match self.dead_letters.max_bytes {
                Some(_) => "dead_letters.max_bytes",
                None => "server.max_queue_bytes",
            };
            return Err(err(
                key.into(),
                "server.max_queue_bytes less dead_letters.max_bytes (default a tenth) is the \
                 queue's budget, and must be at least twice server.segment_bytes (the newest \
                 segment is always kept)"
                    .into(),
            ));
        }
        Ok(())
    }
}

const NAME_RULE: &str = "names are 1-64 characters of A-Z a-z 0-9 _ - .";

/// Names become file names (cursors) and metric labels, so keep them plain.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}
