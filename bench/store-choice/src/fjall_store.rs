//! fjall 3 (LSM tree): one database, one keyspace (fjall 2 called these
//! "keyspace" and "partition"), keys are big-endian u64 so byte order is
//! sequence order.

use crate::store::{Result, Store};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

pub struct FjallStore {
    db: Database,
    events: Keyspace,
}

impl FjallStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder(dir).open()?;
        let events = db.keyspace("events", KeyspaceCreateOptions::default)?;
        Ok(Self { db, events })
    }
}

impl Store for FjallStore {
    fn append(&mut self, first_seq: u64, events: &[&[u8]]) -> Result<()> {
        // A write batch is one journal write; SyncData makes the commit
        // fdatasync the journal before returning.
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for (i, ev) in events.iter().enumerate() {
            let key = (first_seq + i as u64).to_be_bytes();
            batch.insert(&self.events, &key[..], *ev);
        }
        batch.commit()?;
        Ok(())
    }

    fn read_from(&mut self, from: u64, f: &mut dyn FnMut(u64, &[u8])) -> Result<u64> {
        let mut visited = 0;
        for guard in self.events.range(from.to_be_bytes()..) {
            let (k, v) = guard.into_inner()?;
            f(u64::from_be_bytes(k.as_ref().try_into()?), &v);
            visited += 1;
        }
        Ok(visited)
    }

    fn reclaim_below(&mut self, seq: u64) -> Result<()> {
        // fjall 3 has no public range delete, so this writes one tombstone per
        // key; space only comes back when compaction drops them.
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for guard in self.events.range(..seq.to_be_bytes()) {
            batch.remove(&self.events, guard.key()?);
        }
        batch.commit()?;
        Ok(())
    }

    fn quiesce(&mut self) -> Result<()> {
        // Sealed memtables are dropped only once their flush is registered.
        while self.events.sealed_memtable_count() > 0 || self.db.active_compactions() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        // Flush the memtable into a table file so its second write is counted.
        self.events.rotate_memtable_and_wait()?;
        Ok(())
    }

    fn compact(&mut self) -> Result<Option<&'static str>> {
        // The tombstones are still in the memtable; flush them first so the
        // compaction can see them. `major_compact` is #[doc(hidden)] in
        // fjall 3 but public; it is the only way to force dropped data off
        // disk on demand.
        self.events.rotate_memtable_and_wait()?;
        self.events.major_compact()?;
        Ok(Some("major_compact"))
    }
}
