//! A batch's encoded messages (`Encoded`) → the columns each table needs, then each
//! table's binary `COPY` data (Postgres's "COPY" reference, "Binary Format"): per row the
//! field count and each column's field, copied from the bytes `check` wrote; NULL for a
//! column the row lacks. Only a value of another type than its column is decoded,
//! converted (`types::convert`) and encoded again. Both steps look at a message's shape
//! (its columns and rows) once a batch, not once a message.

mod prefix;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};

use super::buffers::Buffers;
use super::catalog::{Columns, Needs, Tables};
use super::encoded::{encode, micros, Column, Encoded, Kind, Shape};
use super::load::{Mismatch, TableLoad};
use super::schema::{convert, ColumnType, Name, Span, Value};

/// The signature, the flags (no OIDs) and the length of the header extension (none).
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// A field count of -1 ends the data.
const TRAILER: i16 = -1;
/// The length written for a NULL field.
const NULL: i32 = -1;

/// One table's columns while they are being found: in the order first seen, and by name.
#[derive(Default)]
struct Found {
    columns: Vec<(Name, ColumnType)>,
    index: HashMap<Name, usize>,
}

impl Found {
    /// The column `name`, looked for at `guess` first: rows of one table mostly have the
    /// same columns in the same order, so the place after the last one found is right
    /// and costs no hashing (names from one memo compare by address).
    fn find(&self, name: &Name, guess: usize) -> Option<usize> {
        match self.columns.get(guess) {
            Some((known, _)) if known == name => Some(guess),
            _ => self.index.get(name.as_str()).copied(),
        }
    }
}

/// Every table and column the messages' rows need, typed by the first value seen.
pub fn needs<'a>(messages: impl IntoIterator<Item = &'a Encoded>) -> Needs {
    let mut found: BTreeMap<&'a str, Found> = BTreeMap::new();
    // A shape seen before adds no column.
    let mut seen: HashSet<*const Shape> = HashSet::new();
    let mut last = std::ptr::null();
    for message in messages {
        let shape = message.shape();
        let at = Arc::as_ptr(shape);
        let repeated = at == last || !seen.insert(at);
        last = at;
        if repeated {
            continue;
        }
        for span in shape.rows.iter().flatten() {
            let table = found.entry(span.table.as_str()).or_default();
            let mut guess = 0;
            for column in &shape.columns[span.columns.clone()] {
                guess = match table.find(&column.name, guess) {
                    Some(i) => i + 1,
                    None => {
                        let i = table.columns.len();
                        table.index.insert(column.name.clone(), i);
                        table
                            .columns
                            .push((column.name.clone(), column.kind.column_type()));
                        i + 1
                    }
                };
            }
        }
    }
    found
        .into_iter()
        .map(|(table, found)| (table.to_owned(), found.columns))
        .collect()
}

/// One row of one message.
type RowOf<'m> = (&'m Encoded, &'m Span);

/// Each table's COPY data for the messages' rows, in the types the tables have (`tables`
/// holds every table and column of `needs` by now): columns in `needs`' order, rows in
/// the messages' order. `uuid_ts` is `loaded_at`; the rows of one id in an upserted table
/// (`users`) are merged into one, the latest `received_at`'s values over earlier ones.
/// A table whose rows are the start of another table's rows, as they are there (a
/// track's `tracks` row of its event row), takes them from that table's staging rows
/// instead of having them copied twice (`TableLoad::also`). The data is written into
/// `buffers`' kept buffers.
pub fn tables(
    messages: &[&Encoded],
    needs: &Needs,
    tables: &Tables,
    loaded_at: DateTime<Utc>,
    buffers: &Buffers,
    mismatches: &mut Vec<Mismatch>,
) -> BTreeMap<String, TableLoad> {
    let mut by_table: BTreeMap<&str, Vec<RowOf<'_>>> = BTreeMap::new();
    for message in messages {
        for span in message.rows() {
            by_table
                .entry(span.table.as_str())
                .or_default()
                .push((message, span));
        }
    }
    let mut copies: BTreeMap<&str, (Copy<'_>, Vec<RowOf<'_>>)> = BTreeMap::new();
    for (table, rows) in by_table {
        let (Some(have), Some(needed)) = (tables.get(table), needs.get(table)) else {
            continue;
        };
        let copy = Copy::new(table, buffers, have, needed, loaded_at);
        copies.insert(table, (copy, rows));
    }
    let starts = prefix::starts(&copies);
    let mut out = BTreeMap::new();
    for (table, (mut copy, mut rows)) in copies {
        let also = prefix::take_out(table, &starts, &mut rows);
        let upsert = rows.iter().any(|(_, span)| span.upsert);
        if upsert {
            // Stable: rows at the same instant keep the batch's order, the later winning.
            rows.sort_by_key(|(message, span)| received_at(message, span));
        }
        let (data, count) = if upsert {
            copy.merged(&rows, mismatches)
        } else {
            (copy.rows(&rows, mismatches), rows.len())
        };
        out.insert(
            table.to_owned(),
            TableLoad {
                upsert,
                columns: copy.layout.columns,
                data: data.freeze(),
                rows: count,
                also,
            },
        );
    }
    out
}

