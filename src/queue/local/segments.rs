//! The log on disk: numbered segment files addressed by global byte position.
//!
//! A segment is named after the log position of its first byte, so a cursor is a single
//! `u64` and finding the file for it is a directory listing. Records never span segments,
//! and a whole segment is deleted once every cursor has passed it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::message::Tag;
use crate::queue::record::{read_record, read_tag, Body, ReadOutcome, TagOutcome};

const SUFFIX: &str = ".seg";
/// A segment being removed: out of the log, its space not yet all freed.
const REMOVING_SUFFIX: &str = ".seg.removing";
/// Bytes a paced scan reads between pauses (see `scan_segment`).
const SCAN_PAUSE_EVERY: u64 = 1 << 20;
/// Bytes freed at a time when a segment is removed (see `remove_segment`).
const FREE_STEP: u64 = 4 * 1024 * 1024;

pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{SUFFIX}"))
}

/// Base positions of the segments in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name
            .strip_suffix(SUFFIX)
            .and_then(|n| n.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Makes a new directory entry durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being appended to. Only the writer thread owns one.
pub struct ActiveSegment {
    dir: PathBuf,
    file: File,
    base: u64,
    len: u64,
    segment_bytes: u64,
    /// Set when a failed write could not be cut back: the file's tail is unknown.
    poisoned: bool,
}

/// What recovery found when the log was opened.
#[derive(Debug)]
pub struct Recovered {
    /// First retained position (base of the oldest segment).
    pub start: u64,
    /// End of the last complete record: where appends continue.
    pub end: u64,
    /// Bytes of a torn tail that were cut off.
    pub truncated: u64,
    /// Where the oldest segment ends: the second one's base (`u64::MAX` if it is alone).
    pub oldest_end: u64,
}

impl ActiveSegment {
    /// Opens the log in `dir`, cutting off any torn tail left by a crash.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(ActiveSegment, Recovered)> {
        fs::create_dir_all(dir)?;
        finish_removals(dir)?;
        let bases = list_segments(dir)?;
        let (base, start) = match (bases.first(), bases.last()) {
            (Some(&first), Some(&last)) => (last, first),
            _ => {
                File::create(segment_path(dir, 0))?;
                sync_dir(dir)?;
                (0, 0)
            }
        };
        let path = segment_path(dir, base);
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        let on_disk = file.metadata()?.len();
        let valid = valid_prefix(&file)?;
        if valid < on_disk {
            // Bytes past the last whole record were never acknowledged: drop them.
            file.set_len(valid)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(valid))?;
        let active = ActiveSegment {
            dir: dir.to_path_buf(),
            file,
            base,
            len: valid,
            segment_bytes,
            poisoned: false,
        };
        let recovered = Recovered {
            start,
            end: base + valid,
            truncated: on_disk - valid,
            oldest_end: bases.get(1).copied().unwrap_or(u64::MAX),
        };
        Ok((active, recovered))
    }

    /// True once a failed write could not be undone; every later append fails.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Log position of the segment's first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Log position after the last appended byte.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Writes `chunks` as one durable append and returns the new end position.
    /// On error the segment is cut back to where it was, so nothing half-written remains.
    pub fn append(&mut self, chunks: &[&[u8]]) -> io::Result<u64> {
        if self.poisoned {
            return Err(io::Error::other("an earlier write could not be undone"));
        }
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if self.len > 0 && self.len + total > self.segment_bytes {
            self.roll()?;
        }
        match self.write_and_sync(chunks) {
            Ok(()) => {
                self.len += total;
                Ok(self.end())
            }
            Err(e) => {
                let undone = self
                    .file
                    .set_len(self.len)
                    .and_then(|_| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                self.poisoned = undone.is_err();
                Err(e)
            }
        }
    }

    fn write_and_sync(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut remaining = &mut slices[..];
        while !remaining.is_empty() {
            match self.file.write_vectored(remaining) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut remaining, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.file.sync_data()
    }

    fn roll(&mut self) -> io::Result<()> {
        let base = self.end();
        let path = segment_path(&self.dir, base);
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path);
        let file = match created {
            Ok(file) => file,
            // Left by a roll whose directory sync failed: nothing was written to it, and
            // taking it over is the only way appends can go on.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                if file.metadata()?.len() != 0 {
                    return Err(io::Error::other(format!(
                        "{} exists and is not empty",
                        path.display()
                    )));
                }
                file
            }
            Err(e) => return Err(e),
        };
        sync_dir(&self.dir)?;
        self.file = file;
        self.base = base;
        self.len = 0;
        Ok(())
    }
}

