//! What `check` makes of a message for the warehouse: every column value already in
//! Postgres's binary COPY form, in one buffer, and the rows as ranges of one column list.
//! `send` then assembles each table's COPY data by copying these bytes (`assemble`), so a
//! message costs two allocations here instead of one per row and text value.

use std::ops::Range;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

use super::schema::{self, node, ColumnType, Name, Scalar, Seen, Sink, Span, Value};

/// Where Postgres counts a `timestamptz` from.
const POSTGRES_EPOCH: NaiveDateTime = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(day) => day.and_time(NaiveTime::MIN),
    None => panic!("2000-01-01 is a date"),
};

/// One message's rows, encoded.
#[derive(Debug, Default)]
pub struct Encoded {
    /// Each value as a binary COPY field: its length (i32, big-endian), then its bytes.
    data: Vec<u8>,
    fields: Vec<Field>,
    rows: [Option<Span>; 2],
}

/// One column of a row: its name, what its value is, and where its field is in `data`.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Name,
    pub kind: Kind,
    at: u32,
    end: u32,
}

/// What a field holds. A timestamp keeps its full value: a text column gets it written
/// to the nanosecond-exact millisecond (`types::convert`), which COPY's µs do not hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Text,
    /// An array as JSON text.
    Json,
    BigInt,
    Double,
    Bool,
    Timestamp(DateTime<Utc>),
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
            Kind::Timestamp(_) | Kind::LoadTime => ColumnType::Timestamp,
        }
    }
}

impl Encoded {
    /// The rows of a stored message, or why it makes none.
    pub fn of(message: &[u8]) -> Result<Encoded, String> {
        let json = node::parse(message).map_err(|e| format!("not JSON: {e}"))?;
        // About as many bytes as the JSON (no keys, but a length per value); room for a
        // typical event row's columns.
        let mut writer = Writer::with_capacity(message.len(), 64);
        let (first, second) = schema::map(&json, &mut writer).map_err(|e| e.to_string())?;
        writer.finish([Some(first), second])
    }

    /// The rows `rows` are, each on its own (not sharing columns): for tests, which make
    /// rows by hand.
    #[cfg(test)]
    pub fn of_rows(rows: &[schema::Row]) -> Encoded {
        let mut writer = Writer::with_capacity(256, 16);
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

    /// Each row: its table, whether it is upserted, and its columns.
    pub fn rows(&self) -> impl Iterator<Item = (&Span, &[Field])> {
        self.rows
            .iter()
            .flatten()
            .map(|span| (span, &self.fields[span.columns.clone()]))
    }

    /// Where `field`'s COPY field (length and bytes) is in `data()`.
    pub fn bounds(&self, field: &Field) -> (usize, usize) {
        (field.at as usize, field.end as usize)
    }

    /// `field`'s COPY field (length and bytes).
    pub fn field(&self, field: &Field) -> &[u8] {
        &self.data[field.at as usize..field.end as usize]
    }

    /// The whole of `data`: consecutive fields are consecutive bytes of it.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// `field`'s value, as the message had it (a `LoadTime` has none).
    pub fn value(&self, field: &Field) -> Option<Value> {
        let bytes = &self.data[field.at as usize + 4..field.end as usize];
        let eight = || <[u8; 8]>::try_from(bytes).ok();
        Some(match field.kind {
            Kind::Text => Value::Text(String::from_utf8_lossy(bytes).into_owned()),
            Kind::Json => Value::Json(String::from_utf8_lossy(bytes).into_owned()),
            Kind::BigInt => Value::BigInt(i64::from_be_bytes(eight()?)),
            Kind::Double => Value::Double(f64::from_be_bytes(eight()?)),
            Kind::Bool => Value::Bool(bytes.first()? != &0),
            Kind::Timestamp(t) => Value::Timestamp(t),
            Kind::LoadTime => return None,
        })
    }
}

/// The `Sink` that writes each value as its COPY field.
struct Writer {
    data: Vec<u8>,
    fields: Vec<Field>,
    seen: Seen,
    row_start: usize,
}

impl Writer {
    fn with_capacity(bytes: usize, fields: usize) -> Writer {
        Writer {
            data: Vec::with_capacity(bytes),
            fields: Vec::with_capacity(fields),
            seen: Seen::default(),
            row_start: 0,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.seen.may_have(name)
            && self.fields[self.row_start..]
                .iter()
                .any(|f| f.name == *name)
    }

    fn push(&mut self, name: Name, kind: Kind, at: usize) {
        self.seen.insert(&name);
        self.fields.push(Field {
            name,
            kind,
            at: offset(at),
            end: offset(self.data.len()),
        });
    }

    fn finish(self, rows: [Option<Span>; 2]) -> Result<Encoded, String> {
        // Offsets are u32 and a field's length an i32: no stored message comes near.
        if self.data.len() > i32::MAX as usize {
            return Err("its values are over 2 GiB".into());
        }
        Ok(Encoded {
            data: self.data,
            fields: self.fields,
            rows,
        })
    }
}

fn offset(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

impl Sink for Writer {
    fn put(&mut self, name: Name, value: Scalar<'_>) {
        if self.has(&name) {
            return;
        }
        let at = self.data.len();
        let kind = encode(&value, &mut self.data);
        self.push(name, kind, at);
    }

    fn put_load_time(&mut self, name: Name) {
        if !self.has(&name) {
            self.push(name, Kind::LoadTime, self.data.len());
        }
    }

    fn mark(&self) -> usize {
        self.fields.len()
    }

    fn new_row(&mut self) {
        self.row_start = self.fields.len();
        self.seen = Seen::default();
    }

    fn put_again(&mut self, range: Range<usize>) {
        for i in range {
            let field = &self.fields[i];
            if !self.has(&field.name) {
                // The same bytes: a field is where it is, whichever row has it.
                let field = field.clone();
                self.seen.insert(&field.name);
                self.fields.push(field);
            }
        }
    }
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
        Scalar::Timestamp(t) => put(out, &micros(*t).to_be_bytes(), Kind::Timestamp(*t)),
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
    // Always fits: chrono's ±262 000 years are ±8.3e18 µs, i64 holds ±9.2e18.
    t.naive_utc()
        .signed_duration_since(POSTGRES_EPOCH)
        .num_microseconds()
        .unwrap_or(i64::MAX)
}
