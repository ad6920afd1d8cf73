//! Persisted read positions, one file per destination.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{segments, Shared, SCAN_PAUSE};

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
    /// The open cursor file and the sequence number of its newest slot, once a save
    /// has found (or made) the file in the slot format.
    slots: Option<(fs::File, u64)>,
}

const SUFFIX: &str = ".cursor";

/// A cursor file is two slots of `SLOT` bytes. A save overwrites the older slot in place
/// and syncs it: once the file exists, saving needs no new disk block, so a destination
/// can still record its progress on a full disk (which is what lets the queue delete
/// segments and free the disk), and a torn write spoils only the slot being written.
/// (On copy-on-write filesystems an overwrite may still need space.)
const SLOT: usize = 512;
const MAGIC: &[u8; 4] = b"fcu1";
/// magic, sequence, position, sink_offset, sink_id, then the CRC of those.
const SLOT_USED: usize = 4 + 4 * 8;

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{SUFFIX}"))
}

fn encode_slot(sequence: u64, checkpoint: &Checkpoint) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..4].copy_from_slice(MAGIC);
    let fields = [
        sequence,
        checkpoint.position,
        checkpoint.sink_offset,
        checkpoint.sink_id,
    ];
    for (i, value) in fields.iter().enumerate() {
        slot[4 + i * 8..12 + i * 8].copy_from_slice(&value.to_le_bytes());
    }
    let crc = crc32fast::hash(&slot[..SLOT_USED]);
    slot[SLOT_USED..SLOT_USED + 4].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// Where the slot of sequence number `sequence` lies: the two alternate.
fn slot_offset(sequence: u64) -> u64 {
    (sequence % 2) * SLOT as u64
}

/// A whole new cursor file holding one checkpoint, in its sequence number's slot.
fn slot_file(sequence: u64, checkpoint: &Checkpoint) -> Vec<u8> {
    let mut bytes = vec![0u8; 2 * SLOT];
    let at = slot_offset(sequence) as usize;
    bytes[at..at + SLOT].copy_from_slice(&encode_slot(sequence, checkpoint));
    bytes
}

/// A slot's sequence number and checkpoint, if it holds a whole one.
fn decode_slot(slot: &[u8]) -> Option<(u64, Checkpoint)> {
    if slot.len() < SLOT_USED + 4 || &slot[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(slot[SLOT_USED..SLOT_USED + 4].try_into().ok()?);
    if crc32fast::hash(&slot[..SLOT_USED]) != crc {
        return None;
    }
    let field = |i: usize| u64::from_le_bytes(slot[4 + i * 8..12 + i * 8].try_into().expect("8"));
    let checkpoint = Checkpoint {
        position: field(1),
        sink_offset: field(2),
        sink_id: field(3),
    };
    Some((field(0), checkpoint))
}

/// The newest whole slot of a slot-format file.
fn newest_slot(bytes: &[u8]) -> Option<(u64, Checkpoint)> {
    bytes
        .chunks(SLOT)
        .take(2)
        .filter_map(decode_slot)
        .max_by_key(|&(sequence, _)| sequence)
}

/// Reads a cursor file: the slot format, or the JSON one of earlier versions (rewritten
/// in slots at the next save).
fn parse(bytes: &[u8]) -> io::Result<Checkpoint> {
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(io::Error::other);
    }
    newest_slot(bytes)
        .map(|(_, checkpoint)| checkpoint)
        .ok_or_else(|| io::Error::other("cursor file holds no whole checkpoint"))
}

pub(super) fn load(dir: &Path, name: &str) -> io::Result<Option<Checkpoint>> {
    let path = path(dir, name);
    match fs::read(&path) {
        Ok(bytes) => parse(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
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
            slots: None,
        }
    }

    /// Saves the checkpoint durably, then deletes segments that every cursor has passed.
    /// Blocking: call from a blocking context.
    pub fn commit(&mut self, checkpoint: Checkpoint) -> io::Result<()> {
        let path = path(&self.shared.cursor_dir, &self.name);
        self.write(&path, &checkpoint)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        self.shared
            .cursors
            .lock()
            .expect("cursor map poisoned")
            .insert(self.name.clone(), checkpoint.position);
        self.shared.want_reclaim();
        Ok(())
    }

    fn write(&mut self, path: &Path, checkpoint: &Checkpoint) -> io::Result<()> {
        if self.slots.is_none() {
            self.slots = open_slots(path)?;
        }
        let Some((file, sequence)) = self.slots.as_mut() else {
            // No file in the slot format yet (new, or written by an earlier version):
            // make one whole, with this checkpoint in its first slot.
            let dir = &self.shared.cursor_dir;
            let tmp = dir.join(format!("{}{SUFFIX}.tmp", self.name));
            let bytes = slot_file(1, checkpoint);
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_data()?;
            fs::rename(&tmp, path)?;
            // The rename must be durable before any segment it frees is deleted.
            segments::sync_dir(dir)?;
            self.slots = Some((fs::OpenOptions::new().read(true).write(true).open(path)?, 1));
            return Ok(());
        };
        let next = *sequence + 1;
        file.write_all_at(&encode_slot(next, checkpoint), slot_offset(next))?;
        file.sync_data()?;
        *sequence = next;
        Ok(())
    }
}

