//! What every batch of one destination shares while it is delivered: the destination,
//! its routing, insert function, retry policy, rate limit, send slots and `Retry-After`
//! gate. Read by the batch sender (`batch.rs`) and the insert-function step (`insert.rs`).

use std::sync::Mutex;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::retry::RetryPolicy;
use crate::clock::Clock;
use crate::destinations::{AnyDestination, RatePer};
use crate::pace::RateLimiter;
use crate::routing::Route;

/// What a destination's batches share.
pub struct DeliveryContext {
    pub name: String,
    /// Which messages this destination gets, and edits to them (the routing stage).
    pub route: Route,
    pub destination: AnyDestination,
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

    pub(super) fn hold_until(&self, until: Instant) {
        let mut gate = self.gate.lock().expect("gate lock poisoned");
        if gate.is_none_or(|g| g < until) {
            *gate = Some(until);
        }
    }
}
