//! The first way rows were loaded, kept as the oracle `assemble` is tested against: owned
//! rows (`schema::message_rows`) laid out per table as cells, each cell encoded by
//! tokio-postgres's own `ToSql`. The same batch must make the same COPY rows both ways.

use std::collections::{BTreeMap, HashMap};

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::assemble::HEADER;
use super::catalog::{Needs, Tables};
use super::load::Mismatch;
use super::schema::{convert, ColumnType, Name, Row, Value};

/// A field count of -1 ends the data.
const TRAILER: i16 = -1;
/// The length written for a NULL field.
const NULL: i32 = -1;

/// A value as loaded: the row's own, one converted to the column's type, or NULL.
#[derive(Debug, Clone)]
pub enum Cell<'a> {
    Null,
    Row(&'a Value),
    Made(Value),
}

impl Cell<'_> {
    fn value(&self) -> Option<&Value> {
        match self {
            Cell::Null => None,
            Cell::Row(v) => Some(v),
            Cell::Made(v) => Some(v),
        }
    }
}

/// One table's part of a batch.
#[derive(Debug)]
pub struct LaidOut<'a> {
    pub upsert: bool,
    /// Name and type, as the table has them.
    pub columns: Vec<(Name, ColumnType)>,
    /// One cell per column.
    pub rows: Vec<Vec<Cell<'a>>>,
}

/// Every table and column the rows need, typed by the first value seen.
pub fn needs<'a>(rows: impl Iterator<Item = &'a Row>) -> Needs {
    let mut needs = Needs::new();
    for row in rows {
        // The table's name is copied once a batch, not once a row.
        if !needs.contains_key(&row.table) {
            needs.insert(row.table.clone(), Vec::new());
        }
        let columns = needs.get_mut(&row.table).expect("inserted above");
        for (k, (name, value)) in row.columns.iter().enumerate() {
            // Rows of one table mostly have the same columns in the same order: the
            // column at the same place is looked at first.
            let known = columns.get(k).is_some_and(|(have, _)| have == name)
                || columns.iter().any(|(have, _)| have == name);
            if !known {
                columns.push((name.clone(), ColumnType::of(value)));
            }
        }
    }
    needs
}

/// The rows laid out per table in the types the tables have (`tables` holds every
/// table and column of `needs` by now). `uuid_ts` is `loaded_at`; the `users` rows of one
/// id are merged into one, the latest `received_at`'s values over earlier ones.
pub fn lay_out<'a>(
    rows: impl Iterator<Item = &'a Row>,
    tables: &Tables,
    loaded_at: DateTime<Utc>,
    mismatches: &mut Vec<Mismatch>,
) -> BTreeMap<String, LaidOut<'a>> {
    let mut by_table: BTreeMap<&'a str, Vec<&'a Row>> = BTreeMap::new();
    for row in rows {
        by_table.entry(&row.table).or_default().push(row);
    }
    let mut out = BTreeMap::new();
    for (table, mut rows) in by_table {
        let Some(have) = tables.get(table) else {
            continue;
        };
        let upsert = rows.iter().any(|r| r.upsert);
        if upsert {
            // Stable: rows at the same instant keep the batch's order, the later winning.
            rows.sort_by_key(|r| received_at(r));
        }
        let mut columns: Vec<(Name, ColumnType)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for row in &rows {
            for (k, (name, _)) in row.columns.iter().enumerate() {
                // Rows of one table mostly have the same columns in the same order: a
                // name at its place is known without hashing it.
                if columns.get(k).is_some_and(|(known, _)| known == name)
                    || index.contains_key(name.as_str())
                {
                    continue;
                }
                if let Some(ty) = have.get(name.as_str()) {
                    index.insert(name, columns.len());
                    columns.push((name.clone(), *ty));
                }
            }
        }
        let mut laid: Vec<Vec<Cell<'a>>> = Vec::with_capacity(rows.len());
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        for row in rows {
            let mut cells = vec![Cell::Null; columns.len()];
            for (k, (name, value)) in row.columns.iter().enumerate() {
                let same_place = columns.get(k).is_some_and(|(have, _)| have == name);
                let Some(i) = same_place
                    .then_some(k)
                    .or_else(|| index.get(name.as_str()).copied())
                else {
                    mismatches.push(Mismatch {
                        table: table.to_owned(),
                        column: name.to_string(),
                        column_type: None,
                        value_type: ColumnType::of(value),
                    });
                    continue;
                };
                let ty = columns[i].1;
                cells[i] = if name == "uuid_ts" {
                    Cell::Made(Value::Timestamp(loaded_at))
                } else {
                    fit(value, ty).unwrap_or_else(|| {
                        mismatches.push(Mismatch {
                            table: table.to_owned(),
                            column: name.to_string(),
                            column_type: Some(ty),
                            value_type: ColumnType::of(value),
                        });
                        Cell::Null
                    })
                };
            }
            let id = match row.columns.iter().find(|(name, _)| name == "id") {
                Some((_, Value::Text(id))) if upsert => Some(id.as_str()),
                _ => None,
            };
            match id.and_then(|id| by_id.get(id)) {
                Some(&earlier) => {
                    for (i, cell) in cells.into_iter().enumerate() {
                        if !matches!(cell, Cell::Null) {
                            laid[earlier][i] = cell;
                        }
                    }
                }
                None => {
                    if let Some(id) = id {
                        by_id.insert(id, laid.len());
                    }
                    laid.push(cells);
                }
            }
        }
        out.insert(
            table.to_owned(),
            LaidOut {
                upsert,
                columns,
                rows: laid,
            },
        );
    }
    out
}

