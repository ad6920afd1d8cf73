//! `kind = "stdout"`: JSON lines on standard output (logs go to standard error).

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{
    json_lines, AnyDestination, BatchShape, Destination, DestinationConfig, Kind, Outgoing,
    SendError, Sending,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;

/// `kind = "stdout"` has no keys of its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

impl Kind for StdoutConfig {
    const NAME: &'static str = "stdout";
    const HTTP: bool = false;

    fn batch_shape(&self) -> BatchShape {
        BatchShape::new(1000, 1024 * 1024, 0)
    }

    fn build(
        &self,
        _: &DestinationConfig,
        _: Option<Checkpoint>,
        _: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(StdoutDestination::new()))
    }
}

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
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        let lines = json_lines(batch);
        Box::pin(async move {
            let mut out = self.out.lock().await;
            out.write_all(&lines).await.map_err(SendError::io)?;
            out.flush().await.map_err(SendError::io)?;
            Ok(0)
        })
    }

    fn sequential(&self) -> bool {
        true
    }
}