/// Length of the longest prefix of `file` made of whole, valid records.
fn valid_prefix(file: &File) -> io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(0))?;
    let mut valid = 0;
    while let ReadOutcome::Record { len, .. } = read_record(&mut reader)? {
        valid += len;
    }
    Ok(valid)
}

/// Calls `each(source, tag)` for every valid record of the segment at `path`, reading
/// each message as `body` says. With `pause`, sleeps that long after each
/// `SCAN_PAUSE_EVERY` bytes passed, so a long scan shares the core in short pieces.
pub fn scan_segment(
    path: &Path,
    pause: Option<std::time::Duration>,
    body: Body,
    mut each: impl FnMut(&str, Tag),
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut scratch = Vec::new();
    let mut since_pause = 0;
    while let TagOutcome::Record { source, tag, len } = read_tag(&mut reader, &mut scratch, body)? {
        each(source, tag);
        since_pause += len;
        if let Some(pause) = pause.filter(|_| since_pause >= SCAN_PAUSE_EVERY) {
            std::thread::sleep(pause);
            since_pause = 0;
        }
    }
    Ok(())
}

/// The source and tag of every record of the segment at `path`, which every cursor has
/// passed (so read whole, each record checked): the messages are passed over. Records
/// of a few hundred bytes, mostly of a few sources: the list has room for most segments'
/// records at once, and a run of one source shares one string.
pub fn segment_tags(
    path: &Path,
    pause: Option<std::time::Duration>,
) -> io::Result<Vec<(Arc<str>, Tag)>> {
    let size = fs::metadata(path).map_or(0, |m| m.len());
    let mut records: Vec<(Arc<str>, Tag)> = Vec::with_capacity((size / 256) as usize);
    let mut last: Option<Arc<str>> = None;
    scan_segment(path, pause, Body::Skipped, |source, tag| {
        let source = match &last {
            Some(known) if **known == *source => known.clone(),
            _ => last.insert(Arc::from(source)).clone(),
        };
        records.push((source, tag));
    })?;
    Ok(records)
}

/// Calls `each(position, tag)` for every valid record of the segment at `path`, whose
/// first byte is log position `base`, until `each` returns false.
pub fn scan_positions(
    path: &Path,
    base: u64,
    mut each: impl FnMut(u64, Tag) -> bool,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut position = base;
    while let ReadOutcome::Record { tag, len, .. } = read_record(&mut reader)? {
        if !each(position, tag) {
            break;
        }
        position += len;
    }
    Ok(())
}

