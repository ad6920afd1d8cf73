//! The dead-letter store beside the local log: SQLite (WAL, synchronous=FULL) under the
//! data dir. Low volume, queried by destination, and changed by the `fanout dead-letters`
//! command while the server runs, which SQLite's own locking makes safe across
//! processes. Replay marks rows; the server's delivery task for that destination picks
//! marked rows up, deletes them once delivered, and puts them back (unmarked, updated)
//! if they fail again.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{rfc3339, DeadLetter, Failure};

pub const FILE_NAME: &str = "dead-letters.sqlite";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> rusqlite::Result<SqliteStore> {
        if let Err(e) = std::fs::create_dir_all(data_dir) {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
        }
        let conn = Connection::open(data_dir.join(FILE_NAME))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A dead letter replaces a message the queue no longer holds: it must be durable.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS dead_letters (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                destination TEXT NOT NULL,
                source TEXT NOT NULL,
                reason TEXT NOT NULL,
                status INTEGER,
                response TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                first_attempt_at TEXT NOT NULL,
                dead_at TEXT NOT NULL,
                replay INTEGER NOT NULL DEFAULT 0,
                message TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS dead_letters_by_destination
                ON dead_letters (destination, replay, id);",
        )?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("dead-letter store lock poisoned")
    }

    /// Records messages (source, JSON) that failed together, in one transaction.
    pub fn add(
        &self,
        destination: &str,
        messages: &[(&str, &[u8])],
        failure: &Failure,
    ) -> rusqlite::Result<()> {
        let new: Vec<_> = messages.iter().map(|&(s, j)| (s, j, failure)).collect();
        self.record(destination, &new, &[], Utc::now())
    }

    /// Records one batch's outcome in one transaction: `new` dead letters (source, JSON,
    /// failure) and replayed rows that failed `again` (put back unmarked, updated), as
    /// dead at `at`.
    pub fn record(
        &self,
        destination: &str,
        new: &[(&str, &[u8], &Failure)],
        again: &[(i64, &Failure)],
        at: DateTime<Utc>,
    ) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let dead_at = rfc3339(at);
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO dead_letters (destination, source, reason, status, response,
                     attempts, first_attempt_at, dead_at, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for (source, json, failure) in new {
                insert.execute(params![
                    destination,
                    source,
                    failure.reason.as_str(),
                    failure.status,
                    failure.response,
                    failure.attempts,
                    rfc3339(failure.first_attempt_at),
                    dead_at,
                    String::from_utf8_lossy(json),
                ])?;
            }
            let mut update = tx.prepare_cached(
                "UPDATE dead_letters SET replay = 0, reason = ?2, status = ?3, response = ?4,
                     attempts = attempts + ?5, dead_at = ?6 WHERE id = ?1",
            )?;
            for (id, failure) in again {
                update.execute(params![
                    id,
                    failure.reason.as_str(),
                    failure.status,
                    failure.response,
                    failure.attempts,
                    dead_at
                ])?;
            }
        }
        tx.commit()
    }

    /// Dead letters of `destination` (all destinations when `None`), oldest first.
    pub fn list(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> rusqlite::Result<Vec<DeadLetter>> {
        let conn = self.conn();
        let mut query = conn.prepare_cached(
            "SELECT id, destination, source, reason, status, response, attempts,
                    first_attempt_at, dead_at, replay, message
             FROM dead_letters WHERE (?1 IS NULL OR destination = ?1)
             ORDER BY id LIMIT ?2",
        )?;
        let rows = query.query_map(params![destination, limit as i64], row_to_letter)?;
        rows.collect()
    }

    pub fn count(&self, destination: &str) -> rusqlite::Result<u64> {
        self.conn().query_row(
            "SELECT COUNT(*) FROM dead_letters WHERE destination = ?1",
            [destination],
            |row| row.get::<_, i64>(0).map(|n| n as u64),
        )
    }

    /// Marks every dead letter of `destination` for replay; returns how many.
    pub fn request_replay(&self, destination: &str) -> rusqlite::Result<usize> {
        self.conn().execute(
            "UPDATE dead_letters SET replay = 1 WHERE destination = ?1 AND replay = 0",
            [destination],
        )
    }

    /// Up to `limit` rows marked for replay with an id above `after`, oldest first.
    pub fn marked(
        &self,
        destination: &str,
        after: i64,
        limit: usize,
    ) -> rusqlite::Result<Vec<(i64, String, Vec<u8>)>> {
        let conn = self.conn();
        let mut query = conn.prepare_cached(
            "SELECT id, source, message FROM dead_letters
             WHERE destination = ?1 AND replay = 1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = query.query_map(params![destination, after, limit as i64], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get::<_, String>(2)?.into_bytes(),
            ))
        })?;
        rows.collect()
    }

    /// Removes replayed rows that were delivered.
    pub fn remove(&self, ids: &[i64]) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut delete = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
            for id in ids {
                delete.execute([id])?;
            }
        }
        tx.commit()
    }

    /// Puts replayed rows that failed again back, unmarked, with the new failure.
    pub fn failed_again(&self, ids: &[i64], failure: &Failure) -> rusqlite::Result<()> {
        let again: Vec<_> = ids.iter().map(|&id| (id, failure)).collect();
        self.record("", &[], &again, Utc::now())
    }

    /// The row with this id, if any (tests and the admin API).
    pub fn get(&self, id: i64) -> rusqlite::Result<Option<DeadLetter>> {
        self.conn()
            .query_row(
                "SELECT id, destination, source, reason, status, response, attempts,
                        first_attempt_at, dead_at, replay, message
                 FROM dead_letters WHERE id = ?1",
                [id],
                row_to_letter,
            )
            .optional()
    }
}

