//! `keys.bin`: the dedupe keys of deleted log segments, 16 bytes each
//! (`[3×u32 key][u32 expiry]`), so the window outlives the segments it came from.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::message::DedupeKey;

const ENTRY: usize = 16;
/// Bytes appended between syncs. A segment's keys (~1.5 MB) written and synced at once
/// held the device for ~8 ms, and the queue's group commits waited behind it.
const SYNC_EVERY: usize = 256 * 1024;

pub struct KeyLog {
    path: PathBuf,
    file: Mutex<File>,
    /// Past this size, the log is rewritten from the live window.
    compact_at: u64,
}

impl KeyLog {
    pub fn open(dir: &Path, max_entries: usize) -> io::Result<KeyLog> {
        let path = dir.join("keys.bin");
        let opened = fs::create_dir_all(dir).and_then(|()| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&path)
        });
        let file = opened.map_err(|e| at(&path, e))?;
        // Room for two windows' worth before compacting.
        let compact_at = (max_entries as u64)
            .saturating_mul(2 * ENTRY as u64)
            .max(1 << 20);
        Ok(KeyLog {
            path,
            file: Mutex::new(file),
            compact_at,
        })
    }

    /// Calls `each(key, expiry)` for every whole entry; returns how many there were.
    pub fn load(&self, mut each: impl FnMut(DedupeKey, u32)) -> io::Result<usize> {
        let file = File::open(&self.path).map_err(|e| at(&self.path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut entry = [0u8; ENTRY];
        let mut count = 0;
        // A torn last entry (crash mid-append) is ignored.
        while reader.read_exact(&mut entry).is_ok() {
            let word =
                |i: usize| u32::from_le_bytes(entry[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            each(DedupeKey([word(0), word(1), word(2)]), word(3));
            count += 1;
        }
        Ok(count)
    }

    /// True when the log has grown past its bound and is worth rewriting.
    pub fn oversized(&self) -> io::Result<bool> {
        let file = self.file.lock().expect("key log poisoned");
        Ok(file.metadata().map_err(|e| at(&self.path, e))?.len() > self.compact_at)
    }

    /// Appends entries durably, `SYNC_EVERY` bytes at a time. Returns true when the log
    /// has grown past its bound. On an error the log is cut back to its length before, so
    /// no torn entry stays in the middle of it.
    pub fn append(&self, entries: &[(DedupeKey, u32)]) -> io::Result<bool> {
        let mut file = self.file.lock().expect("key log poisoned");
        let before = file.metadata().map_err(|e| at(&self.path, e))?.len();
        let written = encode(entries)
            .chunks(SYNC_EVERY)
            .try_for_each(|chunk| file.write_all(chunk).and_then(|()| file.sync_data()));
        if let Err(e) = written {
            // Shrinking needs no space, so this works on a full disk too.
            let _ = file.set_len(before);
            return Err(at(&self.path, e));
        }
        Ok(file.metadata().map_err(|e| at(&self.path, e))?.len() > self.compact_at)
    }

    /// Replaces the log with the entries `fill` writes (write, fsync, rename).
    /// `fill` is handed a writer and calls it with chunks of entries. On an error the
    /// old log stays and the partial new one is removed.
    pub fn rewrite(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(&[(DedupeKey, u32)]) -> io::Result<()>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut file = self.file.lock().expect("key log poisoned");
        let tmp = self.path.with_extension("tmp");
        let written = (|| {
            let mut fresh = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            fill(&mut |chunk| fresh.write_all(&encode(chunk)))?;
            let fresh = fresh.into_inner().map_err(|e| e.into_error())?;
            fresh.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(at(&tmp, e));
        }
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| at(dir, e))?;
        }
        *file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(|e| at(&self.path, e))?;
        Ok(())
    }
}

/// The error with the path it is about: "No space left on device" alone names no file.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn encode(entries: &[(DedupeKey, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY);
    for (key, expires) in entries {
        for word in key.0.iter().chain([expires]) {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    out
}
