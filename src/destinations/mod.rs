//! Stage 8: destination kinds, one file each, behind one trait.

mod file;
mod stdout;

use std::future::Future;

pub use file::FileDestination;
pub use stdout::StdoutDestination;

use crate::queue::Record;

/// Why a delivery did not complete; the delivery loop retries it.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Receives messages in queue order.
pub trait Destination: Send + 'static {
    /// Delivers `records` (all or none, from the queue's point of view: the cursor
    /// moves only after success). Returns the mark to save with the cursor.
    fn deliver(
        &mut self,
        records: &[Record],
    ) -> impl Future<Output = Result<u64, DeliveryError>> + Send;
}

/// One JSON line per record, as written by file-like destinations.
fn json_lines(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.json.len() + 1).sum());
    for record in records {
        out.extend_from_slice(&record.json);
        out.push(b'\n');
    }
    out
}
