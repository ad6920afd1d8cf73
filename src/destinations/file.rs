//! `kind = "file"`: JSON lines appended to a local file, fsynced before each checkpoint.
//!
//! The file's length is saved with the cursor. After a crash between writing lines and
//! saving the cursor, the lines past the saved length are cut off and written again, so
//! the file holds each message exactly once.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

use super::{
    json_lines, AnyDestination, BatchShape, Destination, DestinationConfig, Kind, Outgoing,
    SendError, Sending,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;

/// `kind = "file"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The output file, one JSON object per line.
    pub path: PathBuf,
}

impl Kind for FileConfig {
    const NAME: &'static str = "file";
    const HTTP: bool = false;

    fn batch_shape(&self) -> BatchShape {
        BatchShape::new(1000, 1024 * 1024, 0)
    }

    fn build(
        &self,
        config: &DestinationConfig,
        saved: Option<Checkpoint>,
        _: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(FileDestination::open(&config.name, self, saved)?))
    }
}

pub struct FileDestination {
    path: PathBuf,
    /// Taken while a blocking write runs (batches go one at a time: `sequential`).
    file: Mutex<Option<File>>,
    /// Where the output not yet handed to the disk starts (see `push_to_disk`).
    pushed: AtomicU64,
}

/// Output is handed to the disk once this much has gathered, rather than all at the
/// checkpoint's sync: 100 ms of output (~2.5 MB at 35 k events/s) written out at once
/// held the device long enough to delay the queue's group commits behind it.
const PUSH_EVERY: u64 = 512 * 1024;

impl FileDestination {
    /// Opens the output, cutting off lines written after the last saved checkpoint.
    pub fn open(
        name: &str,
        config: &FileConfig,
        saved: Option<Checkpoint>,
    ) -> anyhow::Result<Self> {
        let path = config.path.clone();
        Self::open_path(path.clone(), saved).map_err(|e| {
            anyhow::anyhow!("destination `{name}`: cannot open {}: {e}", path.display())
        })
    }

    fn open_path(path: PathBuf, saved: Option<Checkpoint>) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        // Only a mark taken on this very file says which of its lines are ours.
        let ours = saved.filter(|c| c.sink_id == identity(&file));
        if let Some(checkpoint) = ours {
            // Shorter than saved means the file was truncated or rotated: just append.
            if len > checkpoint.sink_offset {
                tracing::info!(
                    path = %path.display(),
                    bytes = len - checkpoint.sink_offset,
                    "cutting lines written after the last checkpoint; they are redelivered"
                );
                file.set_len(checkpoint.sink_offset)?;
                file.sync_all()?;
            }
        }
        let len = file.metadata()?.len();
        Ok(FileDestination {
            path,
            file: Mutex::new(Some(file)),
            pushed: AtomicU64::new(len),
        })
    }

    /// Appends the lines: small batches in place (a write into the page cache costs less
    /// than a blocking-pool hand-off), larger ones on a blocking thread, which the handle
    /// goes to and comes back from.
    async fn append(&self, lines: Vec<u8>) -> Result<u64, SendError> {
        /// Batches up to this size are written in place.
        const WRITE_IN_PLACE: usize = 256 * 1024;
        let taken = self.file.lock().expect("file lock poisoned").take();
        let mut file = match taken {
            Some(f) => f,
            None => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(SendError::io)?,
        };
        let (file, result) = if lines.len() <= WRITE_IN_PLACE {
            let result = append_whole(&mut file, &lines);
            (file, result)
        } else {
            tokio::task::spawn_blocking(move || {
                let result = append_whole(&mut file, &lines);
                (file, result)
            })
            .await
            .map_err(|e| SendError::io(std::io::Error::other(e)))?
        };
        if let Ok(end) = result {
            self.push_to_disk(&file, end);
        }
        *self.file.lock().expect("file lock poisoned") = Some(file);
        result.map_err(SendError::io)
    }

    /// Starts writing out what gathered since the last push, without waiting for it, so
    /// the checkpoint's sync finds little left to write.
    fn push_to_disk(&self, file: &File, end: u64) {
        let from = self.pushed.load(Ordering::Relaxed).min(end);
        let Some(len) = NonZeroU64::new(end - from).filter(|n| n.get() >= PUSH_EVERY) else {
            // Also where a truncated or rotated output starts again.
            self.pushed.store(from, Ordering::Relaxed);
            return;
        };
        start_writeback(file, from, len);
        self.pushed.store(end, Ordering::Relaxed);
    }
}

/// Starts writing out `len` bytes from `from` without waiting: on Linux `DONTNEED` starts
/// writeback of the range's dirty pages (and drops any already clean: the output is never
/// read back). Elsewhere the checkpoint's sync does it all.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, len: NonZeroU64) {
    if let Err(e) = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "cannot start writing out the output file");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: NonZeroU64) {}

/// Device and inode, hashed: what a saved mark refers to.
fn identity(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map_or(0, |m| {
        xxhash_rust::xxh3::xxh3_64(format!("{}:{}", m.dev(), m.ino()).as_bytes()).max(1)
    })
}

/// Appends `lines`; on failure cuts the file back to where it was, so a retry does not
/// leave a torn line before its own copy. Returns the new length. Not synced here: the
/// engine calls `flush` before it saves a cursor that passes these lines (one sync per
/// checkpoint instead of one per batch).
fn append_whole(file: &mut File, lines: &[u8]) -> std::io::Result<u64> {
    let before = file.metadata()?.len();
    match file.write_all(lines) {
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
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        let lines = json_lines(batch);
        Box::pin(self.append(lines))
    }

    fn sequential(&self) -> bool {
        true
    }

    fn flush(&self) -> std::io::Result<()> {
        // The handle is out while a batch is being written; any handle on the file syncs it.
        let held = self.file.lock().expect("file lock poisoned");
        match held.as_ref() {
            Some(file) => file.sync_data(),
            None => {
                drop(held);
                File::open(&self.path)?.sync_data()
            }
        }
    }

    fn sink_id(&self) -> u64 {
        self.file
            .lock()
            .expect("file lock poisoned")
            .as_ref()
            .map_or(0, identity)
    }

    /// The output's length: what was there before this destination wrote is never cut.
    fn mark(&self) -> u64 {
        self.file
            .lock()
            .expect("file lock poisoned")
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    }
}
