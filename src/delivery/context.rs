//! What every batch of one destination shares while it is delivered: the destination,
//! its routing, insert function, retry policy, rate limit, send slots and `Retry-After`
//! gate. Read by the batch sender (`batch.rs`) and the insert-function step (`insert.rs`).

use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::retry::RetryPolicy;
use crate::clock::Clock;
use crate::destinations::{AnyDestination, RatePer};
use crate::identity::{Fill, Identity};
use crate::pace::RateLimiter;
use crate::routing::Route;
use crate::suppression::Suppression;

/// What a destination's batches share.
pub struct DeliveryContext {
    pub name: String,
    /// Which messages this destination gets, and edits to them (the routing stage).
    pub route: Route,
    /// With `enrich_identity`: the store, and which fields this destination lets it fill.
    pub identity: Option<(Arc<Identity>, Fill)>,
    pub destination: AnyDestination,
    /// Subjects under a privacy regulation: their messages are skipped.
    pub suppression: Suppression,
    /// Run on each message before the destination sees it (`insert_function`).
    pub insert: Option<crate::functions::Sandboxed>,
    pub policy: RetryPolicy,
    pub limiter: Option<(RateLimiter, RatePer)>,
    /// Batches sending at once.
    pub sends: Semaphore,
    /// No request before this instant (set from `Retry-After`): a destination that
    /// says it is overloaded is overloaded for every batch, not just the one told.
    pub gate: Mutex<Option<Instant>>,
    pub stop: watch::Receiver<bool>,
    /// Wall time, for when a batch was first tried and when it died.
    pub clock: Clock,
}

impl DeliveryContext {
    pub(super) fn gate(&self) -> Option<Instant> {
        *self.gate.lock().expect("gate lock poisoned")
    }

    /// Fills anonymous-only messages from the identity store, with `enrich_identity`.
    pub(super) async fn enrich<'a>(&self, messages: impl Iterator<Item = &'a mut Vec<u8>>) {
        if let Some((identity, fill)) = &self.identity {
            let mut messages: Vec<&mut Vec<u8>> = messages.collect();
            identity.enrich_all(&mut messages, *fill).await;
        }
    }

    pub(super) fn hold_until(&self, until: Instant) {
        let mut gate = self.gate.lock().expect("gate lock poisoned");
        if gate.is_none_or(|g| g < until) {
            *gate = Some(until);
        }
    }
}
