//! Which instances are live, through NATS itself: a KV bucket `fanout-members-<stream>`
//! where each delivering instance keeps a key (its id) holding the destinations it reads,
//! put again every `queue.member_heartbeat`. The bucket's `max_age` is
//! `queue.member_ttl`, and each instance also forgets a key not put again within it, so
//! a crashed instance drops out after the TTL; a clean stop deletes its key at once.
//!
//! Every instance watches the bucket and so sees the same members; `owners` then splits
//! each destination's partitions over them the same way everywhere (`feed.rs` has the
//! hand-over).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;

use super::startup::retried;
use crate::throttle::LogThrottle;

/// Silence after which the bucket's history is taken to be read (an empty bucket sends none).
const HISTORY_QUIET: Duration = Duration::from_millis(300);

/// How often and how long an instance counts as live without news of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub heartbeat: Duration,
    pub ttl: Duration,
}

/// The live instances, as this one sees them: each one's id and the destinations it reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// This instance's id.
    pub(super) own: String,
    pub(super) reading: BTreeMap<String, BTreeSet<String>>,
}

impl Members {
    /// The members reading `destination`, in id order.
    fn of(&self, destination: &str) -> Vec<&str> {
        self.reading
            .iter()
            .filter(|(_, destinations)| destinations.contains(destination))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Whether this instance delivers `destination`'s consumer `index` (partitions
    /// `0..partitions`, then the replays).
    pub(super) fn owns(&self, destination: &str, partitions: u16, index: u16) -> bool {
        let members = self.of(destination);
        let owners = owners(&members, destination, partitions);
        owners
            .get(usize::from(index))
            .is_some_and(|&owner| members[owner] == self.own)
    }
}

/// This instance's membership: its id, the live members it sees, and the destinations
/// it reads (put in its key). Dropping it leaves (deletes the key).
pub struct Membership {
    id: String,
    store: kv::Store,
    members: watch::Receiver<Members>,
    live: watch::Receiver<usize>,
    reading: watch::Sender<BTreeSet<String>>,
}

impl Membership {
    /// Opens (or makes) the bucket and starts the heartbeat and the watch.
    pub(super) async fn join(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        timing: Timing,
    ) -> anyhow::Result<Membership> {
        let bucket = format!("fanout-members-{stream}");
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "fanout: live instances and the destinations they read".into(),
            history: 1,
            max_age: timing.ttl,
            // Heartbeats need no disk: a lost bucket is made again and refilled within a
            // heartbeat.
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: replicas,
            ..Default::default()
        };
        let store = retried("making the membership bucket", || open_bucket(js, &config)).await?;
        let id = format!(
            "{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..12)
                .unwrap_or("0")
        );
        let (reading, reading_rx) = watch::channel(BTreeSet::new());
        let (members_tx, members) = watch::channel(Members {
            own: id.clone(),
            reading: BTreeMap::new(),
        });
        let (live_tx, live) = watch::channel(1);
        let mut keeper = Keeper {
            js: js.clone(),
            config,
            store: store.clone(),
            id: id.clone(),
            timing,
            reading: reading_rx,
            members: members_tx,
            live: live_tx,
            seen: HashMap::new(),
            errors: LogThrottle::new(Duration::from_secs(30)),
        };
        // The members already there first, so that this instance does not take every
        // partition for a moment, believing itself alone.
        let mut history = retried("watching the membership bucket", || async {
            Ok(keeper.store.watch_with_history(">").await?)
        })
        .await?;
        while let Ok(Some(Ok(entry))) = tokio::time::timeout(HISTORY_QUIET, history.next()).await {
            let current = entry.seen_current;
            keeper.note(entry);
            if current {
                break;
            }
        }
        keeper.publish();
        tokio::spawn(keeper.run(history));
        tracing::info!(instance = %id, bucket, "joined the instances sharing the stream");
        Ok(Membership {
            id,
            store,
            members,
            live,
            reading,
        })
    }

    /// This instance's id in the bucket.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live instances sharing the stream, this one included (at least 1).
    pub fn live_count(&self) -> usize {
        *self.live.borrow()
    }

    /// The live-instance count, updated as instances join and leave.
    pub fn watch_live_count(&self) -> watch::Receiver<usize> {
        self.live.clone()
    }

