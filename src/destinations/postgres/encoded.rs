//! What `check` makes of a message for the warehouse: every column value already in
//! Postgres's binary COPY form, in one buffer, and where each field starts. The columns'
//! names and kinds and the rows they form — the message's `Shape` — are shared by every
//! message that has the same ones (most of a batch: one event from one library), so
//! `send` works out each table's columns and each row's place in them once a shape
//! (`assemble`), and a message costs its bytes and one offset per column.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Utc};

use super::schema::{self, node, ColumnType, Name, Scalar, Seen, Sink, Span, Value};

/// Where Postgres counts a `timestamptz` from.
const POSTGRES_EPOCH: NaiveDateTime = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(day) => day.and_time(NaiveTime::MIN),
    None => panic!("2000-01-01 is a date"),
};

/// Shapes kept per thread; when full the cache starts over (a source whose messages
/// never repeat a shape then costs one allocation each, as before shapes were shared).
const SHAPES_KEPT: usize = 1024;

/// One message's rows, encoded.
#[derive(Debug, Default)]
pub struct Encoded {
    shape: Arc<Shape>,
    /// Each value as a binary COPY field: its length (i32, big-endian), then its bytes.
    data: Vec<u8>,
    /// Where each of the shape's columns' field starts in `data` (a `LoadTime` has no
    /// bytes: it starts and ends there).
    at: Vec<u32>,
    /// Timestamps that their field's microseconds do not give back (sub-microsecond,
    /// leap seconds), by where the field starts: a text column gets them to the
    /// nanosecond-exact millisecond (`types::convert`). Empty, so no allocation, for
    /// nearly every message.
    exact: Vec<(u32, DateTime<Utc>)>,
    /// Each row's bytes from its first field's start to its last one's end: worked out
    /// while the bytes are at hand, so that sizing a table's COPY data later need not
    /// read them again (they are long out of the cache by then).
    row_bytes: [u32; 2],
}

/// The columns a message writes, in order, and the rows they form.
#[derive(Debug, Default, PartialEq)]
pub struct Shape {
    pub columns: Vec<Column>,
    pub rows: [Option<Span>; 2],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: Name,
    pub kind: Kind,
    /// Its field starts where the column before it ends in the message's bytes (both
    /// written for this column, not shared with an earlier row): a row's fields that
    /// follow each other are copied as one.
    pub follows: bool,
}

/// What a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Text,
    /// An array as JSON text.
    Json,
    BigInt,
    Double,
    Bool,
    Timestamp,
    /// The time the batch is loaded (`uuid_ts`): no bytes until then.
    LoadTime,
}

impl Kind {
    pub fn column_type(self) -> ColumnType {
        match self {
            Kind::Text | Kind::Json => ColumnType::Text,
            Kind::BigInt => ColumnType::BigInt,
            Kind::Double => ColumnType::Double,
            Kind::Bool => ColumnType::Bool,
            Kind::Timestamp | Kind::LoadTime => ColumnType::Timestamp,
        }
    }
}

impl Encoded {
    /// The rows of a stored message, or why it makes none.
    pub fn of(message: &[u8]) -> Result<Encoded, String> {
        let json = node::parse(message).map_err(|e| format!("not JSON: {e}"))?;
        // About as many bytes as the JSON (no keys, but a length per value); room for a
        // typical event row's columns.
        let mut writer = Writer::new(message.len(), 64);
        let (first, second) = schema::map(&json, &mut writer).map_err(|e| e.to_string())?;
        writer.finish([Some(first), second])
    }

