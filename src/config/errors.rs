//! Locating a problem in the file: the key path and line of an error, renamed keys'
//! hints, and values under secret keys kept out of messages.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A configuration problem, located by key path and (where known) line.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", origin.as_deref().map(|o| format!("{o}: ")).unwrap_or_default(), location(.key, .line))]
pub struct ConfigError {
    /// The file, when the config came from one.
    pub origin: Option<String>,
    /// Dotted key path, e.g. `destinations[0].path`.
    pub key: String,
    /// 1-based line of the key in the file.
    pub line: Option<usize>,
    pub message: String,
}

fn location(key: &str, line: &Option<usize>) -> String {
    match (key.is_empty(), line) {
        (true, Some(l)) => format!("line {l}"),
        (true, None) => "config".to_string(),
        (false, Some(l)) => format!("`{key}` (line {l})"),
        (false, None) => format!("`{key}`"),
    }
}

/// Keys renamed before 1.0: old key path, new key, its example value. Using an old key
/// is an error that says what to write instead, rather than a bare "unknown field".
const RENAMED: &[(&str, &str, &str)] = &[
    ("server.retry_after_secs", "retry_after", "1s"),
    ("server.body_timeout_secs", "body_timeout", "30s"),
    ("server.shutdown_grace_secs", "shutdown_grace", "30s"),
    ("cors.max_age_secs", "max_age", "24h"),
];

/// The message for a renamed key at `key`; the suggestion carries the old value when it
/// was a number of seconds.
pub(super) fn renamed_key(key: &str, lines: &LineIndex<'_>) -> Option<String> {
    let &(old, new, example) = RENAMED.iter().find(|(old, _, _)| *old == key)?;
    let value = lines
        .integer(old)
        .map_or_else(|| example.to_string(), humane_secs);
    Some(format!("`{old}` was renamed: use `{new} = \"{value}\"`"))
}

/// Seconds as the shortest humantime unit that is exact: 86400 → "24h", 90 → "90s".
fn humane_secs(secs: u64) -> String {
    match secs {
        0 => "0s".to_string(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// humantime-serde refuses a bare number with "invalid type: integer `30`, expected a
/// duration"; say what a duration looks like.
pub(super) fn with_duration_hint(message: &str) -> String {
    if message.ends_with("expected a duration") {
        format!("{message} with a unit, as a string such as \"30s\", \"1m\" or \"24h\"")
    } else {
        message.to_string()
    }
}

/// Keys whose values may be secrets (write keys, a Redis URL with its password, webhook
/// headers such as `Authorization`): an error about them does not quote the value, since
/// errors go to the terminal and to the log (a refused reload).
const SECRET_KEYS: &[&str] = &["write_keys", "redis_url", "headers"];

/// serde quotes a refused string as `string "…"`; under a secret key that part is cut.
pub(super) fn hide_secret(key: &str, message: String) -> String {
    let secret = key
        .split('.')
        .any(|part| SECRET_KEYS.contains(&part.split('[').next().unwrap_or(part)));
    let Some(start) = message.find("string \"").filter(|_| secret) else {
        return message;
    };
    match message.rfind("\", expected") {
        Some(end) if end > start => format!(
            "{}string (not shown){}",
            &message[..start],
            &message[end + 1..]
        ),
        _ => "this value is refused (not shown: it may be a secret)".to_string(),
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line of a key path such as `destinations[1].path` in the parsed document.
pub(super) struct LineIndex<'i> {
    pub(super) text: &'i str,
    pub(super) doc: Spanned<DeTable<'i>>,
}

impl LineIndex<'_> {
    /// A destination's `KeyError` (its key relative to `at`) as a located `ConfigError`.
    pub(super) fn error(&self, at: &str, e: crate::destinations::KeyError) -> ConfigError {
        let key = if e.key.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{}", e.key)
        };
        ConfigError {
            origin: None,
            line: self.line(&key),
            message: hide_secret(&key, e.message),
            key,
        }
    }

    pub(super) fn line(&self, path: &str) -> Option<usize> {
        let mut span = self.doc.span();
        let mut table = Some(self.doc.get_ref());
        let mut value: Option<&DeValue<'_>> = None;
        for segment in path.split('.').filter(|s| !s.is_empty()) {
            let (name, index) = match segment.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (segment, None),
            };
            let t = match value {
                Some(DeValue::Table(t)) => t,
                Some(_) => return Some(line_of(self.text, span.start)),
                None => table?,
            };
            table = None;
            let Some((key, v)) = t.iter().find(|(k, _)| k.get_ref() == name) else {
                break;
            };
            span = key.span();
            value = Some(v.get_ref());
            if let (Some(i), Some(DeValue::Array(items))) = (index, value) {
                let Some(item) = items.get(i) else {
                    break;
                };
                span = item.span();
                value = Some(item.get_ref());
            }
        }
        Some(line_of(self.text, span.start))
    }

    /// The non-negative integer at a path of plain table keys, e.g. `server.retry_after_secs`.
    fn integer(&self, path: &str) -> Option<u64> {
        let mut table = self.doc.get_ref();
        let mut names = path.split('.').peekable();
        while let Some(name) = names.next() {
            let (_, value) = table.iter().find(|(k, _)| k.get_ref() == name)?;
            match (value.get_ref(), names.peek()) {
                (DeValue::Table(t), Some(_)) => table = t,
                (DeValue::Integer(i), None) => {
                    return u64::from_str_radix(i.as_str(), i.radix()).ok();
                }
                _ => return None,
            }
        }
        None
    }
}
