//! Privacy deletions (`suppress_with_delete` regulations): whom a deletion is about and
//! what a destination made of it. The regulations runner calls `Destination::erase`.

use std::future::Future;
use std::pin::Pin;

/// Whom a privacy deletion is about, with what fanout knows of them (the regulations
/// runner fills email/phone from the identity store when the regulation names a userId).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Subject {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
}

/// What a destination did with a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erasure {
    /// Deleted (or asked the destination to delete); `detail` says what, for the record.
    Done { detail: String },
    /// The kind has no way to delete what it holds or sent.
    NotSupported,
}

/// Why it could not (yet): `retry` true for what may pass later (network, 429, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EraseError {
    pub retry: bool,
    pub message: String,
}

impl EraseError {
    /// May pass later (network, 429, 5xx).
    pub fn retry(message: impl Into<String>) -> EraseError {
        EraseError {
            retry: true,
            message: message.into(),
        }
    }

    /// Cannot pass as it is (the destination refused it).
    pub fn failed(message: impl Into<String>) -> EraseError {
        EraseError {
            retry: false,
            message: message.into(),
        }
    }
}

/// The future `Destination::erase` returns (boxed, like `Sending`).
pub type Erasing<'a> = Pin<Box<dyn Future<Output = Result<Erasure, EraseError>> + Send + 'a>>;
