//! Privacy deletions in the warehouse (`Destination::erase`): in one transaction, the
//! subject's rows of every table that has a `user_id` or `anonymous_id` column (event
//! tables included), and its `users` row by `id`. The tables are read from
//! `information_schema` when the deletion runs, not from what this process loaded: rows
//! loaded before a restart, or by another instance, are found too. A fixed `schema` is
//! searched alone; with one schema per source, every schema holding a table of Segment's
//! layout (a `uuid_ts` column), so a source since removed from the config is searched too.

use std::collections::BTreeMap;

use tokio_postgres::types::ToSql;

use super::catalog::quote;
use super::errors;
use super::PostgresDestination;
use crate::destinations::{EraseError, Erasure, Subject};

/// The columns of the fixed schema `$1` a subject is found by.
const COLUMNS_OF_SCHEMA: &str = "\
    SELECT c.table_schema::text, c.table_name::text, c.column_name::text, c.data_type::text \
    FROM information_schema.columns c JOIN information_schema.tables t \
      ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
    WHERE t.table_type = 'BASE TABLE' AND c.table_schema = $1 \
      AND c.column_name IN ('user_id', 'anonymous_id', 'id')";

/// The same, in every schema with a table of Segment's layout.
const COLUMNS_OF_SEGMENT_SCHEMAS: &str = "\
    SELECT c.table_schema::text, c.table_name::text, c.column_name::text, c.data_type::text \
    FROM information_schema.columns c JOIN information_schema.tables t \
      ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
    WHERE t.table_type = 'BASE TABLE' \
      AND c.table_schema IN (SELECT table_schema FROM information_schema.columns \
                             WHERE column_name = 'uuid_ts') \
      AND c.table_schema NOT IN ('pg_catalog', 'information_schema') \
      AND c.column_name IN ('user_id', 'anonymous_id', 'id')";

/// One column of the catalog: (schema, table, column, data_type).
pub type CatalogColumn = (String, String, String, String);

/// One `DELETE`: the table it empties of the subject (`schema.table`), the statement, and
/// its parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct Deletion {
    pub table: String,
    pub sql: String,
    pub params: Vec<String>,
}

/// The statements that delete `subject`'s rows from the tables of `columns`: by
/// `user_id` and `anonymous_id` wherever the column exists, and `users` by `id` = userId.
/// A column whose type is not text is compared as text (fanout makes them text; one
/// changed by hand still matches).
pub fn deletions(columns: &[CatalogColumn], subject: &Subject) -> Vec<Deletion> {
    let mut tables: BTreeMap<(&str, &str), Vec<(&str, &str)>> = BTreeMap::new();
    for (schema, table, column, data_type) in columns {
        tables
            .entry((schema, table))
            .or_default()
            .push((column, data_type));
    }
    let mut out = Vec::new();
    for ((schema, table), columns) in tables {
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        let mut by = |column: &str, value: &Option<String>| {
            let Some(value) = value else { return };
            let Some((_, data_type)) = columns.iter().find(|(c, _)| *c == column) else {
                return;
            };
            params.push(value.clone());
            let cast = if matches!(*data_type, "text" | "character varying") {
                ""
            } else {
                "::text"
            };
            conditions.push(format!("{}{cast} = ${}", quote(column), params.len()));
        };
        by("user_id", &subject.user_id);
        by("anonymous_id", &subject.anonymous_id);
        if table == "users" {
            by("id", &subject.user_id);
        }
        if conditions.is_empty() {
            continue;
        }
        out.push(Deletion {
            table: format!("{schema}.{table}"),
            sql: format!(
                "DELETE FROM {}.{} WHERE {}",
                quote(schema),
                quote(table),
                conditions.join(" OR ")
            ),
            params,
        });
    }
    out
}

/// What was deleted, for the record: the rows per table that had any.
fn describe(deleted: &[(String, u64)], tables: usize) -> String {
    let total: u64 = deleted.iter().map(|(_, n)| n).sum();
    let per_table: Vec<String> = deleted
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(table, n)| format!("{table} {n}"))
        .collect();
    if per_table.is_empty() {
        format!("deleted 0 rows ({tables} tables searched)")
    } else {
        format!(
            "deleted {total} rows ({tables} tables searched): {}",
            per_table.join(", ")
        )
    }
}