fn row_to_letter(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let message: String = row.get(10)?;
    let message = serde_json::value::RawValue::from_string(message).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(DeadLetter {
        id: row.get(0)?,
        destination: row.get(1)?,
        source: row.get(2)?,
        reason: row.get(3)?,
        status: row.get(4)?,
        response: row.get(5)?,
        attempts: row.get(6)?,
        first_attempt_at: row.get(7)?,
        dead_at: row.get(8)?,
        replay: row.get(9)?,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::dead_letters::Reason;

    fn failure(reason: Reason) -> Failure {
        Failure {
            reason,
            status: Some(400),
            response: "{\"error\":\"bad\"}".into(),
            attempts: 1,
            first_attempt_at: Utc::now(),
        }
    }

    #[test]
    fn add_list_replay_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store
            .add(
                "hook",
                &[
                    ("web", br#"{"messageId":"a"}"#),
                    ("web", br#"{"messageId":"b"}"#),
                ],
                &failure(Reason::Rejected),
            )
            .unwrap();
        store
            .add(
                "other",
                &[("web", br#"{"messageId":"c"}"#)],
                &failure(Reason::RetriesExhausted),
            )
            .unwrap();
        let listed = store.list(Some("hook"), 10).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].reason, "rejected");
        assert_eq!(listed[0].message.get(), r#"{"messageId":"a"}"#);
        assert_eq!(store.list(None, 10).unwrap().len(), 3);

        // A second connection (the CLI) marks them; the first sees the marks.
        let cli = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(cli.request_replay("hook").unwrap(), 2);
        assert_eq!(cli.request_replay("hook").unwrap(), 0, "already marked");
        let marked = store.marked("hook", 0, 10).unwrap();
        assert_eq!(marked.len(), 2);
        assert_eq!(store.marked("hook", marked[0].0, 10).unwrap().len(), 1);

        store.remove(&[marked[0].0]).unwrap();
        let mut again = failure(Reason::Rejected);
        again.attempts = 2;
        store.failed_again(&[marked[1].0], &again).unwrap();
        let left = store.get(marked[1].0).unwrap().unwrap();
        assert!(!left.replay);
        assert_eq!(left.attempts, 3);
        assert_eq!(store.count("hook").unwrap(), 1);
    }
}
