//! The durable consumers fanout made on the stream and still reads, remembered with
//! their configs so that one found missing (a wiped server store, a consumer deleted by
//! hand) is made again while fanout runs (`recover.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PriorityPolicy};

use super::{Names, StreamSettings, DESTINATION_KEY, GROUP};

/// Unacknowledged messages one consumer may have out; past it the server waits.
const MAX_ACK_PENDING: i64 = 20_000;

/// The config of a destination's consumer `index` (its partitions, then its replays).
pub(super) fn destination_config(
    names: &Names,
    settings: &StreamSettings,
    destination: &str,
    index: u16,
) -> pull::Config {
    pull::Config {
        durable_name: Some(names.consumer(destination, index)),
        description: Some(format!("fanout destination `{destination}`")),
        filter_subject: names.filter(destination, index),
        // Only what is accepted from now on, like a new destination's cursor.
        deliver_policy: DeliverPolicy::New,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: -1,
        max_ack_pending: MAX_ACK_PENDING,
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_string()],
        priority_timeout: super::pull::priority_timeout(settings.ack_wait),
        metadata: HashMap::from([(DESTINATION_KEY.to_string(), destination.to_string())]),
        ..Default::default()
    }
}

/// The registration of consumers kept for the queue's life (no guard drops them).
const KEPT: u64 = u64::MAX;

/// Consumers in use, by name: which registration holds each, and its config.
#[derive(Default)]
pub(super) struct Registry {
    made: Mutex<BTreeMap<String, (u64, pull::Config)>>,
    next: AtomicU64,
}

impl Registry {
    /// Remembers consumers until the returned guard goes (a feed's).
    pub(super) fn register(self: &Arc<Self>, configs: Vec<pull::Config>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut made = self.made.lock().expect("registry poisoned");
        let mut names = Vec::new();
        for config in configs {
            let name = config.durable_name.clone().unwrap_or_default();
            names.push(name.clone());
            made.insert(name, (id, config));
        }
        Registration {
            registry: Arc::clone(self),
            id,
            names,
        }
    }

    /// Remembers a consumer for as long as the queue lives (the retention consumer).
    pub(super) fn keep(&self, config: pull::Config) {
        let name = config.durable_name.clone().unwrap_or_default();
        let mut made = self.made.lock().expect("registry poisoned");
        made.insert(name, (KEPT, config));
    }

    /// The consumers that should exist, with their configs.
    pub(super) fn wanted(&self) -> Vec<(String, pull::Config)> {
        let made = self.made.lock().expect("registry poisoned");
        made.iter()
            .map(|(name, (_, config))| (name.clone(), config.clone()))
            .collect()
    }
}

/// Keeps a feed's consumers registered while it reads them.
pub(super) struct Registration {
    registry: Arc<Registry>,
    id: u64,
    names: Vec<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut made = self.registry.made.lock().expect("registry poisoned");
        for name in &self.names {
            // A newer feed of the same destination may have registered the name since.
            if made.get(name).is_some_and(|(id, _)| *id == self.id) {
                made.remove(name);
            }
        }
    }
}