impl PostgresDestination {
    pub(super) async fn erase_subject(&self, subject: &Subject) -> Result<Erasure, EraseError> {
        if subject.user_id.is_none() && subject.anonymous_id.is_none() {
            return Err(EraseError::failed(
                "the warehouse's rows are found by userId or anonymousId; this subject has \
                 neither",
            ));
        }
        let failed =
            |e: tokio_postgres::Error| EraseError::from_send("Postgres", errors::classify(&e));
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| EraseError::from_send("Postgres", errors::classify_pool(&e)))?;
        let tx = client.transaction().await.map_err(failed)?;
        let rows = match &self.schema {
            Some(fixed) => tx.query(COLUMNS_OF_SCHEMA, &[fixed]).await,
            None => tx.query(COLUMNS_OF_SEGMENT_SCHEMAS, &[]).await,
        }
        .map_err(failed)?;
        let columns: Vec<CatalogColumn> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let deletions = deletions(&columns, subject);
        let mut deleted = Vec::with_capacity(deletions.len());
        for deletion in &deletions {
            let params: Vec<&(dyn ToSql + Sync)> = deletion
                .params
                .iter()
                .map(|p| p as &(dyn ToSql + Sync))
                .collect();
            let n = tx.execute(&deletion.sql, &params).await.map_err(failed)?;
            deleted.push((deletion.table.clone(), n));
        }
        tx.commit().await.map_err(failed)?;
        Ok(Erasure::Done {
            detail: describe(&deleted, deletions.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(schema: &str, table: &str, column: &str, data_type: &str) -> CatalogColumn {
        (schema.into(), table.into(), column.into(), data_type.into())
    }

    fn subject(user: Option<&str>, anonymous: Option<&str>) -> Subject {
        Subject {
            user_id: user.map(str::to_string),
            anonymous_id: anonymous.map(str::to_string),
            ..Subject::default()
        }
    }

    #[test]
    fn every_table_with_the_columns_and_users_by_id() {
        let catalog = [
            column("web", "tracks", "id", "text"),
            column("web", "tracks", "user_id", "text"),
            column("web", "tracks", "anonymous_id", "text"),
            column("web", "signed_up", "id", "text"),
            column("web", "signed_up", "user_id", "text"),
            column("web", "users", "id", "text"),
            column("web", "notes", "id", "text"),
            column("web", "odd", "user_id", "bigint"),
        ];
        let deletions = deletions(&catalog, &subject(Some("u1"), Some("a1")));
        let got: Vec<(&str, &str, Vec<&str>)> = deletions
            .iter()
            .map(|d| {
                let params = d.params.iter().map(String::as_str).collect();
                (d.table.as_str(), d.sql.as_str(), params)
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "web.odd",
                    r#"DELETE FROM "web"."odd" WHERE "user_id"::text = $1"#,
                    vec!["u1"]
                ),
                (
                    "web.signed_up",
                    r#"DELETE FROM "web"."signed_up" WHERE "user_id" = $1"#,
                    vec!["u1"]
                ),
                (
                    "web.tracks",
                    r#"DELETE FROM "web"."tracks" WHERE "user_id" = $1 OR "anonymous_id" = $2"#,
                    vec!["u1", "a1"]
                ),
                (
                    "web.users",
                    r#"DELETE FROM "web"."users" WHERE "id" = $1"#,
                    vec!["u1"]
                ),
            ]
        );
    }

    #[test]
    fn an_anonymous_subject_leaves_users_and_user_id_alone() {
        let catalog = [
            column("app", "pages", "anonymous_id", "text"),
            column("app", "pages", "user_id", "text"),
            column("app", "users", "id", "text"),
        ];
        let deletions = deletions(&catalog, &subject(None, Some("a\"1")));
        assert_eq!(
            deletions,
            [Deletion {
                table: "app.pages".into(),
                sql: r#"DELETE FROM "app"."pages" WHERE "anonymous_id" = $1"#.into(),
                params: vec!["a\"1".into()],
            }]
        );
    }

    #[test]
    fn the_record_names_the_rows_per_table() {
        let deleted = [("web.tracks".to_string(), 3), ("web.users".to_string(), 0)];
        assert_eq!(
            describe(&deleted, 2),
            "deleted 3 rows (2 tables searched): web.tracks 3"
        );
        assert_eq!(describe(&[], 0), "deleted 0 rows (0 tables searched)");
    }
}
