//! How one accepted message is framed in the log.
//!
//! `[u32 LE payload length][u32 LE crc32 of payload][payload]`, payload =
//! `[u8 version][u8 source name length][source name][tag: 3×u32 key, u32 accepted-at][message JSON]`.
//! The CRC lets recovery find the end of the last complete write after a crash. The tag
//! carries the message's dedupe key, so the dedupe window can be rebuilt from the log
//! without parsing JSON.

use std::io::{self, BufReader, Read, Seek};

use crate::message::{MessageType, Stamp, Tag};

/// Bytes before the payload: length and CRC.
pub const HEADER_LEN: usize = 8;
const VERSION: u8 = 2;
const TAG_LEN: usize = 16;
/// Largest payload a reader accepts; anything larger is a corrupt length field.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// The tag as framed in a record.
fn tag_bytes(tag: Tag) -> [u8; TAG_LEN] {
    let mut b = [0u8; TAG_LEN];
    for (i, word) in tag.key.iter().chain([&tag.accepted_at]).enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    b
}

fn tag_from_bytes(b: &[u8]) -> Tag {
    let word = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    Tag {
        key: [word(0), word(1), word(2)],
        accepted_at: word(3),
    }
}

/// Messages of one request, framed and ready to append in one write.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Vec<u8>,
    records: Vec<Framed>,
}

/// Where one record of a batch ends, and what is known of it besides its bytes.
#[derive(Debug, Clone, Copy)]
struct Framed {
    end: usize,
    stamp: Stamp,
    /// Not stored in the log: the request's metrics count messages by type.
    kind: MessageType,
}

impl RecordBatch {
    pub fn with_capacity(bytes: usize) -> RecordBatch {
        RecordBatch {
            buf: Vec::with_capacity(bytes),
            records: Vec::new(),
        }
    }

    /// Frames one message of type `kind`. `write_json` appends the message's JSON to the
    /// buffer it is given and returns the message's stamp (or just its tag).
    pub fn push_with<E, S: Into<Stamp>>(
        &mut self,
        source: &str,
        kind: MessageType,
        write_json: impl FnOnce(&mut Vec<u8>) -> Result<S, E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; HEADER_LEN]);
        self.buf.push(VERSION);
        // Source names are validated to at most 64 bytes.
        self.buf.push(source.len() as u8);
        self.buf.extend_from_slice(source.as_bytes());
        let tag_at = self.buf.len();
        self.buf.extend_from_slice(&[0; TAG_LEN]);
        let stamp: Stamp = match write_json(&mut self.buf) {
            Ok(stamp) => stamp.into(),
            Err(e) => {
                self.buf.truncate(start);
                return Err(e);
            }
        };
        self.buf[tag_at..tag_at + TAG_LEN].copy_from_slice(&tag_bytes(stamp.tag));
        let payload = &self.buf[start + HEADER_LEN..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.records.push(Framed {
            end: self.buf.len(),
            stamp,
            kind,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Each record's tag, in order.
    pub fn tags(&self) -> impl Iterator<Item = Tag> + '_ {
        self.records.iter().map(|r| r.stamp.tag)
    }

    /// Each record's message type, in order.
    pub fn kinds(&self) -> impl Iterator<Item = MessageType> + '_ {
        self.records.iter().map(|r| r.kind)
    }

    /// Each record's framed bytes (a whole record as the log stores it) and stamp, in
    /// order.
    pub fn framed(&self) -> impl Iterator<Item = (std::ops::Range<usize>, Stamp)> + '_ {
        let starts = std::iter::once(0).chain(self.records.iter().map(|r| r.end));
        starts
            .zip(&self.records)
            .map(|(start, r)| (start..r.end, r.stamp))
    }

    /// Each record's message type and JSON, in order.
    pub fn messages(&self) -> impl Iterator<Item = (MessageType, &[u8])> + '_ {
        self.framed().zip(&self.records).map(|((range, _), r)| {
            // Header, version byte, source length byte, source, tag, then the JSON.
            let source_len = usize::from(self.buf[range.start + HEADER_LEN + 1]);
            let json_at = range.start + HEADER_LEN + 2 + source_len + TAG_LEN;
            (r.kind, &self.buf[json_at..range.end])
        })
    }

    /// Keeps only the records for which `keep(index)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        // Nothing moves until the first dropped record (usually there is none).
        let Some(first_dropped) = (0..self.records.len()).find(|&i| !keep(i)) else {
            return;
        };
        let mut write = if first_dropped == 0 {
            0
        } else {
            self.records[first_dropped - 1].end
        };
        let mut start = self.records[first_dropped].end;
        let mut kept: Vec<Framed> = self.records[..first_dropped].to_vec();
        for index in first_dropped + 1..self.records.len() {
            let record = self.records[index];
            if keep(index) {
                self.buf.copy_within(start..record.end, write);
                write += record.end - start;
                kept.push(Framed {
                    end: write,
                    ..record
                });
            }
            start = record.end;
        }
        self.buf.truncate(write);
        self.records = kept;
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Why a record could not be read.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole, valid record of this many bytes (header included).
    Record {
        source: String,
        tag: Tag,
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
    let mut payload = Vec::new();
    let json_at = match read_checked(reader, &mut payload)? {
        Checked::Valid { json_at } => json_at,
        Checked::End => return Ok(ReadOutcome::End),
        Checked::Invalid(why) => return Ok(ReadOutcome::Invalid(why)),
    };
    let (source, tag) = source_and_tag(&payload, json_at);
    let (source, len) = (source.to_string(), (HEADER_LEN + payload.len()) as u64);
    payload.drain(..json_at);
    Ok(ReadOutcome::Record {
        source,
        tag,
        json: payload,
        len,
    })
}