/// The `uuid_ts` field of every row: the load time as a COPY field.
fn loaded_field(loaded_at: DateTime<Utc>) -> [u8; 12] {
    let mut field = [0; 12];
    field[..4].copy_from_slice(&8i32.to_be_bytes());
    field[4..].copy_from_slice(&micros(loaded_at).to_be_bytes());
    field
}

fn received_at(message: &Encoded, span: &Span) -> Option<DateTime<Utc>> {
    let columns = &message.shape().columns;
    let i = span
        .columns
        .clone()
        .find(|&i| columns[i].kind == Kind::Timestamp && columns[i].name == "received_at")?;
    match message.value(i)? {
        Value::Timestamp(t) => Some(t),
        _ => None,
    }
}

/// Where one column's field of a row comes from.
#[derive(Clone, Copy)]
enum Slot<'m> {
    Null,
    /// As the message has it: `data()[start..end]`.
    Field(&'m Encoded, usize, usize),
    /// Converted to the column's type: `Copy::made[start..end]`.
    Made(usize, usize),
    LoadTime,
}

/// Where each of a table's columns comes from in the rows of one shape. A column whose
/// value needs converting is `Null` here; the `Step` that converts it fills it in.
#[derive(Clone, Copy)]
enum Source {
    Null,
    /// The shape's column as it is.
    Column(usize),
    LoadTime,
}

/// What a value of the shape's row takes that its column's type does not give for free,
/// in the row's order (so that mismatches are counted in it).
#[derive(Clone, Copy)]
enum Step {
    /// The table has no such column.
    Absent(usize),
    /// The shape's column `from`, converted to table column `to`'s type `ty`.
    Convert {
        from: usize,
        to: usize,
        ty: ColumnType,
    },
}

/// One shape's row laid out in one table: worked out once a batch.
struct Plan {
    sources: Vec<Source>,
    steps: Vec<Step>,
    /// The row as it is written when nothing in it is converted: `sources` with the
    /// columns whose fields follow each other in the message's bytes made one piece (most
    /// of a row is one), so a row costs a few copies and no look at each field.
    pieces: Vec<Piece>,
}

/// A stretch of a row as `Copy::write_pieces` writes it.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Piece {
    /// The fields of the shape's columns `first..=last`, one after the other.
    Fields {
        first: usize,
        last: usize,
    },
    Null,
    LoadTime,
}

impl Plan {
    fn converts(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Convert { .. }))
    }
}

/// `sources` in pieces: consecutive columns of the shape whose fields follow each other
/// are one piece.
fn pieces(shape: &Shape, sources: &[Source]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for source in sources {
        let piece = match *source {
            Source::Null => Piece::Null,
            Source::LoadTime => Piece::LoadTime,
            Source::Column(i) => match pieces.last_mut() {
                Some(Piece::Fields { last, .. }) if *last + 1 == i && shape.columns[i].follows => {
                    *last = i;
                    continue;
                }
                _ => Piece::Fields { first: i, last: i },
            },
        };
        pieces.push(piece);
    }
    pieces
}

/// One table's COPY data being written.
struct Copy<'t> {
    table: &'t str,
    buffers: &'t Buffers,
    layout: Found,
    /// The fields of converted values.
    made: Vec<u8>,
    loaded_at: [u8; 12],
    plans: Vec<Plan>,
    /// Each plan by the row of the shape it is for (a `Span` is in its shape, so its
    /// address names both); and the last one used, which most rows use again.
    plan_of: HashMap<*const Span, usize>,
    last: (*const Span, usize),
}

