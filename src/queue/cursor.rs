//! Persisted read positions, one file per destination.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{segments, Shared};

/// What a destination has durably consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Log position up to which every record is delivered.
    pub position: u64,
    /// Destination-defined mark saved atomically with the position (the file
    /// destination keeps its output length here, to cut off lines written after it).
    #[serde(default)]
    pub sink_offset: u64,
    /// Which output `sink_offset` measures (the file destination: its device and inode,
    /// hashed), so a mark is never applied to another file; 0 when there is none.
    #[serde(default)]
    pub sink_id: u64,
}

/// A destination's handle for saving its checkpoint.
pub struct Cursor {
    name: String,
    shared: Arc<Shared>,
}

const SUFFIX: &str = ".cursor";

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{SUFFIX}"))
}

pub(super) fn load(dir: &Path, name: &str) -> io::Result<Option<Checkpoint>> {
    match fs::read(path(dir, name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every saved cursor's position, by destination name.
pub(super) fn load_all(dir: &Path) -> io::Result<HashMap<String, u64>> {
    let mut all = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
            continue;
        };
        if let Some(checkpoint) = load(dir, name)? {
            all.insert(name.to_string(), checkpoint.position);
        }
    }
    Ok(all)
}

impl Cursor {
    pub(super) fn new(name: &str, shared: Arc<Shared>) -> Cursor {
        Cursor {
            name: name.to_string(),
            shared,
        }
    }

    /// Saves the checkpoint durably (write, fsync, rename), then deletes segments that
    /// every cursor has passed. Blocking: call from a blocking context.
    pub fn commit(&self, checkpoint: Checkpoint) -> io::Result<()> {
        let dir = &self.shared.cursor_dir;
        let tmp = dir.join(format!("{}{SUFFIX}.tmp", self.name));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&checkpoint).map_err(io::Error::other)?)?;
        file.sync_data()?;
        fs::rename(&tmp, path(dir, &self.name))?;
        // The rename must be durable before any segment it frees is deleted.
        segments::sync_dir(dir)?;
        self.shared
            .cursors
            .lock()
            .expect("cursor map poisoned")
            .insert(self.name.clone(), checkpoint.position);
        self.shared.reclaim()?;
        Ok(())
    }
}

/// Forgets a destination's cursor (its file and its hold on the queue). Returns whether
/// there was one.
pub(super) fn remove(shared: &Shared, name: &str) -> io::Result<bool> {
    let existed = match fs::remove_file(path(&shared.cursor_dir, name)) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    segments::sync_dir(&shared.cursor_dir)?;
    let held = shared
        .cursors
        .lock()
        .expect("cursor map poisoned")
        .remove(name)
        .is_some();
    Ok(existed || held)
}

impl Shared {
    /// Deletes the segments every cursor has passed (all but the newest when there is
    /// no cursor left).
    pub(super) fn reclaim(&self) -> io::Result<usize> {
        let oldest_needed = {
            let cursors = self.cursors.lock().expect("cursor map poisoned");
            cursors
                .values()
                .copied()
                .min()
                .unwrap_or_else(|| *self.committed.borrow())
        };
        let deleted = segments::delete_before(&self.queue_dir, oldest_needed, |segment| {
            self.before_delete(segment)
        })?;
        if deleted > 0 {
            if let Some(&oldest) = segments::list_segments(&self.queue_dir)?.first() {
                self.oldest
                    .fetch_max(oldest, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(deleted, oldest_needed, "reclaimed queue segments");
        }
        Ok(deleted)
    }
}