    /// The rows `rows` are, each on its own (not sharing columns): for tests, which make
    /// rows by hand.
    #[cfg(test)]
    pub fn of_rows(rows: &[schema::Row]) -> Encoded {
        let mut writer = Writer::new(256, 16);
        let mut spans = [None, None];
        for (row, span) in rows.iter().zip(&mut spans) {
            writer.new_row();
            let start = writer.mark();
            for (name, value) in row.columns.iter() {
                match value {
                    // As `lay_out` did: the column named so holds the load time.
                    _ if name == "uuid_ts" => writer.put_load_time(name.clone()),
                    value => writer.put(name.clone(), value.as_scalar()),
                }
            }
            *span = Some(Span {
                table: Name::from(row.table.clone()),
                columns: start..writer.mark(),
                upsert: row.upsert,
            });
        }
        assert!(rows.len() <= 2, "a message makes at most two rows");
        writer.finish(spans).expect("small rows")
    }

    /// The message's columns and rows, the same `Arc` as every message of that shape's.
    pub fn shape(&self) -> &Arc<Shape> {
        &self.shape
    }

    /// Each row: its table, whether it is upserted, and its columns (of `shape()`).
    pub fn rows(&self) -> impl Iterator<Item = &Span> {
        self.shape.rows.iter().flatten()
    }

    /// Where column `i`'s COPY field (length and bytes) is in `data()`.
    pub fn bounds(&self, i: usize) -> (usize, usize) {
        let at = self.at[i] as usize;
        if self.shape.columns[i].kind == Kind::LoadTime {
            return (at, at);
        }
        let length = <[u8; 4]>::try_from(&self.data[at..at + 4]).expect("4 bytes");
        (at, at + 4 + i32::from_be_bytes(length) as usize)
    }

    /// The bytes from the start of `span`'s first field to the end of its last one (all
    /// of its fields' bytes when they follow each other, as they mostly do); `span` is
    /// one of `rows()`.
    pub fn row_bytes(&self, span: &Span) -> usize {
        let k =
            usize::from(!matches!(&self.shape.rows[0], Some(first) if std::ptr::eq(first, span)));
        self.row_bytes[k] as usize
    }

    fn span_bytes(&self, span: &Span) -> u32 {
        match (span.columns.start, span.columns.end.checked_sub(1)) {
            (first, Some(last)) if first <= last => {
                offset(self.bounds(last).1.saturating_sub(self.bounds(first).0))
            }
            _ => 0,
        }
    }

    /// Column `i`'s COPY field (length and bytes).
    pub fn field(&self, i: usize) -> &[u8] {
        let (start, end) = self.bounds(i);
        &self.data[start..end]
    }

    /// The whole of `data`: consecutive fields are consecutive bytes of it.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Column `i`'s value, as the message had it (a `LoadTime` has none).
    pub fn value(&self, i: usize) -> Option<Value> {
        let (start, end) = self.bounds(i);
        let bytes = &self.data[start + 4..end];
        let eight = || <[u8; 8]>::try_from(bytes).ok();
        Some(match self.shape.columns[i].kind {
            Kind::Text => Value::Text(String::from_utf8_lossy(bytes).into_owned()),
            Kind::Json => Value::Json(String::from_utf8_lossy(bytes).into_owned()),
            Kind::BigInt => Value::BigInt(i64::from_be_bytes(eight()?)),
            Kind::Double => Value::Double(f64::from_be_bytes(eight()?)),
            Kind::Bool => Value::Bool(bytes.first()? != &0),
            Kind::Timestamp => {
                Value::Timestamp(match self.exact.iter().find(|e| e.0 as usize == start) {
                    Some(&(_, t)) => t,
                    None => from_micros(i64::from_be_bytes(eight()?))?,
                })
            }
            Kind::LoadTime => return None,
        })
    }
}

/// The `Sink` that writes each value as its COPY field.
struct Writer {
    data: Vec<u8>,
    at: Vec<u32>,
    exact: Vec<(u32, DateTime<Utc>)>,
    /// The thread's list, lent for this message: compared with the known shapes, and
    /// copied only for a new one.
    columns: Vec<Column>,
    seen: Seen,
    row_start: usize,
    /// The last column pushed has bytes of its own at the end of `data`.
    last_own: bool,
}

