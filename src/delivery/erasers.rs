//! The running destinations by name, for what is asked of them beside delivery: privacy
//! deletions (`Destination::erase`, called by the regulations runner) go to the same
//! destination, client and credentials as its deliveries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::context::DeliveryContext;
use crate::destinations::{EraseError, Erasure, Subject};

/// Shared by `Deliveries` (which adds and drops destinations as they start and stop)
/// and the regulations runner. Cheap to clone.
#[derive(Clone, Default)]
pub struct Erasers(Arc<Mutex<BTreeMap<String, Arc<DeliveryContext>>>>);

impl Erasers {
    /// The running destinations' names.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("erasers lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Asks destination `name` to delete what it holds or sent of `subject`; `None` when
    /// it does not run here.
    pub async fn erase(
        &self,
        name: &str,
        subject: &Subject,
    ) -> Option<Result<Erasure, EraseError>> {
        let context = self
            .0
            .lock()
            .expect("erasers lock poisoned")
            .get(name)
            .cloned()?;
        Some(context.destination.erase(subject).await)
    }

    pub(super) fn insert(&self, context: Arc<DeliveryContext>) {
        let mut running = self.0.lock().expect("erasers lock poisoned");
        running.insert(context.name.clone(), context);
    }

    pub(super) fn remove(&self, name: &str) {
        self.0.lock().expect("erasers lock poisoned").remove(name);
    }
}
