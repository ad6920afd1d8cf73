//! `kind = "postgres"`: a warehouse in Segment's schema (one schema per source; `tracks`,
//! `identifies`, `users`, `pages`, …, a table per track event), loaded a batch per
//! transaction so that a batch is in the warehouse whole or not at all.
//!
//! `check` maps each message to its rows (`schema`), their values already encoded for
//! COPY (`encoded`); `send` makes the tables and columns they need (`catalog`), assembles
//! each table's COPY data (`assemble`), then copies it into a staging table and inserts
//! the rows with `ON CONFLICT (id)` (`load`): `id` is the messageId, so a retried or
//! replayed batch adds no row twice.

pub mod assemble;
pub mod buffers;
pub mod catalog;
mod connect;
pub mod encoded;
pub mod erase;
mod errors;
pub mod load;
#[cfg(test)]
mod oracle;
pub mod schema;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::json;

use super::{
    secret_from_env, AnyDestination, BatchShape, Check, Destination, DestinationConfig, Erasing,
    KeyError, Kind, Outgoing, Prepared, Preview, SendError, Sending, Subject,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;
use crate::throttle::LogThrottle;
use encoded::Encoded;
use load::{Mismatch, TableLoad};
use schema::{Row, Value, MAX_IDENTIFIER};

/// The value of `schema` that names each source's own schema.
pub const PER_SOURCE: &str = "{source}";

/// `kind = "postgres"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Environment variable with the connection URL,
    /// `postgres://user:password@host:5432/database` (`?sslmode=require` for TLS).
    pub url_env: String,
    /// The schema the tables are in: `"{source}"` (default) for one per source, named
    /// after it (lower case, `-` and `.` as `_`), or a fixed name.
    #[serde(default = "per_source")]
    pub schema: String,
}

fn per_source() -> String {
    PER_SOURCE.to_owned()
}

impl Kind for PostgresConfig {
    const NAME: &'static str = "postgres";
    // Not HTTP, but it takes the same knobs: concurrency (connections), ordering,
    // timeout (per statement), retry.
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        if self.url_env.is_empty() {
            return Err(KeyError::new("url_env", "names no environment variable"));
        }
        // A fixed name is written as a table name would be, so it needs no quoting.
        if self.schema != PER_SOURCE
            && schema::identifier(&self.schema).as_deref() != Some(self.schema.as_str())
        {
            return Err(KeyError::new(
                "schema",
                format!(
                    "must be \"{PER_SOURCE}\" or a snake_case name of at most \
                     {MAX_IDENTIFIER} bytes (e.g. \"{}\")",
                    schema::identifier(&self.schema).unwrap_or_else(|| "events".into())
                ),
            ));
        }
        Ok(())
    }

    fn batch_shape(&self) -> BatchShape {
        // Unordered: rows are keyed by messageId and `users` keeps the latest
        // `received_at`, whatever order the batches commit in.
        BatchShape::new(10_000, 64 * 1024 * 1024, 5_000)
            .with_concurrency(2)
            .unordered()
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(PostgresDestination::new(config, self, clock)?))
    }

    /// The schema, and the tables and typed columns the message becomes.
    fn preview(&self, message: &[u8], clock: Clock) -> anyhow::Result<Preview> {
        self.preview_from(PER_SOURCE, message, clock)
    }

    /// The rows and the schema they land in: the source's own under `"{source}"`.
    fn preview_from(&self, source: &str, message: &[u8], clock: Clock) -> anyhow::Result<Preview> {
        let message = schema::node::parse(message)?;
        let schema = if self.schema == PER_SOURCE && source != PER_SOURCE {
            source_schema(source)
        } else {
            self.schema.clone()
        };
        Ok(match schema::message_rows(&message, clock.now()) {
            Ok(rows) => Preview::Send(json!({
                "schema": schema,
                "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
            })),
            Err(e) => Preview::Refuse(e.to_string()),
        })
    }
}

