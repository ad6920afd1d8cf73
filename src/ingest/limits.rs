//! `[limits]`: the sizes and depth ingest holds every request and message to.

use serde::Deserialize;

/// Request limits; the defaults are Segment's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest single message, in bytes of JSON as received.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest request body, in bytes, checked on the wire and again after gzip decoding.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Most messages in one batch.
    #[serde(default = "default_max_batch_messages")]
    pub max_batch_messages: usize,
    /// Deepest nesting of objects and arrays inside one message; deeper input is
    /// refused so that no downstream parser is handed a stack-exhausting document.
    /// At most `MAX_JSON_DEPTH`.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
}

/// The highest `limits.max_json_depth`: serde_json, which the tracking plan, the Klaviyo
/// translation and `fanout route` read messages with, stops at 128 levels, and a message
/// also travels inside other documents (a batch, a live-view event, a dead-letter listing).
pub const MAX_JSON_DEPTH: usize = 100;

const fn default_max_message_bytes() -> usize {
    32 * 1024
}
const fn default_max_request_bytes() -> usize {
    500 * 1024
}
const fn default_max_batch_messages() -> usize {
    2500
}
const fn default_max_json_depth() -> usize {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: default_max_message_bytes(),
            max_request_bytes: default_max_request_bytes(),
            max_batch_messages: default_max_batch_messages(),
            max_json_depth: default_max_json_depth(),
        }
    }
}
