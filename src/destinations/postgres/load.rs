//! One batch into one schema's tables: per table its binary `COPY` data (`assemble`)
//! into a temporary staging table (`stage`), then the `INSERT … SELECT … ON CONFLICT
//! (id)` statements moving the staged rows into the real tables (`moves`): a table's own,
//! and those another table's staging rows give it. All in the caller's transaction.

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Transaction;

use super::catalog::quote;
use super::schema::{ColumnType, Name};

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
pub struct TableLoad {
    pub upsert: bool,
    /// Name and type, as the table has them.
    pub columns: Vec<(Name, ColumnType)>,
    /// The rows as binary COPY data, in `columns`' order (`assemble`).
    pub data: Bytes,
    /// Rows in `data`.
    pub rows: usize,
    /// More rows, from other tables' staging rows: each such table, and the columns of
    /// this table its rows give (`assemble::prefix`).
    pub also: Also,
}

/// Rows a table takes from other tables' staging rows: each such table, and the columns
/// of the first table its rows give.
pub type Also = Vec<(String, Vec<Name>)>;

/// Bytes of COPY data handed to the connection at a time.
const COPY_CHUNK: usize = 128 << 10;

/// Makes the staging table `stage` for `load`'s columns in `tx` and copies its rows
/// into it.
pub async fn stage(
    tx: &Transaction<'_>,
    load: &TableLoad,
    stage: &str,
) -> Result<(), tokio_postgres::Error> {
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
        .copy_in::<_, Bytes>(&format!(
            "COPY {stage} ({}) FROM STDIN BINARY",
            names(load.columns.iter().map(|(c, _)| c))
        ))
        .await?;
    futures_util::pin_mut!(sink);
    // In pieces: the connection copies each into its write buffer, which so stays small
    // instead of growing to the table's megabytes every batch.
    let mut at = 0;
    while at < load.data.len() {
        let end = load.data.len().min(at + COPY_CHUNK);
        sink.feed(load.data.slice(at..end)).await?;
        at = end;
    }
    sink.finish().await.map(|_| ())
}

/// The statements moving a batch's rows into `schema.table`: from its staging table
/// (`stage`, when it has rows of its own) and from those of `load.also`'s tables
/// (`stage_of`; one with no staging table has no rows to give).
pub fn moves<'s>(
    schema: &str,
    table: &str,
    load: &TableLoad,
    stage: Option<&str>,
    stage_of: impl Fn(&str) -> Option<&'s str>,
) -> Vec<String> {
    let own = stage.map(|stage| {
        let names = names(load.columns.iter().map(|(c, _)| c));
        insert(schema, table, load, stage, &names)
    });
    let also = load.also.iter().filter_map(|(whole, columns)| {
        let names = names(columns.iter());
        Some(format!(
            "INSERT INTO {}.{} ({names}) SELECT {names} FROM {} ON CONFLICT (id) DO NOTHING",
            quote(schema),
            quote(table),
            stage_of(whole)?
        ))
    });
    own.into_iter().chain(also).collect()
}

/// Columns' names quoted, as a list.
fn names<'n>(columns: impl Iterator<Item = &'n Name>) -> String {
    let names: Vec<String> = columns.map(|c| quote(c)).collect();
    names.join(", ")
}

/// The statement moving the staging rows into the table: rows already there (by `id`)
/// are left alone, except in an upserted table (`users`), where the values present
/// replace the stored ones unless the stored row was received later.
fn insert(schema: &str, table: &str, load: &TableLoad, stage: &str, names: &str) -> String {
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
