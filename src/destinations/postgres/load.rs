//! One batch into one schema's tables: the rows' values made to fit the columns' types,
//! then per table a binary `COPY` (`copy::encode`) into a temporary staging table and one
//! `INSERT … SELECT … ON CONFLICT (id)` into the real one, all in the caller's
//! transaction.

use std::collections::{BTreeMap, HashMap};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Transaction;

use super::catalog::{quote, Needs, Tables};
use super::schema::{convert, ColumnType, Name, Row, Value};

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

/// A value that could not be made to fit its column's type: stored as NULL, counted
/// and logged by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub table: String,
    pub column: String,
    /// `None`: the table has no such column (see `catalog::DDL_ROUNDS`).
    pub column_type: Option<ColumnType>,
    pub value_type: ColumnType,
}

/// One table's part of a batch.
#[derive(Debug)]
pub struct TableLoad<'a> {
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
) -> BTreeMap<String, TableLoad<'a>> {
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
            TableLoad {
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

/// Copies `load` (its rows as `copy::encode` wrote them: `data`) into `schema.table`
/// within `tx`; `n` names its staging table.
pub async fn copy_table(
    tx: &Transaction<'_>,
    schema: &str,
    table: &str,
    load: &TableLoad<'_>,
    data: Bytes,
    n: usize,
) -> Result<(), tokio_postgres::Error> {
    let stage = format!("fanout_stage_{n}");
    let names: Vec<String> = load.columns.iter().map(|(c, _)| quote(c)).collect();
    let names = names.join(", ");
    let defs: Vec<String> = load
        .columns
        .iter()
        .map(|(c, ty)| format!("{} {}", quote(c), ty.sql()))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {stage} ({}) ON COMMIT DROP",
        defs.join(", ")
    ))
    .await?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {stage} ({names}) FROM STDIN BINARY"))
        .await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await?;
    tx.batch_execute(&insert(schema, table, load, &stage, &names))
        .await
}

/// The statement moving the staging rows into the table: rows already there (by `id`)
/// are left alone, except in an upserted table (`users`), where the values present
/// replace the stored ones unless the stored row was received later.
pub fn insert(schema: &str, table: &str, load: &TableLoad<'_>, stage: &str, names: &str) -> String {
    let target = format!("{}.{}", quote(schema), quote(table));
    let head = format!("INSERT INTO {target} AS t ({names}) SELECT {names} FROM {stage}");
    let updated: Vec<String> = load
        .columns
        .iter()
        .filter(|(c, _)| c != "id")
        .map(|(c, _)| {
            let c = quote(c);
            format!("{c} = COALESCE(EXCLUDED.{c}, t.{c})")
        })
        .collect();
    if !load.upsert || updated.is_empty() {
        return format!("{head} ON CONFLICT (id) DO NOTHING");
    }
    // Rows locked in id order: two batches loading at once that upsert the same users
    // wait for each other instead of deadlocking.
    let mut sql = format!(
        "{head} ORDER BY id ON CONFLICT (id) DO UPDATE SET {}",
        updated.join(", ")
    );
    if load.columns.iter().any(|(c, _)| c == "received_at") {
        sql.push_str(
            " WHERE t.received_at IS NULL OR EXCLUDED.received_at IS NULL \
             OR EXCLUDED.received_at >= t.received_at",
        );
    }
    sql
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