/// The schema of a source's tables: its name snake-cased as table names are (`iOS-App`
/// → `i_os_app`); a name with no letter or digit (`-`) as it is.
pub fn source_schema(source: &str) -> String {
    schema::identifier(source).unwrap_or_else(|| source.to_owned())
}

fn row_json(row: &Row) -> serde_json::Value {
    let columns: Vec<serde_json::Value> = row
        .columns
        .iter()
        .map(|(name, value)| {
            json!({
                "name": name.as_str(),
                "type": schema::ColumnType::of(value).sql(),
                "value": value_json(value),
            })
        })
        .collect();
    json!({"table": row.table, "upsert": row.upsert, "columns": columns})
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Text(s) | Value::Json(s) => json!(s),
        Value::BigInt(n) => json!(n),
        Value::Double(x) => json!(x),
        Value::Bool(b) => json!(b),
        Value::Timestamp(t) => json!(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

pub struct PostgresDestination {
    name: String,
    pool: deadpool_postgres::Pool,
    /// `None`: one schema per source.
    schema: Option<String>,
    catalog: catalog::Catalog,
    clock: Clock,
    /// Schema warnings are counted each; logged at most once a minute.
    warn_throttle: LogThrottle,
    /// COPY data buffers kept from batch to batch.
    buffers: buffers::Buffers,
}

impl PostgresDestination {
    pub fn new(
        config: &DestinationConfig,
        own: &PostgresConfig,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let url = secret_from_env(&config.name, "url_env", &own.url_env)?;
        let pool = connect::pool(&url, config.concurrency(), config.timeout()).map_err(|e| {
            anyhow::anyhow!(
                "destination `{}`: url_env `{}`: {e}",
                config.name,
                own.url_env
            )
        })?;
        Ok(PostgresDestination {
            name: config.name.clone(),
            pool,
            schema: (own.schema != PER_SOURCE).then(|| own.schema.clone()),
            catalog: catalog::Catalog::default(),
            clock,
            warn_throttle: LogThrottle::new(Duration::from_secs(60)),
            buffers: buffers::Buffers::default(),
        })
    }

    fn schema_of<'s>(&'s self, source: &str) -> Cow<'s, str> {
        match &self.schema {
            Some(fixed) => Cow::Borrowed(fixed),
            None => Cow::Owned(source_schema(source)),
        }
    }

    async fn load(&self, batch: &[Outgoing<'_>]) -> Result<(), SendError> {
        let loaded_at = self.clock.now();
        // Messages `check` did not see are mapped here (their refusals were `check`'s).
        let mapped: Vec<Encoded> = batch
            .iter()
            .filter(|m| m.prepared.is_none())
            .map(|m| Encoded::of(m.json).unwrap_or_default())
            .collect();
        let mut mapped = mapped.iter();
        let mut by_schema: BTreeMap<Cow<'_, str>, Vec<&Encoded>> = BTreeMap::new();
        // A batch is mostly of one source: its schema name is made once a run, not once
        // a message.
        let mut last: Option<(&str, Cow<'_, str>)> = None;
        for message in batch {
            let Some(encoded) = (match message.prepared {
                Some(Prepared::Postgres(encoded)) => Some(encoded),
                _ => mapped.next(),
            }) else {
                continue;
            };
            let schema = match &last {
                Some((source, schema)) if *source == message.source => schema,
                _ => {
                    &last
                        .insert((message.source, self.schema_of(message.source)))
                        .1
                }
            };
            match by_schema.get_mut(schema.as_ref()) {
                Some(list) => list.push(encoded),
                None => {
                    by_schema.insert(schema.clone(), vec![encoded]);
                }
            }
        }
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| errors::classify_pool(&e))?;
        let result = self.load_on(&mut client, &by_schema, loaded_at).await;
        result.map_err(|e| {
            if errors::is_stale_cache(&e) {
                // Dropped by hand since it was cached: the retry reads the tables again
                // and makes it anew.
                self.catalog.forget();
                return errors::retryable(format!(
                    "Postgres error {}",
                    e.code().map_or("", |c| c.code())
                ));
            }
            errors::classify(&e)
        })
    }

    async fn load_on(
        &self,
        client: &mut tokio_postgres::Client,
        by_schema: &BTreeMap<Cow<'_, str>, Vec<&Encoded>>,
        loaded_at: DateTime<Utc>,
    ) -> Result<(), tokio_postgres::Error> {
        let mut layouts = Vec::with_capacity(by_schema.len());
        let mut mismatches = Vec::new();
        for (schema, messages) in by_schema {
            let needs = assemble::needs(messages.iter().copied());
            let tables = self.catalog.ensure(client, schema, &needs).await?;
            let laid = assemble::tables(
                messages,
                &needs,
                &tables,
                loaded_at,
                &self.buffers,
                &mut mismatches,
            );
            layouts.push((schema, laid));
            // Assembling a batch's rows is long work: the runtime's one thread then drives
            // the other loads' connections, so Postgres is not kept waiting for them.
            tokio::task::yield_now().await;
        }
        self.warn(&mismatches);
        let result = Self::copy_all(client, &layouts).await;
        // Kept for the next batch; one the connection still holds a piece of (a copy that
        // failed midway) is let go instead.
        for (_, tables) in layouts {
            for (_, laid) in tables {
                self.buffers.keep(laid.data);
            }
        }
        result
    }

    /// One transaction: every table's rows, or none. Every table's own rows are staged
    /// first, then all are moved into their tables in one round trip (a table may take
    /// rows from another's staging table: `TableLoad::also`).
    async fn copy_all(
        client: &mut tokio_postgres::Client,
        layouts: &[(&Cow<'_, str>, BTreeMap<String, TableLoad>)],
    ) -> Result<(), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        // Per schema, each table's staging table.
        let mut stages: Vec<HashMap<&str, String>> = Vec::new();
        let mut n = 0;
        for (_, tables) in layouts {
            let mut staged = HashMap::new();
            for (table, laid) in tables.iter().filter(|(_, laid)| laid.rows > 0) {
                let stage = format!("fanout_stage_{n}");
                n += 1;
                load::stage(&tx, laid, &stage).await?;
                staged.insert(table.as_str(), stage);
            }
            stages.push(staged);
        }
        let mut moves = Vec::new();
        for ((schema, tables), staged) in layouts.iter().zip(&stages) {
            let stage_of = |table: &str| staged.get(table).map(String::as_str);
            for (table, laid) in tables {
                moves.extend(load::moves(schema, table, laid, stage_of(table), stage_of));
            }
        }
        tx.batch_execute(&moves.join(";\n")).await?;
        tx.commit().await
    }

    /// Counts each value stored as NULL for want of a conversion, and logs the first.
    fn warn(&self, mismatches: &[Mismatch]) {
        let Some(first) = mismatches.first() else {
            return;
        };
        for m in mismatches {
            crate::metrics::schema_warnings(&self.name, &m.table, &m.column, 1);
        }
        if self.warn_throttle.ready() {
            tracing::warn!(
                destination = %self.name,
                table = %first.table,
                column = %first.column,
                column_type = first.column_type.map_or("none (no such column)", |t| t.sql()),
                value_type = first.value_type.sql(),
                values = mismatches.len(),
                "values stored as NULL: they do not convert to their column's type"
            );
        }
    }
}

impl Destination for PostgresDestination {
    fn check(&self, message: &[u8]) -> Check {
        match Encoded::of(message) {
            Ok(encoded) => Check::Send(Some(Prepared::Postgres(encoded))),
            Err(detail) => Check::Refuse {
                code: "unmappable".into(),
                detail,
            },
        }
    }

    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move { self.load(batch).await.map(|()| 0) })
    }

    fn erase<'a>(&'a self, subject: &'a Subject) -> Erasing<'a> {
        Box::pin(self.erase_subject(subject))
    }
}
