//! Sequential reading of the log from a cursor position, up to the durable end.

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use tokio::sync::watch;

use super::segments::{list_segments, segment_path};
use crate::queue::record::{read_record, ReadOutcome};
use crate::queue::Record;

/// One destination's view of the log. Reads are blocking file I/O: call them from
/// `spawn_blocking` or a dedicated thread.
pub struct QueueReader {
    dir: PathBuf,
    position: u64,
    committed: watch::Receiver<u64>,
    /// The segment being read: its base position and a buffered handle.
    open: Option<(u64, BufReader<File>)>,
    /// A replay with an end: records before `stop_at` (where the cursor stood) that were
    /// accepted after `until` (unix seconds) were delivered already and are passed over.
    window: Option<(u32, u64)>,
}

impl QueueReader {
    pub(super) fn new(dir: PathBuf, position: u64, committed: watch::Receiver<u64>) -> Self {
        QueueReader {
            dir,
            position,
            committed,
            open: None,
            window: None,
        }
    }

    /// Passes over records before `stop_at` accepted after `until` (a bounded replay).
    pub fn replay_until(&mut self, until: u32, stop_at: u64) {
        self.window = Some((until, stop_at));
    }

    /// Position of the next record to read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes of durable data not yet read.
    pub fn lag(&self) -> u64 {
        self.committed.borrow().saturating_sub(self.position)
    }

    /// Waits until there is durable data past the read position. Returns false when the
    /// queue has shut down and nothing more will come.
    pub async fn wait_for_data(&mut self) -> bool {
        let position = self.position;
        self.committed.wait_for(|&end| end > position).await.is_ok()
    }

    /// Reads up to `max_records` records or about `max_bytes`, never past the durable end.
    /// On an error, the records read before it are returned (the position stays just past
    /// them) and the error comes back on the next call; nothing is skipped.
    pub fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<Record<u64>>> {
        let end = *self.committed.borrow();
        let mut records = Vec::new();
        let result = self.read_into(&mut records, end, max_records, max_bytes);
        if result.is_err() {
            // Reopen at `position` next time: after an error the buffer may sit mid-record.
            self.open = None;
        } else if self.position == end {
            // At the durable end the buffer may hold bytes of a write that was later cut
            // off: seeking discards it. Cheaper than reopening, which a destination that
            // keeps up would otherwise do on every read.
            if let Some((base, reader)) = self.open.as_mut() {
                if reader.seek(SeekFrom::Start(self.position - *base)).is_err() {
                    self.open = None;
                }
            }
        }
        match result {
            Err(e) if records.is_empty() => Err(e),
            _ => Ok(records),
        }
    }

    fn read_into(
        &mut self,
        records: &mut Vec<Record<u64>>,
        end: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> io::Result<()> {
        let mut bytes = 0;
        while self.position < end && records.len() < max_records && bytes < max_bytes {
            if self.open.is_none() {
                self.open = Some(self.open_at_position()?);
            }
            let (_, reader) = self.open.as_mut().expect("opened above");
            match read_record(reader)? {
                ReadOutcome::Record {
                    source,
                    tag,
                    json,
                    len,
                } => {
                    let at = self.position;
                    self.position += len;
                    let passed = match self.window {
                        Some((_, stop_at)) if at >= stop_at => {
                            self.window = None;
                            false
                        }
                        Some((until, _)) => tag.accepted_at > until,
                        None => false,
                    };
                    bytes += json.len();
                    records.push(Record {
                        source,
                        tag,
                        json,
                        receipt: self.position,
                        earlier: None,
                        passed,
                    });
                }
                // The end of a segment: the next one starts exactly here.
                ReadOutcome::End => {
                    if self.open.take().is_some() && self.next_segment_starts_here()? {
                        continue;
                    }
                    return Err(io::Error::other(format!(
                        "queue data missing at position {} (durable end {end})",
                        self.position
                    )));
                }
                ReadOutcome::Invalid(why) => {
                    return Err(io::Error::other(format!(
                        "corrupt queue record at position {}: {why}",
                        self.position
                    )));
                }
            }
        }
        Ok(())
    }

    fn next_segment_starts_here(&self) -> io::Result<bool> {
        Ok(list_segments(&self.dir)?.contains(&self.position))
    }

    fn open_at_position(&mut self) -> io::Result<(u64, BufReader<File>)> {
        let bases = list_segments(&self.dir)?;
        let base = match bases.iter().rev().find(|&&b| b <= self.position) {
            Some(&b) => b,
            None => {
                // Older data than the oldest segment was deleted: resume at what exists.
                let oldest = *bases
                    .first()
                    .ok_or_else(|| io::Error::other("no segments"))?;
                tracing::warn!(
                    from = self.position,
                    to = oldest,
                    "cursor behind retained data"
                );
                self.position = oldest;
                oldest
            }
        };
        let mut file =
            BufReader::with_capacity(256 * 1024, File::open(segment_path(&self.dir, base))?);
        file.seek(SeekFrom::Start(self.position - base))?;
        Ok((base, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Tag;
    use crate::queue::local::segments::ActiveSegment;
    use crate::queue::record::RecordBatch;

    #[test]
    fn a_read_error_mid_batch_skips_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut one = RecordBatch::with_capacity(64);
        one.push_with("s", crate::message::MessageType::Track, |b| {
            b.extend_from_slice(b"{}");
            Ok::<_, ()>(Tag::default())
        })
        .unwrap();
        let len = one.bytes().len() as u64;
        // Three records per segment, three segments.
        let (mut log, _) = ActiveSegment::open(dir.path(), len * 3).unwrap();
        for _ in 0..9 {
            log.append(&[one.bytes()]).unwrap();
        }
        let (_tx, committed) = watch::channel(9 * len);
        let mut reader = QueueReader::new(dir.path().to_path_buf(), 0, committed);
        // The second segment is missing for a moment.
        let second = segment_path(dir.path(), 3 * len);
        std::fs::rename(&second, dir.path().join("aside")).unwrap();
        assert_eq!(
            reader.read_batch(100, 1 << 20).unwrap().len(),
            3,
            "what was read comes back"
        );
        assert!(reader.read_batch(100, 1 << 20).is_err());
        std::fs::rename(dir.path().join("aside"), &second).unwrap();
        let rest = reader.read_batch(100, 1 << 20).unwrap();
        assert_eq!(rest.len(), 6, "nothing skipped");
        assert_eq!(rest.last().unwrap().receipt, 9 * len);
    }
}
