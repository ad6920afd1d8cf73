//! Reservations: a request's new keys are marked pending (`reserve`), then enter the
//! window once its messages are durable (`Reservation::commit`), or are released if it
//! fails (dropping the reservation). With Redis, keys are claimed there too, and what a
//! Redis failure means is the configured policy: dedupe locally (fail open) or refuse
//! (fail closed).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use super::redis::{Claim as SharedClaim, RedisStore, SharedError};
use super::table::{self, Claim};
use super::{Dedupe, DedupeError};
use crate::message::{DedupeKey, Tag};

/// Requests holding pending keys (their ids are in the table's slots); each one's
/// receiver wakes when that request commits or gives up.
#[derive(Default)]
pub(super) struct Holders {
    waiting_on: HashMap<u32, watch::Receiver<()>>,
    next: u32,
}

impl Dedupe {
    /// Marks the new keys of one request as pending and says which messages are
    /// duplicates: of an accepted message, or of an earlier message in the same request.
    /// `source` is the request's source; messages without a key are never duplicates.
    pub async fn reserve(
        self: &Arc<Self>,
        source: &str,
        tags: impl Iterator<Item = Tag>,
    ) -> Result<Reservation, DedupeError> {
        let keys: Vec<Option<DedupeKey>> = if self.applies_to(source) {
            tags.map(|t| t.has_key().then_some(DedupeKey(t.key)))
                .collect()
        } else {
            tags.map(|_| None).collect()
        };
        let mut reservation = self.reserve_locally(&keys).await;
        if let Some(shared) = &self.shared {
            self.reserve_shared(shared, &mut reservation).await?;
        }
        Ok(reservation)
    }

    async fn reserve_locally(self: &Arc<Self>, keys: &[Option<DedupeKey>]) -> Reservation {
        let (signal, waiter) = watch::channel(());
        let mut reservation = Reservation {
            dedupe: self.clone(),
            duplicate: vec![false; keys.len()],
            ours: Vec::new(),
            holder: None,
            shared_claimed: false,
            _signal: signal,
            committed: false,
        };
        if keys.iter().all(Option::is_none) {
            return reservation;
        }
        // Registered before claiming, so a request meeting our claims can wait on us.
        let holder = {
            let mut holders = self.holders.lock().expect("holders poisoned");
            let id = holders.next;
            holders.next = (holders.next + 1) % table::MAX_HOLDER;
            holders.waiting_on.insert(id, waiter);
            id
        };
        reservation.holder = Some(holder);
        loop {
            let now = self.clock.unix_secs();
            let mut busy = None;
            for (index, key) in keys.iter().enumerate() {
                let Some(key) = key else { continue };
                match self.table.claim(*key, holder, now) {
                    Claim::Marked => reservation.ours.push((index, *key)),
                    Claim::Accepted => reservation.duplicate[index] = true,
                    // Our own claim: repeated within this request.
                    Claim::HeldBy(h) if h == holder => reservation.duplicate[index] = true,
                    Claim::HeldBy(other) => {
                        busy = Some(other);
                        break;
                    }
                }
            }
            let Some(other) = busy else {
                return reservation;
            };
            // Another request holds one of our keys: give ours back (so two requests
            // can never wait on each other) and wait for its outcome.
            for (_, key) in reservation.ours.drain(..) {
                self.table.unclaim(&key, holder);
            }
            reservation.duplicate.iter_mut().for_each(|d| *d = false);
            let other = self
                .holders
                .lock()
                .expect("holders poisoned")
                .waiting_on
                .get(&other)
                .cloned();
            match other {
                // Returns once that request's Reservation is dropped.
                Some(mut other) => {
                    let _ = other.changed().await;
                }
                // It finished between our claim and this lookup.
                None => tokio::task::yield_now().await,
            }
        }
    }

