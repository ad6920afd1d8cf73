//! What a Postgres error means for the batch: try again later, or dead-letter it.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::destinations::SendError;

/// The status a refused batch is dead-lettered with: Postgres has none of its own, and
/// 422 is what the other kinds use for "this content cannot be processed".
pub const REJECTED_STATUS: u16 = 422;

/// Classes of SQLSTATE that can pass by themselves: connection exceptions (08),
/// authorization (28: a password is fixed in the config without touching the batch),
/// missing database (3D), transaction rollbacks: serialization failures and deadlocks
/// (40), insufficient resources: disk full, too many connections (53), objects in use
/// and locks not available (55), operator
/// intervention: shutdown, cancel (57), system errors (58) and internal errors (XX).
const PASSING_CLASSES: [&str; 9] = ["08", "28", "3D", "40", "53", "55", "57", "58", "XX"];

/// Retryable unless Postgres answered with an error the same batch would get again
/// (a missing permission, a statement it refuses); those dead-letter the batch with
/// the SQLSTATE and Postgres's own message as the answer.
pub fn classify(e: &tokio_postgres::Error) -> SendError {
    let Some(db) = e.as_db_error() else {
        // The connection closed, timed out or could not be opened.
        return retryable(format!("Postgres connection: {e}"));
    };
    let code = db.code().code();
    let detail = format!("Postgres error {code}");
    // The dead letter keeps only the answer: the SQLSTATE goes with Postgres's message.
    let mut answer = format!("{code}: {}", db.message());
    if let Some(more) = db.detail() {
        answer.push_str(": ");
        answer.push_str(more);
    }
    if PASSING_CLASSES.iter().any(|class| code.starts_with(class)) {
        return SendError::Retryable {
            status: None,
            retry_after: None,
            detail,
            answer: Some(answer),
        };
    }
    SendError::Rejected {
        status: REJECTED_STATUS,
        detail,
        answer: Some(answer),
    }
}

/// Errors of the pool: waiting for or opening a connection.
pub fn classify_pool(e: &PoolError) -> SendError {
    match e {
        PoolError::Backend(e) => classify(e),
        other => retryable(format!("Postgres connection pool: {other}")),
    }
}

/// True when the statement failed because a table or column the cache knew of is gone
/// (dropped by hand): the caller forgets the cache and retries, rather than refusing.
pub fn is_stale_cache(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::UNDEFINED_TABLE) | Some(&SqlState::UNDEFINED_COLUMN)
    )
}

/// True when a `CREATE … IF NOT EXISTS` or `ADD COLUMN IF NOT EXISTS` lost a race with
/// another loader making the same object: it exists now, which is all that was wanted.
pub fn is_made_concurrently(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::UNIQUE_VIOLATION)
            | Some(&SqlState::DUPLICATE_COLUMN)
            | Some(&SqlState::DUPLICATE_TABLE)
            | Some(&SqlState::DUPLICATE_SCHEMA)
            | Some(&SqlState::DUPLICATE_OBJECT)
    )
}

pub fn retryable(detail: String) -> SendError {
    SendError::Retryable {
        status: None,
        retry_after: None,
        detail,
        answer: None,
    }
}