/// Deletes every segment that lies wholly before `position`; the newest is always kept.
/// `before_delete` runs first for each; if it fails, that segment stays.
pub fn delete_before(
    dir: &Path,
    position: u64,
    before_delete: impl Fn(&Path) -> io::Result<()>,
) -> io::Result<usize> {
    let bases = list_segments(dir)?;
    let mut deleted = 0;
    for pair in bases.windows(2) {
        let (base, next) = (pair[0], pair[1]);
        if next > position {
            break;
        }
        let path = segment_path(dir, base);
        if !path.exists() {
            continue;
        }
        before_delete(&path)?;
        // Several cursors may reclaim at once; a file already gone is fine.
        if remove_segment(dir, &path)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Takes a segment out of the log and frees its space a step at a time. False if it was
/// gone already. Freeing a whole segment in one unlink held the device for ~12 ms on a
/// filesystem mounted with `discard` (ext4 discards freed blocks as it frees them), and
/// every group commit queued behind it; in `FREE_STEP`s the log's syncs go in between.
/// The rename is made durable first, so a crash part-way never leaves a shortened
/// segment in the log: what it leaves is finished by `finish_removals` at the next start.
fn remove_segment(dir: &Path, path: &Path) -> io::Result<bool> {
    let removing = path.with_extension(&REMOVING_SUFFIX[1..]);
    match fs::rename(path, &removing) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    sync_dir(dir)?;
    free_and_unlink(&removing)?;
    Ok(true)
}

fn free_and_unlink(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > FREE_STEP {
        len -= FREE_STEP;
        file.set_len(len)?;
    }
    drop(file);
    fs::remove_file(path)
}

/// Finishes the removals a crash or an error interrupted.
fn finish_removals(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let removing = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(REMOVING_SUFFIX));
        if removing {
            free_and_unlink(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::record::RecordBatch;

    fn one(json: &str) -> Vec<u8> {
        let mut b = RecordBatch::with_capacity(64);
        b.push_with("s", crate::message::MessageType::Track, |buf| {
            buf.extend_from_slice(json.as_bytes());
            Ok::<_, ()>(crate::message::Tag::default())
        })
        .unwrap();
        b.into_bytes()
    }

    #[test]
    fn recovery_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let rec = one(r#"{"n":1}"#);
        let (mut seg, r) = ActiveSegment::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.start, r.end), (0, 0));
        let end = seg.append(&[&rec, &rec]).unwrap();
        assert_eq!(end, 2 * rec.len() as u64);
        drop(seg);
        // Simulate a crash in the middle of a write.
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&rec[..rec.len() - 3]).unwrap();
        drop(f);
        let (seg, r) = ActiveSegment::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(r.end, end);
        assert_eq!(r.truncated, rec.len() as u64 - 3);
        assert_eq!(seg.end(), end);
        assert_eq!(fs::metadata(&path).unwrap().len(), end);
    }

    #[test]
    fn a_roll_whose_directory_sync_failed_is_taken_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let rec = one(r#"{"n":1}"#);
        let l = rec.len() as u64;
        let (mut seg, _) = ActiveSegment::open(dir.path(), 2 * l).unwrap();
        seg.append(&[&rec, &rec]).unwrap();
        // The next segment's file exists, empty, as a failed roll leaves it.
        File::create(segment_path(dir.path(), 2 * l)).unwrap();
        assert_eq!(seg.append(&[&rec]).unwrap(), 3 * l);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![0, 2 * l]);
        // One that holds data is not overwritten.
        let (mut seg, _) = ActiveSegment::open(dir.path(), l).unwrap();
        std::fs::write(segment_path(dir.path(), 3 * l), b"x").unwrap();
        assert!(seg.append(&[&rec]).is_err());
    }

    #[test]
    fn rolls_segments_and_deletes_consumed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rec = one(r#"{"n":1}"#);
        let (mut seg, _) = ActiveSegment::open(dir.path(), rec.len() as u64 * 2).unwrap();
        for _ in 0..5 {
            seg.append(&[&rec]).unwrap();
        }
        let l = rec.len() as u64;
        assert_eq!(list_segments(dir.path()).unwrap(), vec![0, 2 * l, 4 * l]);
        // A cursor in the middle of the second segment frees only the first.
        assert_eq!(delete_before(dir.path(), 3 * l, |_| Ok(())).unwrap(), 1);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2 * l, 4 * l]);
        // The newest segment survives even when everything is consumed.
        assert_eq!(delete_before(dir.path(), 5 * l, |_| Ok(())).unwrap(), 1);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![4 * l]);
        // Nothing of the removed ones is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(seg);
        let (_, r) = ActiveSegment::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.start, r.end), (4 * l, 5 * l));
    }

    #[test]
    fn a_removal_cut_short_is_finished_at_open_and_never_read_as_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let rec = one(r#"{"n":1}"#);
        let l = rec.len() as u64;
        let (mut seg, _) = ActiveSegment::open(dir.path(), l * 2).unwrap();
        for _ in 0..3 {
            seg.append(&[&rec]).unwrap();
        }
        drop(seg);
        // A crash after the rename, part-way through freeing a segment larger than a step.
        let removing = dir.path().join(format!("{:020}.seg.removing", 0));
        fs::rename(segment_path(dir.path(), 0), &removing).unwrap();
        File::options()
            .write(true)
            .open(&removing)
            .unwrap()
            .set_len(3 * FREE_STEP + 5)
            .unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2 * l]);
        let (_, r) = ActiveSegment::open(dir.path(), l * 2).unwrap();
        assert!(!removing.exists());
        assert_eq!((r.start, r.end), (2 * l, 3 * l));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Whatever a crash left after the last whole record (a torn record, garbage,
            /// zeros of a pre-allocated tail), recovery finds the true end and cuts there.
            #[test]
            fn recovery_finds_the_end_of_the_last_whole_record(
                count in 1usize..5,
                tail in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    (1usize..4096).prop_map(|n| vec![0u8; n]),
                ],
                torn in 0usize..20,
            ) {
                let dir = tempfile::tempdir().unwrap();
                let rec = one(r#"{"n":1}"#);
                let (mut seg, _) = ActiveSegment::open(dir.path(), 1 << 20).unwrap();
                for _ in 0..count {
                    seg.append(&[&rec]).unwrap();
                }
                let end = seg.end();
                drop(seg);
                let mut f = OpenOptions::new().append(true).open(segment_path(dir.path(), 0)).unwrap();
                f.write_all(&rec[..torn.min(rec.len() - 1)]).unwrap();
                f.write_all(&tail).unwrap();
                drop(f);
                let (seg, r) = ActiveSegment::open(dir.path(), 1 << 20).unwrap();
                prop_assert_eq!(r.end, end);
                prop_assert_eq!(seg.end(), end);
            }
        }
    }
}
