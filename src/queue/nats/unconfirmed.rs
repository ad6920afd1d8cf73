//! Publishes whose outcome is unknown: no acknowledgement came in time (a paused or slow
//! server, a connection lost after sending), so the pack may be on the stream or not,
//! and ingest answers 503 saying so. The client sends the messages again, perhaps packed
//! with others: a new pack, with another `Nats-Msg-Id`, which the stream would store
//! again. So each such pack is kept for `queue.duplicate_window` (minus a margin), and a
//! request holding any of its messages first publishes that pack again, as it was: the
//! stream's duplicate window stores it at most once, and once acknowledged its messages
//! are known stored and left out of the new request's packs.
//!
//! Not covered (counted by `fanout_queue_publish_unknown_untracked_total`): a retry
//! after the window, a pack holding a message without a messageId (no `Nats-Msg-Id`),
//! and packs past `MAX_BYTES` kept.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::time::Instant;

/// A message's dedupe key (source and messageId).
pub(super) type Key = [u32; 3];

/// Bytes of packs kept to publish again; past it, a pack is not kept.
const MAX_BYTES: usize = 64 << 20;

/// A stream message as it was published.
#[derive(Debug, Clone)]
pub(super) struct Pack {
    /// Its `Nats-Msg-Id`.
    pub id: String,
    pub subject: Subject,
    pub payload: Bytes,
    /// Its messages' dedupe keys.
    pub keys: Vec<Key>,
}

pub(super) struct Unconfirmed {
    /// How long after its publish a pack can still be published again safely.
    window: Duration,
    state: Mutex<State>,
    /// Whether anything is kept: ingest skips the lock when nothing is (the usual case).
    any: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Packs of unknown outcome, by id, with when their window ends.
    packs: HashMap<String, (Pack, Instant)>,
    /// Which kept pack holds a message.
    by_key: HashMap<Key, String>,
    /// Messages known stored by a request answered 503 (its other packs were
    /// acknowledged, or a kept pack was published again), until their window ends.
    stored: HashMap<Key, Instant>,
    bytes: usize,
}

impl Unconfirmed {
    pub(super) fn new(duplicate_window: Duration) -> Unconfirmed {
        // The server's window for a pack starts when it stores it, after it was sent;
        // the margin keeps a publish made again near the end on the safe side.
        let margin = (duplicate_window / 10).min(Duration::from_secs(5));
        Unconfirmed {
            window: duplicate_window.saturating_sub(margin),
            state: Mutex::new(State::default()),
            any: AtomicBool::new(false),
        }
    }

    /// A pack published at `sent` whose outcome is unknown. False if it cannot be kept.
    pub(super) fn unknown(&self, pack: Pack, sent: Instant) -> bool {
        let mut state = self.lock(sent);
        if state.packs.contains_key(&pack.id) {
            return true;
        }
        if state.bytes + pack.payload.len() > MAX_BYTES {
            return false;
        }
        self.any.store(true, Ordering::Relaxed);
        state.bytes += pack.payload.len();
        for key in &pack.keys {
            state.by_key.insert(*key, pack.id.clone());
        }
        state
            .packs
            .insert(pack.id.clone(), (pack, sent + self.window));
        true
    }

    /// Messages known stored although their request was answered 503.
    pub(super) fn stored(&self, keys: impl IntoIterator<Item = Key>, now: Instant) {
        let mut state = self.lock(now);
        let until = now + self.window;
        self.any.store(true, Ordering::Relaxed);
        state
            .stored
            .extend(keys.into_iter().map(|key| (key, until)));
    }

    /// The kept packs holding any of `keys`: to publish again before them.
    pub(super) fn holding(&self, keys: &[Key], now: Instant) -> Vec<Pack> {
        if !self.any.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let state = self.lock(now);
        let mut ids: Vec<&String> = keys.iter().filter_map(|k| state.by_key.get(k)).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| state.packs.get(id).map(|(pack, _)| pack.clone()))
            .collect()
    }

    /// A kept pack published again and acknowledged: its messages are stored, once.
    pub(super) fn confirmed(&self, id: &str, now: Instant) {
        let mut state = self.lock(now);
        let Some((pack, until)) = state.packs.remove(id) else {
            return;
        };
        state.bytes -= pack.payload.len();
        for key in pack.keys {
            if state.by_key.get(&key).is_some_and(|holder| holder == id) {
                state.by_key.remove(&key);
            }
            state.stored.insert(key, until);
        }
    }

    /// Which of `keys` are known stored already (within their window).
    pub(super) fn stored_of(&self, keys: &[Key], now: Instant) -> HashSet<Key> {
        if !self.any.load(Ordering::Relaxed) {
            return HashSet::new();
        }
        let state = self.lock(now);
        keys.iter()
            .filter(|key| state.stored.contains_key(*key))
            .copied()
            .collect()
    }

    /// The state, with what is past its window dropped (counted: a retry of those
    /// messages can be stored twice).
    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().expect("unconfirmed packs poisoned");
        if state.packs.is_empty() && state.stored.is_empty() {
            return state;
        }
        let expired: Vec<String> = state
            .packs
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some((pack, _)) = state.packs.remove(&id) {
                state.bytes -= pack.payload.len();
                crate::metrics::publish_unknown_untracked(pack.keys.len() as u64);
                for key in pack.keys {
                    if state.by_key.get(&key).is_some_and(|holder| *holder == id) {
                        state.by_key.remove(&key);
                    }
                }
            }
        }
        state.stored.retain(|_, until| *until > now);
        if state.packs.is_empty() && state.stored.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(id: &str, keys: &[u32]) -> Pack {
        Pack {
            id: id.into(),
            subject: Subject::from("s.p.0"),
            payload: Bytes::from(vec![0u8; 10]),
            keys: keys.iter().map(|&k| [k, 0, 0]).collect(),
        }
    }

    #[test]
    fn a_retry_finds_the_pack_of_unknown_outcome_until_its_window_ends() {
        let unconfirmed = Unconfirmed::new(Duration::from_secs(120));
        let start = Instant::now();
        assert!(unconfirmed.unknown(pack("ac", &[1, 3]), start));
        // Retried with another message: the earlier pack is found by either key.
        let found = unconfirmed.holding(&[[1, 0, 0], [2, 0, 0]], start);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, "ac");
        unconfirmed.confirmed("ac", start);
        assert!(unconfirmed.holding(&[[1, 0, 0]], start).is_empty());
        // Both its messages are stored now, the one not retried yet too.
        let stored = unconfirmed.stored_of(&[[1, 0, 0], [2, 0, 0], [3, 0, 0]], start);
        assert_eq!(stored, HashSet::from([[1, 0, 0], [3, 0, 0]]));
        // Past the window (less the margin) nothing is known any more.
        let later = start + Duration::from_secs(115);
        assert!(unconfirmed.stored_of(&[[1, 0, 0]], later).is_empty());

        assert!(unconfirmed.unknown(pack("b", &[2]), start));
        assert!(unconfirmed.holding(&[[2, 0, 0]], later).is_empty());
        assert_eq!(unconfirmed.state.lock().unwrap().bytes, 0);
    }

    #[test]
    fn packs_past_the_budget_are_not_kept() {
        let unconfirmed = Unconfirmed::new(Duration::from_secs(120));
        let now = Instant::now();
        let mut big = pack("big", &[1]);
        big.payload = Bytes::from(vec![0u8; MAX_BYTES]);
        assert!(unconfirmed.unknown(big, now));
        assert!(!unconfirmed.unknown(pack("more", &[2]), now));
        assert!(unconfirmed.holding(&[[2, 0, 0]], now).is_empty());
    }
}
