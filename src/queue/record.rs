//! How one accepted message is framed in the log.
//!
//! `[u32 LE payload length][u32 LE crc32 of payload][payload]`, payload =
//! `[u8 version][u8 source name length][source name][message JSON]`. The CRC lets recovery
//! find the end of the last complete write after a crash.

use std::io::{self, Read};

/// Bytes before the payload: length and CRC.
pub const HEADER_LEN: usize = 8;
const VERSION: u8 = 1;
/// Largest payload a reader accepts; anything larger is a corrupt length field.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// Messages of one request, framed and ready to append in one write.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Vec<u8>,
    count: usize,
}

impl RecordBatch {
    pub fn with_capacity(bytes: usize) -> RecordBatch {
        RecordBatch {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Frames one message. `write_json` appends the message's JSON to the buffer it is given.
    pub fn push_with<E>(
        &mut self,
        source: &str,
        write_json: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER_LEN]);
        self.buf.push(VERSION);
        // Source names are validated to at most 64 bytes.
        self.buf.push(source.len() as u8);
        self.buf.extend_from_slice(source.as_bytes());
        if let Err(e) = write_json(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        let payload = &self.buf[start + HEADER_LEN..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// One message read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    /// Log position just past this record: a cursor set here has consumed it.
    pub end: u64,
    pub source: String,
    pub json: Vec<u8>,
}

/// Why a record could not be read.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole, valid record of this many bytes (header included).
    Record {
        source: String,
        json: Vec<u8>,
        len: u64,
    },
    /// Clean end of data.
    End,
    /// A torn or corrupt record: the data ends here.
    Invalid(&'static str),
}

/// Reads one record; I/O errors other than a short read are returned as errors.
pub fn read_record(reader: &mut impl Read) -> io::Result<ReadOutcome> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(reader, &mut header)? {
        0 => return Ok(ReadOutcome::End),
        n if n < HEADER_LEN => return Ok(ReadOutcome::Invalid("torn header")),
        _ => {}
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if !(2..=MAX_PAYLOAD).contains(&len) {
        return Ok(ReadOutcome::Invalid("bad length"));
    }
    let mut payload = vec![0u8; len];
    if read_full(reader, &mut payload)? < len {
        return Ok(ReadOutcome::Invalid("torn payload"));
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(ReadOutcome::Invalid("checksum mismatch"));
    }
    if payload[0] != VERSION {
        return Ok(ReadOutcome::Invalid("unknown record version"));
    }
    let source_len = payload[1] as usize;
    if 2 + source_len > len {
        return Ok(ReadOutcome::Invalid("bad source length"));
    }
    let Ok(source) = std::str::from_utf8(&payload[2..2 + source_len]) else {
        return Ok(ReadOutcome::Invalid("bad source name"));
    };
    let source = source.to_string();
    payload.drain(..2 + source_len);
    Ok(ReadOutcome::Record {
        source,
        json: payload,
        len: (HEADER_LEN + len) as u64,
    })
}

/// Like `read_exact`, but reports how much was read instead of failing on a short read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(messages: &[&str]) -> RecordBatch {
        let mut b = RecordBatch::with_capacity(64);
        for m in messages {
            b.push_with("web", |buf| {
                buf.extend_from_slice(m.as_bytes());
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        b
    }

    #[test]
    fn round_trips_records() {
        let b = batch_of(&[r#"{"a":1}"#, r#"{"b":2}"#]);
        assert_eq!(b.len(), 2);
        let mut r = b.bytes();
        let ReadOutcome::Record { source, json, len } = read_record(&mut r).unwrap() else {
            panic!()
        };
        assert_eq!(
            (source.as_str(), json.as_slice()),
            ("web", br#"{"a":1}"#.as_slice())
        );
        assert_eq!(len as usize, HEADER_LEN + 2 + 3 + 7);
        assert!(matches!(
            read_record(&mut r).unwrap(),
            ReadOutcome::Record { .. }
        ));
        assert!(matches!(read_record(&mut r).unwrap(), ReadOutcome::End));
    }

    #[test]
    fn detects_torn_and_corrupt_records() {
        let b = batch_of(&[r#"{"a":1}"#]);
        let bytes = b.bytes();
        for cut in 1..bytes.len() {
            let mut r = &bytes[..cut];
            assert!(
                matches!(read_record(&mut r).unwrap(), ReadOutcome::Invalid(_)),
                "cut {cut}"
            );
        }
        let mut flipped = bytes.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_record(&mut flipped.as_slice()).unwrap(),
            ReadOutcome::Invalid(_)
        ));
    }

    #[test]
    fn failed_write_leaves_batch_unchanged() {
        let mut b = batch_of(&[r#"{"a":1}"#]);
        let before = b.bytes().to_vec();
        let r = b.push_with("web", |buf| {
            buf.extend_from_slice(b"partial");
            Err(())
        });
        assert!(r.is_err());
        assert_eq!(b.bytes(), before.as_slice());
        assert_eq!(b.len(), 1);
    }
}
