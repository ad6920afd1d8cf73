//! The memory backend: a bounded LRU of anonymousId → what is known, kept across
//! restarts by its journal. Expiry is read against `Clock`, so it holds on paused time.

use std::path::Path;
use std::sync::Arc;

use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::journal::{Journal, Line};
use super::message::{Known, Lesson};
use crate::clock::Clock;

/// Re-taught without change, an entry is written again (its time refreshed) at most
/// this often, so repeated identifies do not grow the journal.
const REFRESH_SECS: u32 = 24 * 3600;

#[derive(Debug)]
struct Entry {
    known: Known,
    learned_at: u32,
}

pub struct MemoryStore {
    entries: Cache<Box<str>, Arc<Entry>>,
    journal: Journal,
    ttl_secs: u32,
    clock: Clock,
}

impl MemoryStore {
    pub fn open(
        dir: &Path,
        max_entries: u64,
        ttl: std::time::Duration,
        clock: Clock,
    ) -> anyhow::Result<MemoryStore> {
        let entries = Cache::builder()
            .max_capacity(max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        let ttl_secs = ttl.as_secs().clamp(1, u64::from(u32::MAX / 2)) as u32;
        let now = clock.unix_secs();
        let journal = Journal::open(dir, |line| {
            let (anonymous_id, known, learned_at) = line.known();
            if learned_at.saturating_add(ttl_secs) > now {
                let entry = Arc::new(Entry { known, learned_at });
                entries.insert(anonymous_id.into_boxed_str(), entry);
            }
        })?;
        Ok(MemoryStore {
            entries,
            journal,
            ttl_secs,
            clock,
        })
    }

    fn live(&self, anonymous_id: &str, now: u32) -> Option<Arc<Entry>> {
        self.entries
            .get(anonymous_id)
            .filter(|e| e.learned_at.saturating_add(self.ttl_secs) > now)
    }

    /// What the newest live entry that names `user_id` knows: a walk over every entry,
    /// for the rare privacy deletion, not for the request path.
    pub fn known_user(&self, user_id: &str) -> Option<Known> {
        let now = self.clock.unix_secs();
        self.entries
            .iter()
            .filter(|(_, e)| e.learned_at.saturating_add(self.ttl_secs) > now)
            .filter(|(_, e)| e.known.user_id.as_deref() == Some(user_id))
            .max_by_key(|(_, e)| e.learned_at)
            .map(|(_, e)| e.known.clone())
    }

    pub fn learn(&self, lessons: Vec<Lesson>) -> std::io::Result<()> {
        let now = self.clock.unix_secs();
        let mut lines = Vec::new();
        for lesson in lessons {
            let before = self.live(&lesson.anonymous_id, now);
            let mut known = before.as_ref().map(|e| e.known.clone()).unwrap_or_default();
            let changed = known.merge(lesson.known);
            let stale = before.is_none_or(|e| now.saturating_sub(e.learned_at) >= REFRESH_SECS);
            if !changed && !stale {
                continue;
            }
            lines.push(Line::new(&lesson.anonymous_id, &known, now));
            let entry = Arc::new(Entry {
                known,
                learned_at: now,
            });
            self.entries
                .insert(lesson.anonymous_id.into_boxed_str(), entry);
        }
        if lines.is_empty() {
            return Ok(());
        }
        let held = self.journal.append(&lines)?;
        self.entries.run_pending_tasks();
        if held > 2 * self.entries.entry_count() + 10_000 {
            self.compact(now)?;
        }
        Ok(())
    }

    /// Rewrites the journal with just the live entries.
    fn compact(&self, now: u32) -> std::io::Result<()> {
        let live = self
            .entries
            .iter()
            .filter(|(_, e)| e.learned_at.saturating_add(self.ttl_secs) > now)
            .map(|(id, e)| Line::new(&id, &e.known, e.learned_at));
        self.journal.rewrite(live)
    }

    pub fn lookup(&self, anonymous_id: &str) -> Option<Known> {
        self.live(anonymous_id, self.clock.unix_secs())
            .map(|e| e.known.clone())
    }

    /// Entries held (expired ones included until they are evicted or read).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lesson(anonymous_id: &str, email: &str) -> Lesson {
        Lesson {
            anonymous_id: anonymous_id.into(),
            known: Known {
                email: Some(email.into()),
                ..Known::default()
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_last_their_ttl_on_paused_time() {
        let dir = tempfile::tempdir().unwrap();
        let start = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let clock = Clock::following_tokio(start);
        let ttl = Duration::from_secs(3600);
        let store = MemoryStore::open(dir.path(), 100, ttl, clock).unwrap();
        store.learn(vec![lesson("a1", "x@example.com")]).unwrap();
        tokio::time::sleep(Duration::from_secs(3599)).await;
        assert!(store.lookup("a1").is_some(), "within the hour");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.lookup("a1"), None, "an hour after it was taught");
        // Reopened later, the expired entry is not loaded again.
        drop(store);
        let store = MemoryStore::open(dir.path(), 100, ttl, clock).unwrap();
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn max_entries_bounds_the_store_and_drops_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(3600);
        let store = MemoryStore::open(dir.path(), 10, ttl, Clock::system()).unwrap();
        for i in 0..10 {
            store
                .learn(vec![lesson(&format!("a{i}"), "x@example.com")])
                .unwrap();
        }
        // Read just now, a0 outlasts the entries taught after it but not read since.
        assert!(store.lookup("a0").is_some());
        for i in 10..15 {
            store
                .learn(vec![lesson(&format!("a{i}"), "x@example.com")])
                .unwrap();
        }
        assert!(store.len() <= 10, "held {}", store.len());
        assert!(store.lookup("a14").is_some());
        assert!(
            store.lookup("a0").is_some(),
            "read last, so not the least recently used"
        );
        assert!(
            store.lookup("a1").is_none(),
            "the least recently used went first"
        );
    }

    #[test]
    fn the_journal_keeps_entries_across_a_reopen_and_merges_lessons() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(3600);
        let store = MemoryStore::open(dir.path(), 100, ttl, Clock::system()).unwrap();
        store.learn(vec![lesson("a1", "x@example.com")]).unwrap();
        let user = Lesson {
            anonymous_id: "a1".into(),
            known: Known {
                user_id: Some("u1".into()),
                ..Known::default()
            },
        };
        store.learn(vec![user]).unwrap();
        drop(store);
        let store = MemoryStore::open(dir.path(), 100, ttl, Clock::system()).unwrap();
        assert_eq!(
            store.lookup("a1"),
            Some(Known {
                user_id: Some("u1".into()),
                email: Some("x@example.com".into()),
                phone: None,
            })
        );
    }
}
