//! `kind = "stdout"`: JSON lines on standard output (logs go to standard error).

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{json_lines, Destination, SendError};

pub struct StdoutDestination {
    out: Mutex<tokio::io::Stdout>,
}

impl StdoutDestination {
    pub fn new() -> Self {
        StdoutDestination {
            out: Mutex::new(tokio::io::stdout()),
        }
    }
}

impl Default for StdoutDestination {
    fn default() -> Self {
        Self::new()
    }
}

impl Destination for StdoutDestination {
    async fn send(&self, messages: &[&[u8]]) -> Result<u64, SendError> {
        let mut out = self.out.lock().await;
        out.write_all(&json_lines(messages))
            .await
            .map_err(SendError::io)?;
        out.flush().await.map_err(SendError::io)?;
        Ok(0)
    }

    fn sequential(&self) -> bool {
        true
    }
}
