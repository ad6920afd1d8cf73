//! Stage 2: from a request body to validated, enriched messages ready for the queue.
//!
//! Pure functions: no I/O, no clock except the receive time they are given. The HTTP
//! handlers call them; tests call them directly.

pub mod json;
pub mod message;
pub mod seed;
pub mod segment;
pub mod timestamp;

pub use message::{Envelope, MessageType};

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