    /// Claims the locally new keys in Redis; keys another instance accepted become
    /// duplicates. On Redis errors: local-only dedupe (fail_open) or a 503 (fail_closed).
    async fn reserve_shared(
        &self,
        shared: &RedisStore,
        reservation: &mut Reservation,
    ) -> Result<(), DedupeError> {
        if reservation.ours.is_empty() {
            return Ok(());
        }
        let keys: Vec<DedupeKey> = reservation.ours.iter().map(|&(_, k)| k).collect();
        match shared.claim(&keys).await {
            Ok(claims) => {
                let now = self.clock.unix_secs();
                let mut kept = Vec::with_capacity(claims.len());
                for (&(index, key), claim) in reservation.ours.iter().zip(claims) {
                    match claim {
                        SharedClaim::Ours => kept.push((index, key)),
                        SharedClaim::Committed => {
                            // Remember it locally (replacing our claim), so the next
                            // retry needs no round trip.
                            self.table.insert(key, now, now);
                            reservation.duplicate[index] = true;
                        }
                    }
                }
                reservation.ours = kept;
                reservation.shared_claimed = true;
                Ok(())
            }
            Err(SharedError::StillPending) => Err(DedupeError::Unavailable(
                "another instance is still storing some of these messageIds".into(),
            )),
            Err(SharedError::Redis(e)) => {
                self.shared_errors.fetch_add(1, Ordering::Relaxed);
                if self.fail_closed {
                    return Err(DedupeError::Unavailable(format!("redis: {e}")));
                }
                self.log_shared_error(&e);
                Ok(())
            }
        }
    }

    fn log_shared_error(&self, e: &dyn std::fmt::Display) {
        if self.shared_error_log.ready() {
            tracing::warn!(
                error = %e,
                errors = self.shared_errors.load(Ordering::Relaxed),
                "redis unreachable: deduping locally only (dedupe.on_redis_error = fail_open)"
            );
        }
    }
}

/// One request's claim on its keys, from `reserve` to `commit` (or drop).
pub struct Reservation {
    dedupe: Arc<Dedupe>,
    duplicate: Vec<bool>,
    /// (message index, key) of the keys this request claimed.
    ours: Vec<(usize, DedupeKey)>,
    /// This request's id in the table's pending slots, when it has keys.
    holder: Option<u32>,
    /// The keys are claimed in Redis too.
    shared_claimed: bool,
    /// Dropped with the reservation: wakes requests waiting on our keys.
    _signal: watch::Sender<()>,
    committed: bool,
}

impl Reservation {
    pub fn is_duplicate(&self, index: usize) -> bool {
        self.duplicate[index]
    }

    pub fn duplicates(&self) -> usize {
        self.duplicate.iter().filter(|&&d| d).count()
    }

    /// The request's messages are durable: their keys enter the window.
    pub async fn commit(mut self) {
        let now = self.dedupe.clock.unix_secs();
        for &(_, key) in &self.ours {
            self.dedupe.table.insert(key, now, now);
        }
        if let (true, Some(shared)) = (self.shared_claimed, &self.dedupe.shared) {
            let keys: Vec<DedupeKey> = self.ours.iter().map(|&(_, k)| k).collect();
            if let Err(e) = shared.commit(&keys).await {
                // The messages are stored; their pending marks lapse, so a retry reaching
                // another instance after that may be accepted again.
                self.dedupe.shared_errors.fetch_add(1, Ordering::Relaxed);
                self.dedupe.log_shared_error(&e);
            }
        }
        self.committed = true;
        self.release_locally();
        self.dedupe.report_evictions();
    }

    /// Gives back uncommitted claims and stops being waited on.
    fn release_locally(&mut self) {
        let Some(holder) = self.holder else { return };
        if !self.committed {
            for (_, key) in &self.ours {
                self.dedupe.table.unclaim(key, holder);
            }
        }
        self.dedupe
            .holders
            .lock()
            .expect("holders poisoned")
            .waiting_on
            .remove(&holder);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.release_locally();
        if let (true, Some(shared)) = (self.shared_claimed, self.dedupe.shared.clone()) {
            let keys: Vec<DedupeKey> = self.ours.iter().map(|&(_, k)| k).collect();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { shared.release(&keys).await });
            }
        }
    }
}