/// One record's source and tag, read and checked as `read_record` reads it.
pub enum TagOutcome<'s> {
    Record {
        source: &'s str,
        tag: Tag,
        len: u64,
    },
    /// End of data, or a torn or corrupt record.
    End,
}

/// What `read_tag` does with a record's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Read, and the record checked against its checksum, as `read_record` does.
    Checked,
    /// Passed over unread, the checksum not looked at: for a segment every cursor has
    /// read whole, checking each record, before it is deleted. Reading a deleted
    /// segment's messages again for their dedupe keys was 5 % of a warehouse drain.
    Skipped,
}

/// Reads one record's source and tag, into `scratch` (reused from record to record: a
/// scan of a segment's keys allocates nothing per record), its message as `body` says.
pub fn read_tag<'s, R: Read + Seek>(
    reader: &mut BufReader<R>,
    scratch: &'s mut Vec<u8>,
    body: Body,
) -> io::Result<TagOutcome<'s>> {
    let (json_at, len) = match body {
        Body::Checked => match read_checked(reader, scratch)? {
            Checked::Valid { json_at } => (json_at, scratch.len()),
            _ => return Ok(TagOutcome::End),
        },
        Body::Skipped => match read_head(reader, scratch)? {
            Some(at) => at,
            None => return Ok(TagOutcome::End),
        },
    };
    let (source, tag) = source_and_tag(scratch, json_at);
    Ok(TagOutcome::Record {
        source,
        tag,
        len: (HEADER_LEN + len) as u64,
    })
}

/// Reads a record's header and its payload up to the message into `payload`, and passes
/// over the message: where the message starts and the payload's length; `None` at the
/// end of the data or a bad header.
fn read_head<R: Read + Seek>(
    reader: &mut BufReader<R>,
    payload: &mut Vec<u8>,
) -> io::Result<Option<(usize, usize)>> {
    let mut header = [0u8; HEADER_LEN];
    if read_full(reader, &mut header)? < HEADER_LEN {
        return Ok(None);
    }
    let Some((len, _)) = header_fields(&header) else {
        return Ok(None);
    };
    payload.clear();
    payload.resize(2, 0);
    if read_full(reader, payload)? < 2 {
        return Ok(None);
    }
    let Ok(json_at) = json_start(payload, len) else {
        return Ok(None);
    };
    payload.resize(json_at, 0);
    if read_full(reader, &mut payload[2..])? < json_at - 2 || !source_is_text(payload, json_at) {
        return Ok(None);
    }
    reader.seek_relative((len - json_at) as i64)?;
    Ok(Some((json_at, len)))
}

