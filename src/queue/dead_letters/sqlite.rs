//! The dead-letter store beside the local log: SQLite (WAL, synchronous=FULL) under the
//! data dir. Low volume, queried by destination, and changed by the `fanout dead-letters`
//! command while the server runs, which SQLite's own locking makes safe across
//! processes. Replay marks rows; the server's delivery task for that destination picks
//! marked rows up, deletes them once delivered, and puts them back (unmarked, updated)
//! if they fail again.
//!
//! Each row carries the bytes it counts for, and triggers keep their total in a one-row
//! table, whichever process changes the rows; a record drops the oldest rows past the
//! cap in the same transaction.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::{rfc3339, DeadLetter, Dropped, Failure};

pub const FILE_NAME: &str = "dead-letters.sqlite";

/// What a letter counts for beside its message and answer: its other columns, the row's
/// header and its index entries.
pub const LETTER_OVERHEAD: u64 = 128;
/// Largest WAL file kept after a checkpoint (8 MiB).
const WAL_LIMIT: i64 = 8 * 1024 * 1024;

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Past this many bytes of letters, the oldest are dropped.
    max_bytes: u64,
}

fn letter_bytes(json: &[u8], response: &str) -> i64 {
    (json.len() as u64 + response.len() as u64 + LETTER_OVERHEAD) as i64
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`, keeping `max_bytes` of letters.
    pub fn open(data_dir: &Path, max_bytes: u64) -> rusqlite::Result<SqliteStore> {
        if let Err(e) = std::fs::create_dir_all(data_dir) {
            return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
        }
        let mut conn = Connection::open(data_dir.join(FILE_NAME))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A dead letter replaces a message the queue no longer holds: it must be durable.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A WAL that one big transaction grew is cut back after its checkpoint.
        conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
        // Immediate: the server and the command line may open it at once.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
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
                ON dead_letters (destination, replay, id);
            CREATE INDEX IF NOT EXISTS dead_letters_by_age ON dead_letters (dead_at);",
        )?;
        let sized = tx
            .prepare("SELECT 1 FROM pragma_table_info('dead_letters') WHERE name = 'bytes'")?
            .exists([])?;
        if !sized {
            // A store from before the cap: its letters are measured once.
            tx.execute_batch(&format!(
                "ALTER TABLE dead_letters ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
                 UPDATE dead_letters SET bytes = length(CAST(message AS BLOB))
                     + length(CAST(response AS BLOB)) + {LETTER_OVERHEAD};"
            ))?;
        }
        // The total is kept by triggers, so that every process's changes count.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS dead_letters_size (
                only INTEGER PRIMARY KEY CHECK (only = 0),
                bytes INTEGER NOT NULL
            );
            INSERT OR IGNORE INTO dead_letters_size
                VALUES (0, (SELECT COALESCE(SUM(bytes), 0) FROM dead_letters));
            CREATE TRIGGER IF NOT EXISTS dead_letters_added AFTER INSERT ON dead_letters
                BEGIN UPDATE dead_letters_size SET bytes = bytes + NEW.bytes; END;
            CREATE TRIGGER IF NOT EXISTS dead_letters_removed AFTER DELETE ON dead_letters
                BEGIN UPDATE dead_letters_size SET bytes = bytes - OLD.bytes; END;
            CREATE TRIGGER IF NOT EXISTS dead_letters_resized AFTER UPDATE OF bytes ON dead_letters
                BEGIN UPDATE dead_letters_size SET bytes = bytes - OLD.bytes + NEW.bytes; END;",
        )?;
        tx.commit()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            max_bytes,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("dead-letter store lock poisoned")
    }

    /// Records messages (source, JSON) that failed together, in one transaction.
    #[cfg(test)]
    pub fn add(
        &self,
        destination: &str,
        messages: &[(&str, &[u8])],
        failure: &Failure,
        at: DateTime<Utc>,
    ) -> rusqlite::Result<Dropped> {
        let new: Vec<_> = messages.iter().map(|&(s, j)| (s, j, failure)).collect();
        self.record(destination, &new, &[], at)
    }

    /// Records one batch's outcome in one transaction: `new` dead letters (source, JSON,
    /// failure) and replayed rows that failed `again` (put back unmarked, updated), as
    /// dead at `at`; then drops the oldest letters past `max_bytes`, and returns how many
    /// of each destination's went.
    pub fn record(
        &self,
        destination: &str,
        new: &[(&str, &[u8], &Failure)],
        again: &[(i64, &Failure)],
        at: DateTime<Utc>,
    ) -> rusqlite::Result<Dropped> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let dead_at = rfc3339(at);
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO dead_letters (destination, source, reason, status, response,
                     attempts, first_attempt_at, dead_at, message, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                    letter_bytes(json, &failure.response),
                ])?;
            }
            let mut update = tx.prepare_cached(
                "UPDATE dead_letters SET replay = 0, reason = ?2, status = ?3, response = ?4,
                     attempts = attempts + ?5, dead_at = ?6,
                     bytes = length(CAST(message AS BLOB)) + ?7
                 WHERE id = ?1",
            )?;
            for (id, failure) in again {
                update.execute(params![
                    id,
                    failure.reason.as_str(),
                    failure.status,
                    failure.response,
                    failure.attempts,
                    dead_at,
                    (failure.response.len() as u64 + LETTER_OVERHEAD) as i64,
                ])?;
            }
        }
        let dropped = drop_oldest(&tx, self.max_bytes)?;
        tx.commit()?;
        Ok(dropped)
    }

    /// Drops the letters dead before `cutoff`; returns how many of each destination's.
    pub fn drop_expired(&self, cutoff: DateTime<Utc>) -> rusqlite::Result<Dropped> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let cutoff = rfc3339(cutoff);
        let mut dropped = Dropped::new();
        {
            let mut expired = tx.prepare_cached(
                "SELECT destination, COUNT(*) FROM dead_letters WHERE dead_at < ?1
                 GROUP BY destination",
            )?;
            let mut rows = expired.query([&cutoff])?;
            while let Some(row) = rows.next()? {
                dropped.insert(row.get(0)?, row.get::<_, i64>(1)? as u64);
            }
        }
        tx.execute("DELETE FROM dead_letters WHERE dead_at < ?1", [&cutoff])?;
        tx.commit()?;
        Ok(dropped)
    }

    /// Bytes the letters count for (what `max_bytes` bounds).
    #[cfg(test)]
    pub fn held_bytes(&self) -> rusqlite::Result<u64> {
        self.conn()
            .query_row("SELECT bytes FROM dead_letters_size", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|bytes| bytes.max(0) as u64)
    }

    /// Up to `limit` dead letters of `destination` (all destinations when `None`) with an
    /// id above `after`, oldest first.
    pub fn list(
        &self,
        destination: Option<&str>,
        after: i64,
        limit: usize,
    ) -> rusqlite::Result<Vec<DeadLetter>> {
        let conn = self.conn();
        let mut query = conn.prepare_cached(
            "SELECT id, destination, source, reason, status, response, attempts,
                    first_attempt_at, dead_at, replay, message
             FROM dead_letters WHERE (?1 IS NULL OR destination = ?1) AND id > ?2
             ORDER BY id LIMIT ?3",
        )?;
        let rows = query.query_map(params![destination, after, limit as i64], row_to_letter)?;
        rows.collect()
    }

    #[cfg(test)]
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
    #[cfg(test)]
    pub fn failed_again(
        &self,
        ids: &[i64],
        failure: &Failure,
        at: DateTime<Utc>,
    ) -> rusqlite::Result<Dropped> {
        let again: Vec<_> = ids.iter().map(|&id| (id, failure)).collect();
        self.record("", &[], &again, at)
    }

    /// The row with this id, if any.
    #[cfg(test)]
    pub fn get(&self, id: i64) -> rusqlite::Result<Option<DeadLetter>> {
        use rusqlite::OptionalExtension;
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

/// Drops the oldest letters until what is left counts for `max_bytes` or less, so the
/// newest are kept.
fn drop_oldest(tx: &rusqlite::Transaction<'_>, max_bytes: u64) -> rusqlite::Result<Dropped> {
    let held: i64 = tx.query_row("SELECT bytes FROM dead_letters_size", [], |row| row.get(0))?;
    let mut excess = (held.max(0) as u64).saturating_sub(max_bytes);
    let mut dropped = Dropped::new();
    if excess == 0 {
        return Ok(dropped);
    }
    let mut through = None;
    {
        let mut oldest =
            tx.prepare_cached("SELECT id, destination, bytes FROM dead_letters ORDER BY id")?;
        let mut rows = oldest.query([])?;
        while excess > 0 {
            let Some(row) = rows.next()? else { break };
            excess = excess.saturating_sub(row.get::<_, i64>(2)?.max(0) as u64);
            *dropped.entry(row.get(1)?).or_default() += 1;
            through = Some(row.get::<_, i64>(0)?);
        }
    }
    if let Some(id) = through {
        tx.execute("DELETE FROM dead_letters WHERE id <= ?1", [id])?;
    }
    Ok(dropped)
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
#[allow(clippy::disallowed_methods)] // tests read the system clock freely
mod tests {
    use super::*;
    use crate::queue::dead_letters::Reason;

    fn failure(reason: Reason) -> Failure {
        Failure {
            reason,
            status: Some(400),
            response: "{\"error\":\"bad\"}".into(),
            attempts: 1,
            first_attempt_at: Utc::now(),
        }
    }

    /// Room enough that nothing is dropped.
    const ROOMY: u64 = 1 << 30;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + minutes * 60, 0).unwrap()
    }

    #[test]
    fn add_list_replay_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), ROOMY).unwrap();
        store
            .add(
                "hook",
                &[
                    ("web", br#"{"messageId":"a"}"#),
                    ("web", br#"{"messageId":"b"}"#),
                ],
                &failure(Reason::Rejected),
                at(0),
            )
            .unwrap();
        store
            .add(
                "other",
                &[("web", br#"{"messageId":"c"}"#)],
                &failure(Reason::RetriesExhausted),
                at(0),
            )
            .unwrap();
        let listed = store.list(Some("hook"), 0, 10).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].reason, "rejected");
        assert_eq!(listed[0].message.get(), r#"{"messageId":"a"}"#);
        assert_eq!(store.list(None, 0, 10).unwrap().len(), 3);
        let after_first = store.list(None, listed[0].id, 10).unwrap();
        assert_eq!(after_first.len(), 2, "the page after the first letter");
        assert_eq!(after_first[0].id, listed[1].id);

        // A second connection (the CLI) marks them; the first sees the marks.
        let cli = SqliteStore::open(dir.path(), ROOMY).unwrap();
        assert_eq!(cli.request_replay("hook").unwrap(), 2);
        assert_eq!(cli.request_replay("hook").unwrap(), 0, "already marked");
        let marked = store.marked("hook", 0, 10).unwrap();
        assert_eq!(marked.len(), 2);
        assert_eq!(store.marked("hook", marked[0].0, 10).unwrap().len(), 1);

        store.remove(&[marked[0].0]).unwrap();
        let mut again = failure(Reason::Rejected);
        again.attempts = 2;
        store.failed_again(&[marked[1].0], &again, at(1)).unwrap();
        let left = store.get(marked[1].0).unwrap().unwrap();
        assert!(!left.replay);
        assert_eq!(left.attempts, 3);
        assert_eq!(store.count("hook").unwrap(), 1);
    }

    fn json(i: usize) -> Vec<u8> {
        format!(r#"{{"messageId":"m{i:03}"}}"#).into_bytes()
    }

    fn ids(store: &SqliteStore) -> Vec<String> {
        let letters = store.list(None, 0, 100).unwrap();
        letters
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l.message.get()).unwrap())
            .map(|m| m["messageId"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn past_max_bytes_the_oldest_letters_go_and_each_destination_counts_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let refused = failure(Reason::Rejected);
        let one = letter_bytes(&json(0), &refused.response) as u64;
        let store = SqliteStore::open(dir.path(), 3 * one).unwrap();
        let add = |destination, i| {
            store
                .add(destination, &[("web", &json(i))], &refused, at(0))
                .unwrap()
        };
        assert!(add("other", 0).is_empty());
        assert!(add("hook", 1).is_empty());
        assert!(add("hook", 2).is_empty());
        assert_eq!(store.held_bytes().unwrap(), 3 * one, "at the cap, all kept");
        assert_eq!(add("hook", 3), Dropped::from([("other".to_string(), 1)]));
        assert_eq!(add("hook", 4), Dropped::from([("hook".to_string(), 1)]));
        assert_eq!(ids(&store), ["m002", "m003", "m004"], "the newest are kept");
        assert_eq!(store.held_bytes().unwrap(), 3 * one);

        // One batch past the cap by two letters drops two at once.
        let two: Vec<(&str, &[u8], &Failure)> = vec![
            ("web", b"{\"messageId\":\"m005\"}", &refused),
            ("web", b"{\"messageId\":\"m006\"}", &refused),
        ];
        let dropped = store.record("hook", &two, &[], at(1)).unwrap();
        assert_eq!(dropped, Dropped::from([("hook".to_string(), 2)]));
        assert_eq!(ids(&store), ["m004", "m005", "m006"]);

        // A longer answer on a letter that failed again counts too.
        let mut longer = failure(Reason::Rejected);
        longer.response = "x".repeat(2 * one as usize);
        let newest = store.list(None, 0, 10).unwrap()[2].id;
        let dropped = store.failed_again(&[newest], &longer, at(2)).unwrap();
        assert_eq!(dropped, Dropped::from([("hook".to_string(), 2)]));
        assert_eq!(ids(&store), ["m006"]);

        // Another process sees the same total.
        let cli = SqliteStore::open(dir.path(), 3 * one).unwrap();
        assert_eq!(cli.held_bytes().unwrap(), store.held_bytes().unwrap());
    }

    #[test]
    fn letters_dead_before_the_cutoff_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), ROOMY).unwrap();
        let refused = failure(Reason::Rejected);
        store
            .add("hook", &[("web", &json(0))], &refused, at(0))
            .unwrap();
        store
            .add("other", &[("web", &json(1))], &refused, at(60))
            .unwrap();
        store
            .add("hook", &[("web", &json(2))], &refused, at(120))
            .unwrap();
        assert!(store.drop_expired(at(0)).unwrap().is_empty());
        let dropped = store.drop_expired(at(90)).unwrap();
        assert_eq!(
            dropped,
            Dropped::from([("hook".to_string(), 1), ("other".to_string(), 1)])
        );
        assert_eq!(ids(&store), ["m002"]);
        assert_eq!(
            store.held_bytes().unwrap(),
            letter_bytes(&json(2), &refused.response) as u64
        );
    }

    #[test]
    fn a_store_from_before_the_cap_is_measured_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let old = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        old.execute_batch(
            "CREATE TABLE dead_letters (
                id INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL,
                source TEXT NOT NULL, reason TEXT NOT NULL, status INTEGER,
                response TEXT NOT NULL, attempts INTEGER NOT NULL,
                first_attempt_at TEXT NOT NULL, dead_at TEXT NOT NULL,
                replay INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL);
             INSERT INTO dead_letters (destination, source, reason, response, attempts,
                 first_attempt_at, dead_at, message)
             VALUES ('hook', 'web', 'rejected', 'no', 1, 'x', 'y', '{\"messageId\":\"é\"}');",
        )
        .unwrap();
        drop(old);
        let store = SqliteStore::open(dir.path(), ROOMY).unwrap();
        let expected = letter_bytes("{\"messageId\":\"é\"}".as_bytes(), "no") as u64;
        assert_eq!(store.held_bytes().unwrap(), expected);
    }
}
