//! `kind = "file"`: JSON lines appended to a local file, fsynced per batch.
//!
//! The file's length is saved with the cursor. After a crash between writing lines and
//! saving the cursor, the lines past the saved length are cut off and written again, so
//! the file holds each message exactly once.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::{json_lines, DeliveryError, Destination};
use crate::config::FileDestinationConfig;
use crate::queue::{Checkpoint, Record};

pub struct FileDestination {
    path: PathBuf,
    /// Taken while a blocking write runs.
    file: Option<File>,
}

impl FileDestination {
    /// Opens the output, cutting off lines written after the last saved checkpoint.
    pub fn open(
        config: &FileDestinationConfig,
        saved: Option<Checkpoint>,
    ) -> std::io::Result<Self> {
        if let Some(parent) = config.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)?;
        let len = file.metadata()?.len();
        if let Some(checkpoint) = saved {
            // Shorter than saved means the file was rotated or replaced: just append.
            if len > checkpoint.sink_offset {
                tracing::info!(
                    path = %config.path.display(),
                    bytes = len - checkpoint.sink_offset,
                    "cutting lines written after the last checkpoint; they are redelivered"
                );
                file.set_len(checkpoint.sink_offset)?;
                file.sync_all()?;
            }
        }
        Ok(FileDestination {
            path: config.path.clone(),
            file: Some(file),
        })
    }
}

/// Appends `lines` and syncs; on failure cuts the file back to where it was, so a retry
/// does not leave a torn line before its own copy. Returns the new length.
fn append_whole(file: &mut File, lines: &[u8]) -> std::io::Result<u64> {
    let before = file.metadata()?.len();
    match file.write_all(lines).and_then(|_| file.sync_data()) {
        Ok(()) => Ok(before + lines.len() as u64),
        Err(e) => {
            if let Err(undo) = file.set_len(before) {
                tracing::error!(error = %undo, "cannot cut a failed write off the output file");
            }
            Err(e)
        }
    }
}

impl Destination for FileDestination {
    async fn deliver(&mut self, records: &[Record]) -> Result<u64, DeliveryError> {
        let lines = json_lines(records);
        let mut file = match self.file.take() {
            Some(f) => f,
            None => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        };
        let (file, result) = tokio::task::spawn_blocking(move || {
            let result = append_whole(&mut file, &lines);
            (file, result)
        })
        .await
        .map_err(|e| DeliveryError::Io(std::io::Error::other(e)))?;
        self.file = Some(file);
        Ok(result?)
    }
}
