//! The tables and columns a destination knows its warehouse has, and the DDL that makes
//! the ones a batch needs: schema, tables (`id text primary key`), added columns.
//!
//! Each schema's tables are read from `information_schema` at first use and again after
//! any DDL, so a column another instance added (perhaps with another type) is seen with
//! the type it really has.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio_postgres::Client;

use super::errors::is_made_concurrently;
use super::schema::{ColumnType, Name};

/// Column name → type, for one table.
pub type Columns = HashMap<String, ColumnType>;
/// Table name → its columns, for one schema.
pub type Tables = HashMap<String, Columns>;

/// What a batch needs of one schema: table → columns, each with the type of the first
/// value seen, in the order first seen.
pub type Needs = BTreeMap<String, Vec<(Name, ColumnType)>>;

/// Rounds of DDL per batch: a second is needed when another loader made a table first;
/// a column still missing after them (dropped as fast as it is added) is loaded as NULL
/// and counted as a schema warning.
const DDL_ROUNDS: usize = 3;

#[derive(Default)]
pub struct Catalog {
    schemas: Mutex<HashMap<String, Arc<Tables>>>,
}

impl Catalog {
    /// Forgets everything: the next batch reads the tables again (after a table or column
    /// it knew of turned out to be gone).
    pub fn forget(&self) {
        self.lock().clear();
    }

    /// Makes sure `schema` has every table and column in `needs` (creating what is
    /// missing) and returns its tables as they are now.
    pub async fn ensure(
        &self,
        client: &Client,
        schema: &str,
        needs: &Needs,
    ) -> Result<Arc<Tables>, tokio_postgres::Error> {
        let known = self.lock().get(schema).cloned();
        let mut tables = match known {
            Some(tables) => tables,
            None => self.reload(client, schema).await?,
        };
        // A table another loader made meanwhile turns our `CREATE TABLE IF NOT EXISTS`
        // into a no-op without our columns: the next round adds them with `ALTER TABLE`.
        for _ in 0..DDL_ROUNDS {
            if missing(&tables, needs).next().is_none() {
                break;
            }
            if tables.is_empty() && !schema_exists(client, schema).await? {
                // Only when it is missing: Postgres checks the CREATE privilege on the
                // database before it looks whether the schema exists.
                ignore_race(
                    client
                        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote(schema)))
                        .await,
                )?;
            }
            for ddl in ddl(schema, &tables, needs) {
                ignore_race(client.batch_execute(&ddl).await)?;
            }
            tables = self.reload(client, schema).await?;
        }
        Ok(tables)
    }

    async fn reload(
        &self,
        client: &Client,
        schema: &str,
    ) -> Result<Arc<Tables>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT table_name::text, column_name::text, data_type::text \
                 FROM information_schema.columns WHERE table_schema = $1",
                &[&schema],
            )
            .await?;
        let mut tables = Tables::new();
        for row in rows {
            let (table, column, data_type): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            tables
                .entry(table)
                .or_default()
                .insert(column, column_type(&data_type));
        }
        let tables = Arc::new(tables);
        self.lock().insert(schema.to_owned(), tables.clone());
        Ok(tables)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tables>>> {
        self.schemas.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The (table, column, type) of `needs` that `tables` lacks; a missing table lacks all.
fn missing<'a>(
    tables: &'a Tables,
    needs: &'a Needs,
) -> impl Iterator<Item = (&'a str, &'a str, ColumnType)> + 'a {
    needs.iter().flat_map(move |(table, columns)| {
        let have = tables.get(table);
        columns
            .iter()
            .filter(move |(column, _)| !have.is_some_and(|have| have.contains_key(column.as_str())))
            .map(move |(column, ty)| (table.as_str(), column.as_str(), *ty))
    })
}

/// The statements that make what `needs` adds to `tables`: a `CREATE TABLE` with all its
/// columns for a new table, one `ALTER TABLE` with all new columns for a known one.
pub fn ddl(schema: &str, tables: &Tables, needs: &Needs) -> Vec<String> {
    let mut statements = Vec::new();
    for (table, columns) in needs {
        let name = format!("{}.{}", quote(schema), quote(table));
        let new: Vec<&(Name, ColumnType)> = match tables.get(table) {
            Some(have) => columns
                .iter()
                .filter(|(column, _)| !have.contains_key(column.as_str()))
                .collect(),
            None => columns.iter().collect(),
        };
        if tables.contains_key(table) {
            if new.is_empty() {
                continue;
            }
            let adds: Vec<String> = new
                .iter()
                .map(|(column, ty)| {
                    format!("ADD COLUMN IF NOT EXISTS {} {}", quote(column), ty.sql())
                })
                .collect();
            statements.push(format!("ALTER TABLE {name} {}", adds.join(", ")));
        } else {
            let mut defs = vec!["id text PRIMARY KEY".to_owned()];
            defs.extend(
                new.iter()
                    .filter(|(column, _)| *column != "id")
                    .map(|(column, ty)| format!("{} {}", quote(column), ty.sql())),
            );
            statements.push(format!(
                "CREATE TABLE IF NOT EXISTS {name} ({})",
                defs.join(", ")
            ));
        }
    }
    statements
}

async fn schema_exists(client: &Client, schema: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await?;
    Ok(row.is_some())
}

/// Another loader making the same schema, table or column at the same moment is success.
fn ignore_race(result: Result<(), tokio_postgres::Error>) -> Result<(), tokio_postgres::Error> {
    match result {
        Err(e) if !is_made_concurrently(&e) => Err(e),
        _ => Ok(()),
    }
}

/// The type fanout loads into a column of `information_schema`'s `data_type`. Columns
/// changed by hand to another type get values of the nearest of fanout's types, which
/// Postgres casts on insert.
pub fn column_type(data_type: &str) -> ColumnType {
    match data_type {
        "bigint" | "integer" | "smallint" => ColumnType::BigInt,
        "double precision" | "real" | "numeric" => ColumnType::Double,
        "boolean" => ColumnType::Bool,
        "timestamp with time zone" | "timestamp without time zone" | "date" => {
            ColumnType::Timestamp
        }
        _ => ColumnType::Text,
    }
}

/// `"name"`, with any `"` doubled: every identifier is quoted, so none is read as a
/// keyword or folded to lower case.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}