    /// The live members, updated as they change (for the partition owners).
    pub(super) fn members(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// Says this instance reads `destination` (it gets a share of its partitions).
    pub(super) fn reads(&self, destination: &str) {
        self.reading
            .send_if_modified(|set| set.insert(destination.to_string()));
    }

    /// Says this instance stopped reading `destination`, and puts that at once (a clean
    /// stop: the others take its share now, before the process exits).
    pub(super) async fn stops_reading(&self, destination: &str) {
        if !self.reading.send_if_modified(|set| set.remove(destination)) {
            return;
        }
        let reading = self.reading.borrow().clone();
        if let Err(e) = put(&self.store, &self.id, &reading).await {
            tracing::warn!(error = %e, "cannot update this instance's membership key");
        }
    }
}

/// The task behind a `Membership`: puts its key, watches the bucket, forgets the silent.
struct Keeper {
    js: jetstream::Context,
    /// What the bucket is made with, to make it again if it goes (a restarted server
    /// loses memory streams).
    config: kv::Config,
    store: kv::Store,
    id: String,
    timing: Timing,
    reading: watch::Receiver<BTreeSet<String>>,
    members: watch::Sender<Members>,
    live: watch::Sender<usize>,
    /// Other instances' keys: when last put (seen here), and what they read.
    seen: HashMap<String, (Instant, BTreeSet<String>)>,
    errors: LogThrottle,
}

impl Keeper {
    async fn run(mut self, watch: kv::Watch) {
        let mut watch = Some(watch);
        let mut next_beat = Instant::now();
        // When this instance's own put came back through the watch: a watch that stops
        // bringing it is stale and is opened again.
        let mut own_echo = Instant::now();
        loop {
            if watch.is_none() {
                match self.store.watch_with_history(">").await {
                    Ok(w) => {
                        watch = Some(w);
                        own_echo = Instant::now();
                    }
                    Err(e) => self.warn("cannot watch the membership bucket; retrying", &e),
                }
            }
            if Instant::now() >= next_beat {
                if self.beat().await {
                    watch = None;
                }
                next_beat = Instant::now() + self.timing.heartbeat;
            }
            self.publish();
            let expiry = self
                .seen
                .values()
                .map(|(at, _)| *at + self.timing.ttl)
                .min()
                .unwrap_or(next_beat);
            tokio::select! {
                _ = tokio::time::sleep_until(next_beat.min(expiry)) => {}
                changed = self.reading.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    next_beat = Instant::now();
                }
                entry = next_entry(&mut watch) => match entry {
                    Some(entry) => {
                        if entry.key == self.id {
                            own_echo = Instant::now();
                        } else {
                            self.note(entry);
                        }
                    }
                    None => {
                        watch = None;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
            let putting = !self.reading.borrow().is_empty();
            if putting && own_echo.elapsed() > self.timing.ttl {
                self.warn(
                    "the membership watch went quiet; opening it again",
                    &"stale",
                );
                watch = None;
            }
        }
        // The `Membership` is gone: leave at once, so the others take over now.
        if let Err(e) = self.store.delete(&self.id).await {
            tracing::debug!(error = %e, "cannot delete this instance's membership key");
        }
    }

    /// Puts this instance's key.
    /// Puts this instance's key; if that fails, makes the bucket again (if it went).
    /// True when the bucket was made again (its watch must be opened again).
    async fn beat(&mut self) -> bool {
        let reading = self.reading.borrow_and_update().clone();
        let Err(e) = put(&self.store, &self.id, &reading).await else {
            return false;
        };
        self.warn("cannot put this instance's membership key", &e);
        match open_bucket(&self.js, &self.config).await {
            Ok(store) => {
                self.store = store;
                put(&self.store, &self.id, &reading).await.is_ok()
            }
            Err(_) => false,
        }
    }

    /// Another instance's key changed.
    fn note(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => {
                let reading = serde_json::from_slice::<serde_json::Value>(&entry.value)
                    .ok()
                    .and_then(|v| serde_json::from_value(v["destinations"].clone()).ok())
                    .unwrap_or_default();
                self.seen.insert(entry.key, (Instant::now(), reading));
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.seen.remove(&entry.key);
            }
        }
    }

    /// Forgets instances silent past the TTL, and passes the members on if they changed.
    fn publish(&mut self) {
        let ttl = self.timing.ttl;
        self.seen.retain(|_, (at, _)| at.elapsed() <= ttl);
        let mut reading: BTreeMap<String, BTreeSet<String>> = self
            .seen
            .iter()
            .map(|(id, (_, destinations))| (id.clone(), destinations.clone()))
            .collect();
        let own = self.reading.borrow().clone();
        if !own.is_empty() {
            reading.insert(self.id.clone(), own);
        }
        let live = 1 + self.seen.len();
        self.live
            .send_if_modified(|count| std::mem::replace(count, live) != live);
        self.members.send_if_modified(|members| {
            let changed = members.reading != reading;
            members.reading = reading;
            changed
        });
    }

    fn warn(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.errors.ready() {
            tracing::warn!(error = %e, "{what}");
        }
    }
}

/// Opens the membership bucket, making it if missing.
async fn open_bucket(js: &jetstream::Context, config: &kv::Config) -> anyhow::Result<kv::Store> {
    js.create_or_update_key_value(config.clone())
        .await
        .with_context(|| format!("cannot open the membership bucket `{}`", config.bucket))
}

/// Puts an instance's key with what it reads; deletes it while it reads nothing.
async fn put(store: &kv::Store, id: &str, reading: &BTreeSet<String>) -> Result<(), String> {
    if reading.is_empty() {
        return store.delete(id).await.map_err(|e| e.to_string());
    }
    let value = serde_json::json!({ "destinations": reading }).to_string();
    store
        .put(id, value.into())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The next change in the bucket; `None` when the watch ended or failed (or is not open).
async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<kv::Entry> {
    match watch {
        Some(w) => w.next().await?.ok(),
        None => None,
    }
}

/// Which of `members` delivers each of a destination's consumers: its `partitions`, then
/// its replays. Rendezvous hashing with a bound: partition by partition, the member
/// ranked highest for it that holds fewer than ⌈partitions / members⌉ takes it. The same
/// members give the same owners on every instance, and a member joining or leaving moves
/// few partitions besides its own share.
pub(super) fn owners(members: &[&str], destination: &str, partitions: u16) -> Vec<usize> {
    if members.is_empty() {
        return Vec::new();
    }
    let cap = usize::from(partitions).div_ceil(members.len());
    let mut load = vec![0usize; members.len()];
    let mut owners = Vec::with_capacity(usize::from(partitions) + 1);
    for index in 0..=partitions {
        let mut ranked: Vec<usize> = (0..members.len()).collect();
        ranked.sort_by_key(|&m| std::cmp::Reverse(score(members[m], destination, index)));
        // The replays are not a partition: the top-ranked member takes them, whatever it holds.
        let owner = if index == partitions {
            ranked[0]
        } else {
            ranked
                .into_iter()
                .find(|&m| load[m] < cap)
                .expect("the caps add up to at least the partitions")
        };
        if index < partitions {
            load[owner] += 1;
        }
        owners.push(owner);
    }
    owners
}

/// A member's rank for a consumer: a hash that is the same on every instance and build.
fn score(member: &str, destination: &str, index: u16) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(member.as_bytes());
    hasher.update(&[0]);
    hasher.update(destination.as_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(members: &[&str], partitions: u16) -> Vec<usize> {
        let mut held = vec![0; members.len()];
        for owner in &owners(members, "hook", partitions)[..usize::from(partitions)] {
            held[*owner] += 1;
        }
        held
    }

    #[test]
    fn each_member_holds_at_most_its_rounded_up_share() {
        for n in 1..=7 {
            let names: Vec<String> = (0..n).map(|i| format!("instance-{i}")).collect();
            let members: Vec<&str> = names.iter().map(String::as_str).collect();
            for partitions in [1u16, 4, 8, 32, 64] {
                let held = shares(&members, partitions);
                let cap = usize::from(partitions).div_ceil(n);
                assert!(
                    held.iter().all(|&h| h <= cap),
                    "{n} members, {partitions}: {held:?}"
                );
                assert_eq!(held.iter().sum::<usize>(), usize::from(partitions));
            }
        }
    }

    #[test]
    fn a_member_joining_takes_a_share_and_moves_little_else() {
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        let before = owners(&three, "hook", 32);
        let after = owners(&four, "hook", 32);
        let d_holds = after[..32].iter().filter(|&&o| o == 3).count();
        assert_eq!(d_holds, 8);
        // Partitions that neither went to `d` nor had to move for the cap stay put.
        let moved_between_old = (0..32)
            .filter(|&k| after[k] != 3 && after[k] != before[k])
            .count();
        assert!(
            moved_between_old <= 8,
            "{moved_between_old} moved among a, b, c"
        );
    }

    #[test]
    fn owners_follow_the_members_not_their_order_and_split_by_destination() {
        let members = Members {
            own: "b".into(),
            reading: BTreeMap::from([
                ("a".to_string(), BTreeSet::from(["hook".to_string()])),
                (
                    "b".to_string(),
                    BTreeSet::from(["hook".to_string(), "file".to_string()]),
                ),
            ]),
        };
        // `file` is read by `b` alone: all of it is `b`'s.
        assert!((0..=8).all(|k| members.owns("file", 8, k)));
        let b_hook = (0..8).filter(|&k| members.owns("hook", 8, k)).count();
        assert_eq!(b_hook, 4);
        assert_eq!(
            owners(&["a", "b"], "hook", 8),
            owners(&["a", "b"], "hook", 8)
        );
        assert!(!members.owns("other", 8, 0), "nobody reads it");
    }
}