impl Writer {
    fn new(bytes: usize, columns: usize) -> Writer {
        let mut lent = SHAPES.with_borrow_mut(|shapes| std::mem::take(&mut shapes.scratch));
        lent.clear();
        lent.reserve(columns);
        Writer {
            data: Vec::with_capacity(bytes),
            at: Vec::with_capacity(columns),
            exact: Vec::new(),
            columns: lent,
            seen: Seen::default(),
            row_start: 0,
            last_own: false,
        }
    }

    /// Whether the current row has `name` already; it has from now on.
    fn taken(&mut self, name: &str) -> bool {
        self.seen.insert(name)
            && self.columns[self.row_start..]
                .iter()
                .any(|c| c.name == *name)
    }

    /// Adds a column whose field is at `at`: its own bytes at the end of `data`, or
    /// (`own` false) an earlier column's.
    fn push(&mut self, name: Name, kind: Kind, at: usize, own: bool) {
        let follows = own && self.last_own;
        self.last_own = own;
        self.columns.push(Column {
            name,
            kind,
            follows,
        });
        self.at.push(offset(at));
    }

    fn finish(mut self, rows: [Option<Span>; 2]) -> Result<Encoded, String> {
        let shape = SHAPES.with_borrow_mut(|shapes| {
            let shape = shapes.shared(&self.columns, rows);
            shapes.scratch = std::mem::take(&mut self.columns);
            shape
        });
        // Offsets are u32 and a field's length an i32: no stored message comes near.
        if self.data.len() > i32::MAX as usize {
            return Err("its values are over 2 GiB".into());
        }
        let mut encoded = Encoded {
            shape,
            data: self.data,
            at: self.at,
            exact: self.exact,
            row_bytes: [0; 2],
        };
        for (k, span) in encoded.shape.rows.iter().enumerate() {
            if let Some(span) = span {
                encoded.row_bytes[k] = encoded.span_bytes(span);
            }
        }
        Ok(encoded)
    }
}

