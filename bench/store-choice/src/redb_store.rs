//! redb (copy-on-write B-tree): one table u64 -> bytes, one write
//! transaction per commit with `Durability::Immediate`.

use crate::store::{Result, Store};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use std::path::Path;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("events.redb"))?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn append(&mut self, first_seq: u64, events: &[&[u8]]) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut table = tx.open_table(EVENTS)?;
            for (i, ev) in events.iter().enumerate() {
                table.insert(first_seq + i as u64, *ev)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read_from(&mut self, from: u64, f: &mut dyn FnMut(u64, &[u8])) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(EVENTS)?;
        let mut visited = 0;
        for entry in table.range(from..)? {
            let (k, v) = entry?;
            f(k.value(), v.value());
            visited += 1;
        }
        Ok(visited)
    }

    fn reclaim_below(&mut self, seq: u64) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut table = tx.open_table(EVENTS)?;
            table.retain_in(..seq, |_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn compact(&mut self) -> Result<Option<&'static str>> {
        // Freed pages are reused by later writes, but the file only shrinks
        // through an explicit compaction.
        while self.db.compact()? {}
        Ok(Some("Database::compact"))
    }
}