impl<'t> Copy<'t> {
    /// For `table`'s rows: the columns of `needed` that it `has`, in `needed`'s order.
    fn new(
        table: &'t str,
        buffers: &'t Buffers,
        has: &Columns,
        needed: &[(Name, ColumnType)],
        loaded_at: DateTime<Utc>,
    ) -> Self {
        let columns: Vec<(Name, ColumnType)> = needed
            .iter()
            .filter_map(|(name, _)| Some((name.clone(), *has.get(name.as_str())?)))
            .collect();
        Copy {
            table,
            buffers,
            layout: Found {
                index: columns
                    .iter()
                    .enumerate()
                    .map(|(i, (n, _))| (n.clone(), i))
                    .collect(),
                columns,
            },
            made: Vec::new(),
            loaded_at: loaded_field(loaded_at),
            plans: Vec::new(),
            plan_of: HashMap::new(),
            last: (std::ptr::null(), 0),
        }
    }

    /// The COPY data of `rows`, one row each.
    fn rows(&mut self, rows: &[RowOf<'_>], mismatches: &mut Vec<Mismatch>) -> BytesMut {
        let mut out = self.start(rows);
        let mut slots = vec![Slot::Null; self.layout.columns.len()];
        for (message, span) in rows {
            let k = self.plan_for(message.shape(), span);
            if self.plans[k].converts() {
                self.fill(message, span, &mut slots, mismatches);
                self.write(&slots, &mut out);
                continue;
            }
            let plan = &self.plans[k];
            for step in &plan.steps {
                if let Step::Absent(i) = *step {
                    mismatches.push(self.mismatch(&message.shape().columns[i], None));
                }
            }
            self.write_pieces(message, &plan.pieces, &mut out);
        }
        out.put_i16(TRAILER);
        out
    }

    /// Writes one row of `message` laid out as `pieces`.
    fn write_pieces(&self, message: &Encoded, pieces: &[Piece], out: &mut BytesMut) {
        out.put_i16(self.width());
        for piece in pieces {
            match *piece {
                Piece::Fields { first, last } => {
                    let (start, _) = message.bounds(first);
                    let (_, end) = message.bounds(last);
                    out.put_slice(&message.data()[start..end]);
                }
                Piece::Null => out.put_i32(NULL),
                Piece::LoadTime => out.put_slice(&self.loaded_at),
            }
        }
    }

    /// A row's field count.
    fn width(&self) -> i16 {
        i16::try_from(self.layout.columns.len()).expect("Postgres tables have at most 1600 columns")
    }

    /// The COPY data of `rows`, those of one `id` merged into one: a later row's values
    /// over an earlier one's, its absent ones leaving them be; and how many rows it has.
    fn merged(&mut self, rows: &[RowOf<'_>], mismatches: &mut Vec<Mismatch>) -> (BytesMut, usize) {
        let width = self.layout.columns.len();
        let mut merged: Vec<Slot<'_>> = Vec::with_capacity(rows.len() * width);
        let mut count = 0;
        let mut by_id: HashMap<&[u8], usize> = HashMap::new();
        let mut slots = vec![Slot::Null; width];
        for (message, span) in rows {
            self.fill(message, span, &mut slots, mismatches);
            let columns = &message.shape().columns;
            let id = span
                .columns
                .clone()
                .find(|&i| columns[i].name == "id" && columns[i].kind == Kind::Text);
            match id.map(|id| message.field(id)).and_then(|id| by_id.get(id)) {
                Some(&earlier) => {
                    let row = &mut merged[earlier * width..(earlier + 1) * width];
                    for (kept, slot) in row.iter_mut().zip(&slots) {
                        if !matches!(slot, Slot::Null) {
                            *kept = *slot;
                        }
                    }
                }
                None => {
                    if let Some(id) = id {
                        by_id.insert(message.field(id), count);
                    }
                    merged.extend_from_slice(&slots);
                    count += 1;
                }
            }
        }
        let mut out = self.start(rows);
        for row in 0..count {
            self.write(&merged[row * width..(row + 1) * width], &mut out);
        }
        out.put_i16(TRAILER);
        (out, count)
    }

    /// The header, in a buffer with room for `rows`.
    fn start(&self, rows: &[RowOf<'_>]) -> BytesMut {
        let width = self.layout.columns.len();
        let size: usize = rows
            .iter()
            .map(|(message, span)| {
                // Exact for a row whose fields follow each other, as most do.
                2 + message.row_bytes(span)
                    + 4 * width.saturating_sub(span.columns.len())
                    + self.loaded_at.len()
            })
            .sum();
        let mut out = self.buffers.take(HEADER.len() + size + 2);
        out.put_slice(HEADER);
        out
    }

    /// Where each column's field of a row comes from.
    fn fill<'m>(
        &mut self,
        message: &'m Encoded,
        span: &'m Span,
        slots: &mut [Slot<'m>],
        mismatches: &mut Vec<Mismatch>,
    ) {
        let shape: &Shape = message.shape();
        let k = self.plan_for(shape, span);
        let plan = &self.plans[k];
        for (slot, source) in slots.iter_mut().zip(&plan.sources) {
            *slot = match *source {
                Source::Null => Slot::Null,
                Source::Column(i) => {
                    let (start, end) = message.bounds(i);
                    Slot::Field(message, start, end)
                }
                Source::LoadTime => Slot::LoadTime,
            };
        }
        for step in &plan.steps {
            match *step {
                Step::Absent(i) => mismatches.push(self.mismatch(&shape.columns[i], None)),
                // What `convert` makes must really be of the column's type, or COPY's
                // binary format would be refused for the whole batch.
                Step::Convert { from, to, ty } => match message
                    .value(from)
                    .and_then(|value| convert(value, ty))
                    .filter(|value| ColumnType::of(value) == ty)
                {
                    Some(value) => {
                        let start = self.made.len();
                        encode(&value.as_scalar(), &mut self.made);
                        slots[to] = Slot::Made(start, self.made.len());
                    }
                    None => mismatches.push(self.mismatch(&shape.columns[from], Some(ty))),
                },
            }
        }
    }

    /// The plan of `shape`'s row `span` (a `Span` is in its shape, so its address names
    /// both), made the first time.
    fn plan_for(&mut self, shape: &Shape, span: &Span) -> usize {
        let key: *const Span = span;
        if self.last.0 != key {
            let k = match self.plan_of.get(&key) {
                Some(&k) => k,
                None => {
                    self.plans.push(self.plan(shape, span));
                    self.plan_of.insert(key, self.plans.len() - 1);
                    self.plans.len() - 1
                }
            };
            self.last = (key, k);
        }
        self.last.1
    }

    /// Where each column of the table comes from in `shape`'s row `span`.
    fn plan(&self, shape: &Shape, span: &Span) -> Plan {
        let mut plan = Plan {
            sources: vec![Source::Null; self.layout.columns.len()],
            steps: Vec::new(),
            pieces: Vec::new(),
        };
        let mut guess = 0;
        for i in span.columns.clone() {
            let column = &shape.columns[i];
            let Some(to) = self.layout.find(&column.name, guess) else {
                plan.steps.push(Step::Absent(i));
                continue;
            };
            guess = to + 1;
            let ty = self.layout.columns[to].1;
            plan.sources[to] = match column.kind {
                Kind::LoadTime => Source::LoadTime,
                kind if kind.column_type() == ty => Source::Column(i),
                _ => {
                    plan.steps.push(Step::Convert { from: i, to, ty });
                    Source::Null
                }
            };
        }
        plan.pieces = pieces(shape, &plan.sources);
        plan
    }

    fn mismatch(&self, column: &Column, column_type: Option<ColumnType>) -> Mismatch {
        Mismatch {
            table: self.table.to_owned(),
            column: column.name.to_string(),
            column_type,
            value_type: column.kind.column_type(),
        }
    }

    /// Writes one row: its field count, then each column's field. Fields that follow
    /// each other in their message's bytes (most of a row) are copied as one.
    fn write(&self, slots: &[Slot<'_>], out: &mut BytesMut) {
        out.put_i16(self.width());
        let mut run: Option<(&Encoded, usize, usize)> = None;
        for slot in slots {
            if let Slot::Field(message, start, end) = *slot {
                match &mut run {
                    Some((m, _, run_end)) if std::ptr::eq(*m, message) && *run_end == start => {
                        *run_end = end;
                    }
                    _ => {
                        if let Some((m, s, e)) = run.replace((message, start, end)) {
                            out.put_slice(&m.data()[s..e]);
                        }
                    }
                }
                continue;
            }
            if let Some((m, s, e)) = run.take() {
                out.put_slice(&m.data()[s..e]);
            }
            match slot {
                Slot::Null => out.put_i32(NULL),
                Slot::LoadTime => out.put_slice(&self.loaded_at),
                Slot::Made(start, end) => out.put_slice(&self.made[*start..*end]),
                Slot::Field(..) => {}
            }
        }
        if let Some((m, s, e)) = run {
            out.put_slice(&m.data()[s..e]);
        }
    }
}
