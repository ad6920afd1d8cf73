//! `kind = "stdout"`: JSON lines on standard output (logs go to standard error).

use tokio::io::AsyncWriteExt;

use super::{json_lines, DeliveryError, Destination};
use crate::queue::Record;

pub struct StdoutDestination {
    out: tokio::io::Stdout,
}

impl StdoutDestination {
    pub fn new() -> Self {
        StdoutDestination {
            out: tokio::io::stdout(),
        }
    }
}

impl Default for StdoutDestination {
    fn default() -> Self {
        Self::new()
    }
}

impl Destination for StdoutDestination {
    async fn deliver(&mut self, records: &[Record]) -> Result<u64, DeliveryError> {
        self.out.write_all(&json_lines(records)).await?;
        self.out.flush().await?;
        Ok(0)
    }
}
