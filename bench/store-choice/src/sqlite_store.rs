//! SQLite through rusqlite (bundled), WAL mode with synchronous=FULL so every
//! commit fsyncs the WAL.

use crate::store::{Result, Store};
use rusqlite::Connection;
use std::path::Path;

const INSERT: &str = "INSERT INTO events (seq, body) VALUES (?1, ?2)";

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("events.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)",
        )?;
        Ok(Self { conn })
    }
}

impl Store for SqliteStore {
    fn append(&mut self, first_seq: u64, events: &[&[u8]]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for (i, ev) in events.iter().enumerate() {
                insert.execute(((first_seq + i as u64) as i64, *ev))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read_from(&mut self, from: u64, f: &mut dyn FnMut(u64, &[u8])) -> Result<u64> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM events WHERE seq >= ?1 ORDER BY seq")?;
        let mut rows = stmt.query([from as i64])?;
        let mut visited = 0;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            f(seq as u64, row.get_ref(1)?.as_blob()?);
            visited += 1;
        }
        Ok(visited)
    }

    fn reclaim_below(&mut self, seq: u64) -> Result<()> {
        self.conn
            .execute("DELETE FROM events WHERE seq < ?1", [seq as i64])?;
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        // Copy the WAL into the main file so that second write is counted.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    fn compact(&mut self) -> Result<Option<&'static str>> {
        // Deleted pages go to the freelist; the file shrinks only by VACUUM
        // (which rewrites the whole database) plus a checkpoint of the WAL.
        self.conn.execute_batch("VACUUM")?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(Some("VACUUM + wal_checkpoint(TRUNCATE)"))
    }
}