/// The cursor file at `path` opened for saving, with its newest sequence number; `None`
/// when there is none in the slot format.
fn open_slots(path: &Path) -> io::Result<Option<(fs::File, u64)>> {
    let mut file = match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::with_capacity(2 * SLOT);
    file.read_to_end(&mut bytes)?;
    if bytes.len() != 2 * SLOT {
        return Ok(None);
    }
    Ok(newest_slot(&bytes).map(|(sequence, _)| (file, sequence)))
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
        let oldest_cursor = self.oldest_cursor();
        if oldest_cursor < self.oldest_end.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        let oldest_needed = oldest_cursor.min(self.retained_from()?);
        let deleted = segments::delete_before(&self.queue_dir, oldest_needed, |segment| {
            self.before_delete(segment, Some(SCAN_PAUSE))
        })?;
        if deleted > 0 {
            tracing::debug!(deleted, oldest_needed, "reclaimed queue segments");
        }
        self.note_oldest()?;
        Ok(deleted)
    }

    /// Takes the oldest segment's base and end from the directory.
    fn note_oldest(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let bases = segments::list_segments(&self.queue_dir)?;
        if let Some(&oldest) = bases.first() {
            self.oldest.fetch_max(oldest, Relaxed);
        }
        // Behind a roll the writer lowers it again (`fetch_min` with the new base).
        self.oldest_end
            .store(bases.get(1).copied().unwrap_or(u64::MAX), Relaxed);
        Ok(())
    }

    /// The lowest cursor position (the durable end when there is no cursor).
    fn oldest_cursor(&self) -> u64 {
        let cursors = self.cursors.lock().expect("cursor map poisoned");
        cursors
            .values()
            .copied()
            .min()
            .unwrap_or_else(|| *self.committed.borrow())
    }

    /// Where `server.retention` keeps the log from: the first segment written to within
    /// the retention time (the newest always counts as such).
    fn retained_from(&self) -> io::Result<u64> {
        let retention = self
            .retention_secs
            .load(std::sync::atomic::Ordering::Relaxed);
        if retention == 0 {
            return Ok(u64::MAX);
        }
        let cutoff = std::time::SystemTime::from(self.clock.now())
            - std::time::Duration::from_secs(retention);
        let bases = segments::list_segments(&self.queue_dir)?;
        for pair in bases.windows(2) {
            let path = segments::segment_path(&self.queue_dir, pair[0]);
            match fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(written) if written < cutoff => continue,
                // Gone meanwhile (another reclaim): what follows decides.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                _ => return Ok(pair[0]),
            }
        }
        Ok(bases.last().copied().unwrap_or(u64::MAX))
    }

    /// Deletes the oldest retained segments no cursor needs until `more` bytes fit in the
    /// budget (or nothing retained is left); returns how many went. Counted: retention
    /// gave way to the budget.
    pub(super) fn evict_retained(&self, more: u64) -> io::Result<usize> {
        let end = *self.committed.borrow();
        let needed = self.oldest_cursor();
        let bases = segments::list_segments(&self.queue_dir)?;
        let mut until = None;
        for pair in bases.windows(2) {
            if pair[1] > needed {
                break;
            }
            until = Some(pair[1]);
            if end.saturating_sub(pair[1]) + more <= self.max_bytes {
                break;
            }
        }
        let Some(until) = until else {
            return Ok(0);
        };
        // An append is waiting for the room: no pauses.
        let deleted = segments::delete_before(&self.queue_dir, until, |segment| {
            self.before_delete(segment, None)
        })?;
        self.note_oldest()?;
        if deleted > 0 {
            crate::metrics::retention_evicted(deleted as u64);
            tracing::warn!(
                segments = deleted,
                "deleted retained queue segments before their retention ended: \
                 server.max_queue_bytes is reached"
            );
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::queue::LocalQueue as Queue;

    #[tokio::test]
    async fn with_no_destination_a_roll_deletes_what_nobody_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _writer) = Queue::open(dir.path(), 256, 1 << 30, Clock::system()).unwrap();
        fill_and_wait_for_one_segment(&queue, dir.path()).await;
    }

    /// Retention measures a segment's age with the queue's clock: two hours ahead of the
    /// system's, segments written now are past an hour's retention.
    #[tokio::test]
    async fn retention_ages_segments_by_the_queue_clock() {
        let dir = tempfile::tempdir().unwrap();
        #[allow(clippy::disallowed_methods)] // a clock set off from the system's on purpose
        let ahead = chrono::Utc::now() + chrono::TimeDelta::hours(2);
        let clock = Clock::following_tokio(ahead);
        let (queue, _writer) = Queue::open(dir.path(), 256, 1 << 30, clock).unwrap();
        queue.set_retention(std::time::Duration::from_secs(3600));
        fill_and_wait_for_one_segment(&queue, dir.path()).await;
    }

    /// Appends 20 records over many small segments, then waits until the log is down to
    /// one segment (at most 5 s).
    async fn fill_and_wait_for_one_segment(queue: &Queue, dir: &std::path::Path) {
        for _ in 0..20 {
            let mut batch = crate::queue::RecordBatch::with_capacity(128);
            batch
                .push_with("s", crate::message::MessageType::Track, |b| {
                    b.extend_from_slice(&[b' '; 100]);
                    Ok::<_, ()>(crate::message::Tag::default())
                })
                .unwrap();
            queue.append(batch).await.unwrap();
        }
        let queue_dir = dir.join("queue");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while segments::list_segments(&queue_dir).unwrap().len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "segments kept with no destination: {:?}",
                segments::list_segments(&queue_dir).unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn checkpoint(position: u64) -> Checkpoint {
        Checkpoint {
            position,
            sink_offset: position * 10,
            sink_id: 7,
        }
    }

    #[test]
    fn saves_in_place_and_reads_the_newest_whole_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _writer) = Queue::open(dir.path(), 1 << 20, 1 << 30, Clock::system()).unwrap();
        let (_, mut cursor, saved) = queue.subscribe("d").unwrap();
        assert_eq!(saved, None);
        let file = dir.path().join("cursors/d.cursor");
        for position in 0..5 {
            cursor.commit(checkpoint(position)).unwrap();
            assert_eq!(
                load(file.parent().unwrap(), "d").unwrap(),
                Some(checkpoint(position))
            );
        }
        assert_eq!(fs::metadata(&file).unwrap().len(), 2 * SLOT as u64);
        // A torn write spoils the slot being written; the other one still reads.
        let mut bytes = fs::read(&file).unwrap();
        let newest = slot_offset(5) as usize;
        bytes[newest + 9] ^= 0xff;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(
            load(file.parent().unwrap(), "d").unwrap(),
            Some(checkpoint(3))
        );
    }

    #[test]
    fn a_torn_second_save_leaves_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _writer) = Queue::open(dir.path(), 1 << 20, 1 << 30, Clock::system()).unwrap();
        let (_, mut cursor, _) = queue.subscribe("d").unwrap();
        let file = dir.path().join("cursors/d.cursor");
        cursor.commit(checkpoint(1)).unwrap();
        cursor.commit(checkpoint(2)).unwrap();
        let mut bytes = fs::read(&file).unwrap();
        bytes[slot_offset(2) as usize + 20] ^= 0xff;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(
            load(file.parent().unwrap(), "d").unwrap(),
            Some(checkpoint(1))
        );
    }

    #[test]
    fn reads_the_json_of_earlier_versions_and_rewrites_it_in_slots() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("cursors")).unwrap();
        let file = dir.path().join("cursors/d.cursor");
        fs::write(&file, r#"{"position":0,"sink_offset":3}"#).unwrap();
        let (queue, _writer) = Queue::open(dir.path(), 1 << 20, 1 << 30, Clock::system()).unwrap();
        let (_, mut cursor, saved) = queue.subscribe("d").unwrap();
        let old = Checkpoint {
            position: 0,
            sink_offset: 3,
            sink_id: 0,
        };
        assert_eq!(saved, Some(old));
        cursor.commit(checkpoint(0)).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().len(), 2 * SLOT as u64);
        assert_eq!(
            load(file.parent().unwrap(), "d").unwrap(),
            Some(checkpoint(0))
        );
    }
}