/// `value` in a column of type `ty`: as it is, converted, or `None` when it cannot be.
fn fit(value: &Value, ty: ColumnType) -> Option<Cell<'_>> {
    if ColumnType::of(value) == ty {
        return Some(Cell::Row(value));
    }
    // What `convert` makes must really be of the column's type, or COPY's binary format
    // would be refused for the whole batch.
    convert(value.clone(), ty)
        .filter(|v| ColumnType::of(v) == ty)
        .map(Cell::Made)
}

fn received_at(row: &Row) -> Option<DateTime<Utc>> {
    row.columns.iter().find_map(|(name, value)| match value {
        Value::Timestamp(t) if name == "received_at" => Some(*t),
        _ => None,
    })
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.value() {
            None => Ok(IsNull::Yes),
            Some(Value::Text(s)) | Some(Value::Json(s)) => s.to_sql(ty, out),
            Some(Value::BigInt(n)) => n.to_sql(ty, out),
            Some(Value::Double(x)) => x.to_sql(ty, out),
            Some(Value::Bool(b)) => b.to_sql(ty, out),
            Some(Value::Timestamp(t)) => t.to_sql(ty, out),
        }
    }

    // Each cell was made to fit its column's type before (`fit`).
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}
/// The binary COPY data of `load`'s rows, in its columns' order. A value its type cannot
/// encode (none that `lay_out` lets through, in practice) is sent as NULL and added to
/// `mismatches`, like any value that does not fit its column.
pub fn encode(table: &str, load: &LaidOut<'_>, mismatches: &mut Vec<Mismatch>) -> Bytes {
    let types: Vec<Type> = load.columns.iter().map(|(_, ty)| pg_type(*ty)).collect();
    let width = i16::try_from(types.len()).expect("Postgres tables have at most 1600 columns");
    let mut out = BytesMut::with_capacity(HEADER.len() + 2 + load.rows.len() * 256);
    out.put_slice(HEADER);
    for row in &load.rows {
        out.put_i16(width);
        for ((cell, ty), (column, column_type)) in row.iter().zip(&types).zip(&load.columns) {
            let start = out.len();
            out.put_i32(NULL);
            let length = match cell.to_sql(ty, &mut out) {
                Ok(IsNull::No) => i32::try_from(out.len() - start - 4).ok(),
                Ok(IsNull::Yes) => continue,
                Err(_) => None,
            };
            match length {
                Some(length) => out[start..start + 4].copy_from_slice(&length.to_be_bytes()),
                None => {
                    out.truncate(start + 4);
                    mismatches.push(Mismatch {
                        table: table.to_owned(),
                        column: column.to_string(),
                        column_type: Some(*column_type),
                        value_type: *column_type,
                    });
                }
            }
        }
    }
    out.put_i16(TRAILER);
    out.freeze()
}

/// The Postgres type of a column of this type.
pub fn pg_type(ty: ColumnType) -> Type {
    match ty {
        ColumnType::Text => Type::TEXT,
        ColumnType::BigInt => Type::INT8,
        ColumnType::Double => Type::FLOAT8,
        ColumnType::Bool => Type::BOOL,
        ColumnType::Timestamp => Type::TIMESTAMPTZ,
    }
}
