//! Stage 2: from a request body to validated, enriched messages ready for the queue.
//!
//! Pure functions: no I/O, no clock except the receive time they are given. The HTTP
//! handlers call them; tests call them directly.

mod limits;
pub mod message;
pub mod seed;
pub mod segment;

pub use limits::{LimitsConfig, MAX_JSON_DEPTH};
pub use message::Envelope;

/// Why a request (or one item of it) was refused: a stable code, a sentence, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub index: Option<usize>,
}

impl Rejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
            field: None,
            index: None,
        }
    }

    pub fn field(code: &'static str, field: &str, message: impl Into<String>) -> Rejection {
        Rejection {
            field: Some(field.to_string()),
            ..Rejection::new(code, message)
        }
    }

    pub fn at(mut self, index: usize) -> Rejection {
        self.index = Some(index);
        self
    }
}

/// Reads a request body as JSON, with a message that says where it broke.
fn invalid_json(e: serde_json::Error) -> Rejection {
    Rejection::new("invalid_json", format!("body is not valid JSON: {e}"))
}

/// Explains why a body failed to parse as `{"batch":[…], …}`. Only the error path pays
/// for this second look; the typed parse it follows is the fast path.
fn batch_shape_error(body: &[u8], e: serde_json::Error) -> Rejection {
    if e.classify() != serde_json::error::Category::Data {
        return invalid_json(e);
    }
    let Ok(object) = serde_json::from_slice::<crate::json::RawObject<'_>>(body) else {
        return Rejection::new(
            "invalid_body",
            "body must be a JSON object with a batch array",
        );
    };
    match object.get("batch") {
        None => Rejection::field("missing_field", "batch", "batch is required"),
        Some(b) if !b.get().starts_with('[') => {
            Rejection::field("invalid_field", "batch", "batch must be an array")
        }
        Some(_) => Rejection::new("invalid_body", format!("body is not a batch: {e}")),
    }
}

#[cfg(test)]
mod tests;
