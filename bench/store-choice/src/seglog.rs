//! Plain append-only segment log: records framed as
//! `[u32 len][u32 crc32][payload]` (little-endian), files rolled at 64 MiB and
//! named after the first sequence number they hold, so reclaim is unlinking
//! whole files.

use crate::store::{Result, Store};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 8;

pub struct SegLog {
    dir: PathBuf,
    /// First sequence number of every segment, ascending; the last is active.
    segments: Vec<u64>,
    active: Option<File>,
    active_len: u64,
    buf: Vec<u8>,
}

impl SegLog {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            active: None,
            active_len: 0,
            buf: Vec::with_capacity(1 << 20),
        })
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(format!("{first_seq:020}.log"))
    }

    fn roll(&mut self, first_seq: u64) -> Result<()> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.segment_path(first_seq))?;
        // The new directory entry must be durable too, or a crash could lose
        // the whole segment even though its data was fdatasync'ed.
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(first_seq);
        self.active = Some(file);
        self.active_len = 0;
        Ok(())
    }
}

impl Store for SegLog {
    fn append(&mut self, first_seq: u64, events: &[&[u8]]) -> Result<()> {
        // Frame the whole commit in memory so it costs one write(2).
        self.buf.clear();
        for ev in events {
            self.buf.extend_from_slice(&(ev.len() as u32).to_le_bytes());
            self.buf
                .extend_from_slice(&crc32fast::hash(ev).to_le_bytes());
            self.buf.extend_from_slice(ev);
        }
        // A commit never straddles two files, so roll before it if needed.
        if self.active.is_none() || self.active_len + self.buf.len() as u64 > SEGMENT_BYTES {
            self.roll(first_seq)?;
        }
        let file = self.active.as_mut().expect("rolled above");
        file.write_all(&self.buf)?;
        file.sync_data()?;
        self.active_len += self.buf.len() as u64;
        Ok(())
    }

    fn read_from(&mut self, from: u64, f: &mut dyn FnMut(u64, &[u8])) -> Result<u64> {
        // Start at the last segment whose first sequence is <= `from`.
        let start = self
            .segments
            .partition_point(|&s| s <= from)
            .saturating_sub(1);
        let mut visited = 0;
        let mut payload = Vec::with_capacity(4096);
        for &first in &self.segments[start..] {
            let mut r = BufReader::with_capacity(1 << 20, File::open(self.segment_path(first))?);
            let mut seq = first;
            let mut header = [0u8; HEADER];
            loop {
                match r.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
                let len = u32::from_le_bytes(header[..4].try_into()?) as usize;
                let crc = u32::from_le_bytes(header[4..].try_into()?);
                payload.resize(len, 0);
                r.read_exact(&mut payload)?;
                if crc32fast::hash(&payload) != crc {
                    return Err(format!("crc mismatch at seq {seq}").into());
                }
                if seq >= from {
                    f(seq, &payload);
                    visited += 1;
                }
                seq += 1;
            }
        }
        Ok(visited)
    }

    fn reclaim_below(&mut self, seq: u64) -> Result<()> {
        // Segment i is wholly below `seq` iff the next segment starts <= seq.
        let keep_from = self
            .segments
            .partition_point(|&s| s <= seq)
            .saturating_sub(1);
        let dropped: Vec<u64> = self.segments.drain(..keep_from).collect();
        for first in dropped {
            fs::remove_file(self.segment_path(first))?;
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}