enum Checked {
    /// The payload is whole and checked; its JSON starts at `json_at`.
    Valid {
        json_at: usize,
    },
    End,
    Invalid(&'static str),
}

/// Reads one record's payload into `payload` (emptied first) and checks its length,
/// checksum, version and source name.
fn read_checked(reader: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Checked> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(reader, &mut header)? {
        0 => return Ok(Checked::End),
        n if n < HEADER_LEN => return Ok(Checked::Invalid("torn header")),
        _ => {}
    }
    let Some((len, crc)) = header_fields(&header) else {
        return Ok(Checked::Invalid("bad length"));
    };
    // Into spare capacity: no zeroing of what the read overwrites.
    payload.clear();
    payload.reserve(len);
    reader.take(len as u64).read_to_end(payload)?;
    if payload.len() < len {
        return Ok(Checked::Invalid("torn payload"));
    }
    if crc32fast::hash(payload) != crc {
        return Ok(Checked::Invalid("checksum mismatch"));
    }
    let json_at = match json_start(payload, len) {
        Ok(at) => at,
        Err(why) => return Ok(Checked::Invalid(why)),
    };
    if !source_is_text(payload, json_at) {
        return Ok(Checked::Invalid("bad source name"));
    }
    Ok(Checked::Valid { json_at })
}

/// A record header's payload length and checksum; `None` for a length no record has.
fn header_fields(header: &[u8; HEADER_LEN]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    (2..=MAX_PAYLOAD).contains(&len).then_some((len, crc))
}

/// Where the message starts in a payload of `len` bytes, from its first two (version,
/// source name length); or what is wrong with them.
fn json_start(payload: &[u8], len: usize) -> Result<usize, &'static str> {
    if payload[0] != VERSION {
        return Err("unknown record version");
    }
    let json_at = 2 + payload[1] as usize + TAG_LEN;
    if json_at > len {
        return Err("bad source length");
    }
    Ok(json_at)
}

/// Whether the source name, in a payload read up to `json_at` at least, is UTF-8.
fn source_is_text(payload: &[u8], json_at: usize) -> bool {
    std::str::from_utf8(&payload[2..json_at - TAG_LEN]).is_ok()
}

