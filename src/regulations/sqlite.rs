//! The regulations store beside the local log: SQLite under the data dir (WAL,
//! synchronous=FULL: a regulation is a legal promise). One row per regulation, its JSON
//! and a revision that every change bumps, so that a change made from a stale copy is
//! refused (the same compare-and-set the shared store gets from its KV bucket).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

pub const FILE_NAME: &str = "regulations.sqlite";

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
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS regulations (
                id TEXT PRIMARY KEY,
                revision INTEGER NOT NULL,
                body TEXT NOT NULL
            );",
        )?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("regulations store lock poisoned")
    }

    /// Every regulation: (id, revision, JSON).
    pub fn load_all(&self) -> rusqlite::Result<Vec<(String, u64, String)>> {
        let conn = self.conn();
        let mut select = conn.prepare("SELECT id, revision, body FROM regulations")?;
        let rows = select.query_map([], |row| {
            Ok((row.get(0)?, row.get::<_, i64>(1)? as u64, row.get(2)?))
        })?;
        rows.collect()
    }

    /// Stores a new regulation at revision 1; `None` when the id is taken.
    pub fn insert(&self, id: &str, body: &str) -> rusqlite::Result<Option<u64>> {
        let inserted = self.conn().execute(
            "INSERT OR IGNORE INTO regulations (id, revision, body) VALUES (?1, 1, ?2)",
            params![id, body],
        )?;
        Ok((inserted == 1).then_some(1))
    }

    /// Replaces the regulation if it is still at `revision`; returns the new revision,
    /// `None` when it changed meanwhile (or is gone).
    pub fn update(&self, id: &str, body: &str, revision: u64) -> rusqlite::Result<Option<u64>> {
        let updated = self.conn().execute(
            "UPDATE regulations SET body = ?2, revision = revision + 1
             WHERE id = ?1 AND revision = ?3",
            params![id, body, revision as i64],
        )?;
        Ok((updated == 1).then_some(revision + 1))
    }

    /// Deletes the regulation; whether it was there.
    pub fn delete(&self, id: &str) -> rusqlite::Result<bool> {
        let conn = self.conn();
        let found: Option<i64> = conn
            .query_row("SELECT 1 FROM regulations WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        conn.execute("DELETE FROM regulations WHERE id = ?1", [id])?;
        Ok(found.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_from_a_stale_revision_is_refused_and_rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.insert("r1", "{}").unwrap(), Some(1));
        assert_eq!(store.insert("r1", "{}").unwrap(), None, "the id is taken");
        assert_eq!(store.update("r1", r#"{"a":1}"#, 1).unwrap(), Some(2));
        assert_eq!(store.update("r1", r#"{"a":2}"#, 1).unwrap(), None, "stale");
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.load_all().unwrap(),
            [("r1".to_string(), 2, r#"{"a":1}"#.to_string())]
        );
        assert!(store.delete("r1").unwrap());
        assert!(!store.delete("r1").unwrap());
        assert!(store.load_all().unwrap().is_empty());
    }
}