fn offset(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

impl Sink for Writer {
    fn put(&mut self, name: Name, value: Scalar<'_>) {
        if self.taken(&name) {
            return;
        }
        let at = self.data.len();
        let kind = encode(&value, &mut self.data);
        if let Scalar::Timestamp(t) = value {
            // Finer than a microsecond, or a leap second (chrono's 60th second).
            let nanos = t.timestamp_subsec_nanos();
            if nanos % 1000 != 0 || nanos >= 1_000_000_000 {
                self.exact.push((offset(at), t));
            }
        }
        self.push(name, kind, at, true);
    }

    fn put_load_time(&mut self, name: Name) {
        if !self.taken(&name) {
            self.push(name, Kind::LoadTime, self.data.len(), true);
        }
    }

    fn mark(&self) -> usize {
        self.columns.len()
    }

    fn new_row(&mut self) {
        self.row_start = self.columns.len();
        self.seen = Seen::default();
    }

    fn put_again(&mut self, range: Range<usize>) {
        for i in range {
            // The same bytes: a field is where it is, whichever row has it.
            let column = self.columns[i].clone();
            if !self.taken(&column.name) {
                let at = self.at[i] as usize;
                self.push(column.name, column.kind, at, false);
            }
        }
    }
}

thread_local! {
    // Per thread: no lock a message. Two threads' shapes are equal, not the same `Arc`,
    // which costs `assemble` one more look at a shape, nothing else.
    static SHAPES: RefCell<Shapes> = RefCell::new(Shapes::default());
}

/// Known shapes by a hash of their names' addresses and kinds (names from the memo are
/// one string each), and the column list `Writer` lends.
#[derive(Default)]
struct Shapes {
    by_hash: HashMap<u64, Arc<Shape>>,
    scratch: Vec<Column>,
}

impl Shapes {
    /// The known shape equal to `columns` and `rows`, or a new one, remembered. Two
    /// shapes of one hash take turns.
    fn shared(&mut self, columns: &[Column], rows: [Option<Span>; 2]) -> Arc<Shape> {
        let hash = shape_hash(columns, &rows);
        if let Some(known) = self.by_hash.get(&hash) {
            if known.columns == columns && known.rows == rows {
                return known.clone();
            }
        }
        if self.by_hash.len() >= SHAPES_KEPT {
            self.by_hash.clear();
        }
        let shape = Arc::new(Shape {
            columns: columns.to_vec(),
            rows,
        });
        self.by_hash.insert(hash, shape.clone());
        shape
    }
}

fn shape_hash(columns: &[Column], rows: &[Option<Span>; 2]) -> u64 {
    let mut h = 0u64;
    let mut mix = |x: u64| h = (h.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    let name = |name: &Name| name.as_ptr() as u64 ^ (name.len() as u64) << 48;
    for column in columns {
        mix(name(&column.name) ^ column.kind as u64);
    }
    for span in rows.iter().flatten() {
        mix(name(&span.table) ^ span.columns.start as u64 ^ (span.columns.end as u64) << 16);
        mix(u64::from(span.upsert));
    }
    h
}

/// Appends `value` as a binary COPY field (length, then bytes: what tokio-postgres's
/// `ToSql` writes for the column's type) and says what it is.
pub fn encode(value: &Scalar<'_>, out: &mut Vec<u8>) -> Kind {
    match value {
        Scalar::Text(s) => put(out, s.as_bytes(), Kind::Text),
        Scalar::Json(s) => put(out, s.as_bytes(), Kind::Json),
        Scalar::BigInt(n) => put(out, &n.to_be_bytes(), Kind::BigInt),
        Scalar::Double(x) => put(out, &x.to_be_bytes(), Kind::Double),
        Scalar::Bool(b) => put(out, &[u8::from(*b)], Kind::Bool),
        Scalar::Timestamp(t) => put(out, &micros(*t).to_be_bytes(), Kind::Timestamp),
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8], kind: Kind) -> Kind {
    // Longer is refused by `Writer::finish`.
    let length = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(bytes);
    kind
}

/// A `timestamptz` as Postgres's binary format has it: microseconds since 2000-01-01 UTC,
/// cut toward zero, as tokio-postgres computes it.
pub fn micros(t: DateTime<Utc>) -> i64 {
    let nanos = t.timestamp_subsec_nanos();
    if nanos >= 1_000_000_000 {
        // A leap second: chrono's own arithmetic knows what it means.
        return t
            .naive_utc()
            .signed_duration_since(POSTGRES_EPOCH)
            .num_microseconds()
            .unwrap_or(i64::MAX);
    }
    // Always fits: chrono's ±262 000 years are ±8.3e18 µs, i64 holds ±9.2e18. Whole
    // seconds and microseconds, which is the floor; toward zero before 2000 when a part
    // of a microsecond is cut, as the duration above gives it (that arithmetic was 1 % of
    // a warehouse load).
    let floor = (t.timestamp() - POSTGRES_EPOCH_UNIX) * 1_000_000 + i64::from(nanos / 1000);
    floor + i64::from(floor < 0 && !nanos.is_multiple_of(1000))
}

/// `POSTGRES_EPOCH` in Unix seconds.
const POSTGRES_EPOCH_UNIX: i64 = 946_684_800;

/// The instant `micros` made `n` of (exact for whole microseconds).
fn from_micros(n: i64) -> Option<DateTime<Utc>> {
    POSTGRES_EPOCH
        .checked_add_signed(TimeDelta::microseconds(n))
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(id: &str, properties: &str) -> Encoded {
        let text = format!(
            r#"{{"type":"track","event":"Order Completed","messageId":"{id}","userId":"u",
            "receivedAt":"2026-01-01T00:00:00.123Z","context":{{"ip":"203.0.113.7"}},
            "properties":{properties}}}"#
        );
        Encoded::of(text.as_bytes()).unwrap()
    }

    #[test]
    fn messages_with_the_same_columns_share_one_shape() {
        let a = track("m1", r#"{"total":3,"sku":"a"}"#);
        let b = track("m2", r#"{"total":40,"sku":"bcd"}"#);
        assert!(Arc::ptr_eq(a.shape(), b.shape()));
        // Each keeps its own values.
        let total = |m: &Encoded| {
            let i = m.shape().columns.iter().position(|c| c.name == "total");
            m.value(i.unwrap())
        };
        assert_eq!(total(&a), Some(Value::BigInt(3)));
        assert_eq!(total(&b), Some(Value::BigInt(40)));
        // Another column, or another type of one, is another shape.
        let c = track("m3", r#"{"total":3,"sku":"a","coupon":"x"}"#);
        let d = track("m4", r#"{"total":"3","sku":"a"}"#);
        for other in [&c, &d] {
            assert!(!Arc::ptr_eq(a.shape(), other.shape()));
            assert_ne!(**a.shape(), **other.shape());
        }
    }

    #[test]
    fn a_column_follows_the_one_before_it_exactly_when_its_bytes_do() {
        let identify = br#"{"type":"identify","messageId":"m","userId":"u",
            "receivedAt":"2026-01-01T00:00:00Z","traits":{"plan":"pro","seats":3}}"#;
        for m in [
            track("m", r#"{"a":1,"b":"x"}"#),
            Encoded::of(identify).unwrap(),
        ] {
            let columns = &m.shape().columns;
            for (i, column) in columns.iter().enumerate().skip(1) {
                let touching = m.bounds(i - 1).1 == m.bounds(i).0;
                assert!(touching || !column.follows, "{column:?}");
            }
            let follow = columns.iter().filter(|c| c.follows).count();
            assert!(follow + 1 >= columns.len() / 2, "{columns:?}");
        }
        // The users row: its trait columns are the identifies row's fields again.
        let m = Encoded::of(identify).unwrap();
        let users = m.rows().nth(1).unwrap().columns.clone();
        let plan = users.clone().find(|&i| m.shape().columns[i].name == "plan");
        assert!(!m.shape().columns[plan.unwrap()].follows);
    }

    #[test]
    fn microseconds_are_those_of_the_duration_since_2000() {
        let by_duration = |t: DateTime<Utc>| {
            t.naive_utc()
                .signed_duration_since(POSTGRES_EPOCH)
                .num_microseconds()
        };
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Years -9999..9999 around the epoch, and the instants next to it.
            let secs = match i % 4 {
                0 => (rng % 40_000) as i64 - 20_000 + POSTGRES_EPOCH_UNIX,
                _ => (rng % 631_152_000_000) as i64 - 315_576_000_000,
            };
            let nanos = ((rng >> 20) % 1_000_000_000) as u32;
            let nanos = if i % 3 == 0 {
                nanos / 1000 * 1000
            } else {
                nanos
            };
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            assert_eq!(Some(micros(t)), by_duration(t), "{t:?}");
        }
        let leap = crate::timestamp::parse("2016-12-31T23:59:60.5Z").unwrap();
        assert_eq!(Some(micros(leap)), by_duration(leap));
    }

    #[test]
    fn timestamps_microseconds_do_not_hold_are_kept_exact() {
        for t in [
            "2026-01-01T00:00:00.123456789Z",
            "2016-12-31T23:59:60.5Z",
            "1999-12-31T23:59:59.9999995Z",
        ] {
            let text = format!(
                r#"{{"type":"alias","messageId":"m","previousId":"p","userId":"u",
                "receivedAt":"{t}"}}"#
            );
            let m = Encoded::of(text.as_bytes()).unwrap();
            let i = m
                .shape()
                .columns
                .iter()
                .position(|c| c.name == "received_at");
            let want = crate::timestamp::parse(t).unwrap();
            assert_eq!(m.value(i.unwrap()), Some(Value::Timestamp(want)), "{t}");
        }
    }
}