/// The source and tag of a payload `read_checked` found valid.
fn source_and_tag(payload: &[u8], json_at: usize) -> (&str, Tag) {
    let source_len = payload[1] as usize;
    let source = std::str::from_utf8(&payload[2..2 + source_len]).expect("checked");
    (source, tag_from_bytes(&payload[2 + source_len..json_at]))
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
            b.push_with("web", MessageType::Track, |buf| {
                buf.extend_from_slice(m.as_bytes());
                Ok::<_, ()>(Tag {
                    key: [1, 2, m.len() as u32],
                    accepted_at: 7,
                })
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
        let ReadOutcome::Record {
            source,
            tag,
            json,
            len,
        } = read_record(&mut r).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (source.as_str(), json.as_slice()),
            ("web", br#"{"a":1}"#.as_slice())
        );
        assert_eq!(
            tag,
            Tag {
                key: [1, 2, 7],
                accepted_at: 7
            }
        );
        assert_eq!(len as usize, HEADER_LEN + 2 + 3 + TAG_LEN + 7);
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
    fn retain_drops_records_and_keeps_framing() {
        let mut b = batch_of(&[r#"{"a":1}"#, r#"{"bb":22}"#, r#"{"c":3}"#]);
        let whole = b.bytes().to_vec();
        b.retain(|_| true);
        assert_eq!(b.bytes(), whole.as_slice());
        b.retain(|i| i != 1);
        assert_eq!(b.len(), 2);
        let mut r = b.bytes();
        let mut seen = Vec::new();
        while let ReadOutcome::Record { json, .. } = read_record(&mut r).unwrap() {
            seen.push(String::from_utf8(json).unwrap());
        }
        assert_eq!(seen, [r#"{"a":1}"#, r#"{"c":3}"#]);
        assert_eq!(b.tags().map(|t| t.key[2]).collect::<Vec<_>>(), [7, 7]);
        b.retain(|i| i == 1);
        let mut r = b.bytes();
        let ReadOutcome::Record { json, .. } = read_record(&mut r).unwrap() else {
            panic!()
        };
        assert_eq!(json, br#"{"c":3}"#);
        assert!(matches!(read_record(&mut r).unwrap(), ReadOutcome::End));
    }

    #[test]
    fn failed_write_leaves_batch_unchanged() {
        let mut b = batch_of(&[r#"{"a":1}"#]);
        let before = b.bytes().to_vec();
        let r = b.push_with("web", MessageType::Track, |buf| {
            buf.extend_from_slice(b"partial");
            Err::<Tag, ()>(())
        });
        assert!(r.is_err());
        assert_eq!(b.bytes(), before.as_slice());
        assert_eq!(b.len(), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
            let mut b = RecordBatch::with_capacity(64);
            for (n, m) in messages.iter().enumerate() {
                b.push_with("src", MessageType::Track, |buf| {
                    buf.extend_from_slice(m);
                    Ok::<_, ()>(Tag {
                        key: [n as u32, 1, 2],
                        accepted_at: 3,
                    })
                })
                .unwrap();
            }
            b.into_bytes()
        }

        /// Reads records until the data ends or stops being valid.
        fn read_all(mut bytes: &[u8]) -> (Vec<Vec<u8>>, bool) {
            let mut found = Vec::new();
            loop {
                match read_record(&mut bytes).unwrap() {
                    ReadOutcome::Record { json, .. } => found.push(json),
                    ReadOutcome::End => return (found, true),
                    ReadOutcome::Invalid(_) => return (found, false),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn any_bytes_are_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = read_all(&bytes);
            }

            /// Cut anywhere, the log reads back as a prefix of what was written, and only a
            /// cut between records reads as a clean end.
            #[test]
            fn a_cut_log_reads_as_a_prefix(
                messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let bytes = framed(&messages);
                let at = cut.index(bytes.len() + 1);
                let (found, clean) = read_all(&bytes[..at]);
                prop_assert!(messages.starts_with(&found));
                let boundary = framed(&messages[..found.len()]).len() == at;
                prop_assert_eq!(clean, boundary);
            }

            /// Passing over the messages gives every record's source, tag and length as
            /// reading and checking them does (messages longer than the read buffer
            /// included); bytes that are no records are read without panic.
            #[test]
            fn passing_over_messages_reads_the_same_tags(
                messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
                noise in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let tags = |bytes: &[u8], body| {
                    let mut reader = BufReader::with_capacity(64, io::Cursor::new(bytes.to_vec()));
                    let mut scratch = Vec::new();
                    let mut found = Vec::new();
                    while let TagOutcome::Record { source, tag, len } =
                        read_tag(&mut reader, &mut scratch, body).unwrap()
                    {
                        found.push((source.to_owned(), tag, len));
                    }
                    found
                };
                let mut bytes = framed(&messages);
                let checked = tags(&bytes, Body::Checked);
                prop_assert_eq!(checked.len(), messages.len());
                prop_assert_eq!(tags(&bytes, Body::Skipped), checked);
                bytes.extend(&noise);
                let _ = tags(&bytes, Body::Skipped);
                let _ = tags(&noise, Body::Skipped);
            }

            /// A byte changed anywhere is never read as a record it was not.
            #[test]
            fn a_changed_byte_is_caught(
                messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let mut bytes = framed(&messages);
                let at = at.index(bytes.len());
                bytes[at] ^= flip;
                let (found, _) = read_all(&bytes);
                prop_assert!(messages.starts_with(&found), "{:?}", found);
                prop_assert!(found.len() < messages.len());
            }
        }
    }
}
