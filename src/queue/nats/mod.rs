//! The shared backend: a JetStream stream that every instance pointed at the same servers
//! and stream appends to and delivers from (`[queue] backend = "nats"`).
//!
//! - Each message goes to `<stream>.p.<k>`, its partition `k` picked by its user key. A
//!   request's messages for one partition are published together as one stream message
//!   (a pack), with a digest of their dedupe keys as `Nats-Msg-Id`; a request is answered
//!   only once every pack has its publish acknowledgement (for R3, a quorum's).
//! - Each destination reads each partition through a durable pull consumer shared by all
//!   instances, with the `pinned_client` priority policy: one instance at a time
//!   delivers a partition, so a user's messages keep their order across instances. The
//!   live instances (`members.rs`) share each destination's partitions out, and each
//!   pulls only its own.
//! - The stream's retention is `interest`: a message goes once every destination's
//!   consumer has acknowledged it. Replayed dead letters come back on `<stream>.r.<dest>`.
//! - A stream or consumer that goes missing (a wiped server store) is made again while
//!   fanout runs, and what was lost with it is logged (`recover.rs`).
//!
//! Payloads are the local log's framed records (`record.rs`): one format for both.

mod acks;
mod consumers;
mod delivery;
mod feed;
mod keepalive;
mod lag;
mod members;
mod publish;
mod pull;
mod recover;
mod retention;
mod startup;
mod unconfirmed;
mod version;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::connection::State;
use async_nats::jetstream::{self, stream};
use async_nats::Subject;
use futures_util::TryStreamExt;

pub use acks::{Acks, Handback};
pub use delivery::{Delivery, DeliveryKey};
pub use feed::StreamFeed;
pub use members::Membership;
pub use pull::{ATTEMPTS_HEADER, FIRST_ATTEMPT_HEADER};
pub use retention::ReplayError;
/// For the other buckets made at start (regulations, limits): tried again like the queue's.
pub use startup::retried as retried_at_start;

use super::failing::Failing;
use super::QueueConfig;

/// The priority group every fanout instance pulls in.
const GROUP: &str = "fanout";
/// Consumer metadata naming the destination a consumer belongs to.
const DESTINATION_KEY: &str = "fanout.destination";
/// Stream metadata recording its partition count, which cannot change under it.
const PARTITIONS_KEY: &str = "fanout.partitions";

/// Handle on the shared log. Cheap to clone.
#[derive(Clone)]
pub struct NatsQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    /// What the stream is made with, to make it again if it goes missing.
    wanted: stream::Config,
    /// Durable consumers in use here, made again if they go missing.
    consumers: Arc<consumers::Registry>,
    /// What the dead-letter stream is made with, once opened here: made again too.
    dead_letters: Mutex<Option<stream::Config>>,
    /// The stream's incarnation: counts the times it was found made again.
    epoch: AtomicU32,
    /// The highest sequence the stream is known to have reached.
    last_sequence: AtomicU64,
    seen: Mutex<recover::Seen>,
    recovery_log: crate::throttle::LogThrottle,
    /// Held (to write) while the stream and its consumers are made again; publishes are
    /// sent under a read guard.
    remaking: tokio::sync::RwLock<()>,
    /// Where what was seen of the stream is kept across restarts (`keep_record`), and
    /// what was written there last.
    record: std::sync::OnceLock<std::path::PathBuf>,
    record_written: Mutex<Option<recover::Saved>>,
    /// Packs published without an acknowledgement, kept to keep their retry single.
    unconfirmed: unconfirmed::Unconfirmed,
    names: Names,
    settings: StreamSettings,
    /// Why publishing fails now (a full stream, no quorum), until a publish or the
    /// probe succeeds.
    failing: Failing,
    /// This instance among the others on the stream, joined when it first delivers.
    membership: tokio::sync::OnceCell<Membership>,
    /// Bytes the stream holds, as last seen.
    held_bytes: AtomicU64,
    /// Size of the last request refused for a full stream (0: none since a success).
    refused_bytes: AtomicU64,
}

/// Every name fanout uses on the server, derived from the stream's.
#[derive(Debug, Clone)]
pub struct Names {
    pub stream: String,
    partitions: Vec<Subject>,
}

impl Names {
    fn new(stream: &str, partitions: u16) -> Names {
        Names {
            stream: stream.to_string(),
            partitions: (0..partitions)
                .map(|k| Subject::from(format!("{stream}.p.{k}")))
                .collect(),
        }
    }

    fn subjects(&self) -> Vec<String> {
        vec![
            format!("{}.p.*", self.stream),
            format!("{}.r.*", self.stream),
        ]
    }

    /// Where dead letters of `destination` are sent again.
    pub fn replay_subject(&self, destination: &str) -> String {
        format!("{}.r.{destination}", self.stream)
    }

    /// The consumer of one of a destination's subjects: its partitions, then replays.
    fn consumer(&self, destination: &str, index: u16) -> String {
        if usize::from(index) < self.partitions.len() {
            format!("{destination}_p{index}")
        } else {
            format!("{destination}_replay")
        }
    }

    /// The subject consumer `index` of a destination reads.
    fn filter(&self, destination: &str, index: u16) -> String {
        match self.partitions.get(usize::from(index)) {
            Some(subject) => subject.to_string(),
            None => self.replay_subject(destination),
        }
    }
}

/// What the stream and its consumers are made with.
#[derive(Debug, Clone)]
struct StreamSettings {
    partitions: u16,
    ack_wait: Duration,
    max_bytes: u64,
    replicas: usize,
    members: members::Timing,
}

impl NatsQueue {
    /// Connects, and creates the stream or checks the one there. Fails with a clear error
    /// when no server answers: a fanout that cannot store must not start.
    pub async fn connect(config: &QueueConfig, max_bytes: u64) -> anyhow::Result<NatsQueue> {
        let servers = config.servers.join(", ");
        let client = connect_options(config)?
            .connect(config.servers.as_slice())
            .await
            .with_context(|| format!("cannot connect to NATS at {servers} (queue.servers)"))?;
        version::check(&client.server_info().version)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .max_ack_inflight(65_536)
            .build(client.clone());
        // A cluster just started may take a moment to answer: only a timeout is retried.
        startup::retried("asking for the JetStream account", || async {
            js.query_account().await.map(drop).map_err(|e| {
                let timed_out = e.kind() == jetstream::context::AccountErrorKind::TimedOut;
                let error = anyhow::anyhow!(
                    "NATS at {servers} answers, but JetStream is not available to this account: {e}"
                );
                if timed_out {
                    error
                } else {
                    startup::Refused(format!("{error:#}")).into()
                }
            })
        })
        .await?;
        let (stream, partitions) = startup::retried("opening the stream", || {
            ensure_stream(&js, config, max_bytes)
        })
        .await?;
        let names = Names::new(&config.stream, partitions);
        let info = stream.cached_info();
        let seen = recover::Seen {
            created: info.created,
            messages: info.state.messages,
        };
        let last_sequence = AtomicU64::new(info.state.last_sequence);
        tracing::info!(
            servers,
            stream = %names.stream,
            replicas = config.replicas,
            partitions,
            "queue on NATS JetStream"
        );
        let inner = Arc::new(Inner {
            client,
            js,
            stream,
            wanted: stream_config(&names, config, max_bytes),
            membership: tokio::sync::OnceCell::new(),
            consumers: Arc::default(),
            dead_letters: Mutex::new(None),
            epoch: AtomicU32::new(0),
            last_sequence,
            seen: Mutex::new(seen),
            recovery_log: crate::throttle::LogThrottle::new(Duration::from_secs(30)),
            remaking: tokio::sync::RwLock::new(()),
            record: std::sync::OnceLock::new(),
            record_written: Mutex::new(None),
            unconfirmed: unconfirmed::Unconfirmed::new(config.duplicate_window),
            names,
            settings: StreamSettings {
                partitions,
                ack_wait: config.ack_wait,
                max_bytes,
                replicas: config.replicas,
                members: members::Timing {
                    heartbeat: config.member_heartbeat,
                    ttl: config.member_ttl,
                },
            },
            failing: Failing::new(
                "publishing to NATS fails; ingest answers 503 and /ready 503 until it works",
                "publishing to NATS works again; /ready answers 200",
            ),
            held_bytes: AtomicU64::new(0),
            refused_bytes: AtomicU64::new(0),
        });
        tokio::spawn(recover::watch_stream(Arc::downgrade(&inner)));
        Ok(NatsQueue { inner })
    }

    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The stream's incarnation, which tells its messages from an earlier stream's.
    fn epoch(&self) -> u32 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    pub fn replicas(&self) -> usize {
        self.inner.stream.cached_info().config.num_replicas
    }

    /// Whether ingest can store now (for `/ready`): connected, and publishing works.
    pub fn readiness(&self) -> Result<(), String> {
        if self.inner.client.connection_state() != State::Connected {
            return Err("not connected to NATS (queue.servers)".into());
        }
        match self.inner.failing.why() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Bytes the stream holds, as last seen (refreshed every few seconds).
    pub fn held_bytes(&self) -> u64 {
        self.inner.held_bytes.load(Ordering::Relaxed)
    }

    /// This instance's membership among those sharing the stream (joined on first use):
    /// how many are live, for what is split between them.
    pub async fn membership(&self) -> anyhow::Result<&Membership> {
        let inner = &self.inner;
        inner
            .membership
            .get_or_try_init(|| {
                Membership::join(
                    &inner.js,
                    &inner.names.stream,
                    inner.settings.replicas,
                    inner.settings.members,
                )
            })
            .await
    }

    /// Attaches a destination: its consumers (made if missing), read into one feed that
    /// delivers this instance's share of its partitions.
    pub async fn subscribe(&self, destination: &str) -> anyhow::Result<(StreamFeed, Acks)> {
        let feed = StreamFeed::open(self.clone(), destination).await?;
        let acks = Acks::new(self.inner.client.clone(), feed.in_flight());
        Ok((feed, acks))
    }

    /// Opens the dead-letter stream `config` describes, creating it if missing (and
    /// bringing its limits in line if it exists); the stream watcher makes it again
    /// should it go missing while fanout runs.
    pub async fn open_dead_letter_stream(
        &self,
        config: stream::Config,
    ) -> anyhow::Result<stream::Stream> {
        let name = config.name.clone();
        let context = || format!("cannot open the dead-letter stream `{name}`");
        let js = &self.inner.js;
        let stream = startup::retried("opening the dead-letter stream", || async {
            js.create_or_update_stream(config.clone())
                .await
                .with_context(context)?;
            js.get_stream(&name).await.with_context(context)
        })
        .await?;
        *self.inner.dead_letters.lock().expect("poisoned") = Some(config);
        Ok(stream)
    }

    /// The consumer that reads a destination's replayed dead letters.
    pub fn replay_consumer(&self, destination: &str) -> String {
        self.inner
            .names
            .consumer(destination, self.inner.settings.partitions)
    }

    pub async fn has_consumer(&self, name: &str) -> anyhow::Result<bool> {
        match self.inner.stream.consumer_info(name).await {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("consumer not found") => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot read consumer `{name}`")),
        }
    }

    /// Destinations with consumers on the stream, configured here or not.
    pub async fn destinations(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .consumers()
            .await?
            .into_keys()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    /// Deletes a removed destination's consumers; the stream then lets go of what only
    /// they held.
    pub async fn purge(&self, destination: &str) -> anyhow::Result<()> {
        let consumers = self.consumers().await?;
        for name in consumers.get(destination).into_iter().flatten() {
            self.inner
                .stream
                .delete_consumer(name)
                .await
                .with_context(|| format!("cannot delete consumer `{name}`"))?;
        }
        Ok(())
    }

    /// The stream's consumers that fanout made, by destination.
    async fn consumers(&self) -> anyhow::Result<HashMap<String, Vec<String>>> {
        let mut by_destination: HashMap<String, Vec<String>> = HashMap::new();
        let mut infos = self.inner.stream.consumers();
        while let Some(info) = infos
            .try_next()
            .await
            .context("cannot list the stream's consumers")?
        {
            if let Some(destination) = info.config.metadata.get(DESTINATION_KEY) {
                by_destination
                    .entry(destination.clone())
                    .or_default()
                    .push(info.name.clone());
            }
        }
        Ok(by_destination)
    }
}

/// Connection options from the config; secrets from the environment.
fn connect_options(config: &QueueConfig) -> anyhow::Result<async_nats::ConnectOptions> {
    let env = |key: &str, var: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| anyhow::anyhow!("queue.{key} names `{var}`, which is not set"))
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("fanout {}", std::process::id()))
        .connection_timeout(Duration::from_secs(5))
        // Keep reconnecting however long the servers are gone: ingest answers 503 meanwhile.
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; ingest answers 503 and delivery waits until it is back")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::debug!(event = %other, "NATS client event"),
            }
        });
    if let Some(var) = &config.token_env {
        options = options.token(env("token_env", var)?);
    }
    if let (Some(user), Some(password)) = (&config.user_env, &config.password_env) {
        options = options.user_and_password(env("user_env", user)?, env("password_env", password)?);
    }
    if let Some(var) = &config.credentials_env {
        let path = env("credentials_env", var)?;
        let creds = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read the NATS credentials file {path} (queue.credentials_env)")
        })?;
        options = options
            .credentials(&creds)
            .with_context(|| format!("{path} is not a NATS credentials file"))?;
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    Ok(options)
}

/// The stream as fanout needs it.
fn stream_config(names: &Names, config: &QueueConfig, max_bytes: u64) -> stream::Config {
    stream::Config {
        name: names.stream.clone(),
        description: Some("fanout's shared log".into()),
        subjects: names.subjects(),
        // A message stays until every destination's consumer has it.
        retention: stream::RetentionPolicy::Interest,
        // Full means 503 for new messages, never dropping accepted ones.
        discard: stream::DiscardPolicy::New,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        metadata: HashMap::from([(
            PARTITIONS_KEY.to_string(),
            names.partitions.len().to_string(),
        )]),
        ..Default::default()
    }
}

/// Creates the stream, or checks that the one there is fanout's with the partitions
/// asked for (and brings its limits and replicas in line with the config). Returns it
/// with its partition count: `queue.partitions`, or unset, an existing stream's own or
/// 32 for a new one. Safe to run again after any failure (another instance may be
/// making the stream at the same moment).
async fn ensure_stream(
    js: &jetstream::Context,
    config: &QueueConfig,
    max_bytes: u64,
) -> anyhow::Result<(stream::Stream, u16)> {
    let name = &config.stream;
    let mut stream = match js.get_stream(name).await {
        Ok(stream) => stream,
        Err(e) if is_not_found(&e) => {
            let partitions = config
                .partitions
                .unwrap_or(super::config::DEFAULT_PARTITIONS);
            let names = Names::new(name, partitions);
            let stream = js
                .create_stream(stream_config(&names, config, max_bytes))
                .await
                .with_context(|| format!("cannot create stream `{name}`"))?;
            tracing::info!(stream = %name, partitions, "created the stream");
            wait_for_leader(stream.clone()).await;
            return Ok((stream, partitions));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read stream `{name}`")),
    };
    let have = stream.cached_info().config.clone();
    let made_with = have.metadata.get(PARTITIONS_KEY);
    let partitions = match (
        made_with.and_then(|p| p.parse::<u16>().ok()),
        config.partitions,
    ) {
        (Some(have), Some(want)) if have == want => have,
        (Some(have), None) => have,
        (_, want) => {
            return Err(startup::Refused(format!(
                "stream `{name}` was made with {} partitions and queue.partitions is {}: the \
                 partitions of a stream cannot change (use a new queue.stream)",
                made_with.map_or("an unknown number of", String::as_str),
                want.map_or_else(|| "not set".to_string(), |p| p.to_string()),
            ))
            .into())
        }
    };
    let wanted = stream_config(&Names::new(name, partitions), config, max_bytes);
    let mut have_subjects = have.subjects.clone();
    have_subjects.sort();
    let mut want_subjects = wanted.subjects.clone();
    want_subjects.sort();
    if have_subjects != want_subjects || have.retention != stream::RetentionPolicy::Interest {
        return Err(startup::Refused(format!(
            "stream `{name}` exists but is not fanout's (subjects {:?}, retention {:?}; fanout \
             needs {want_subjects:?} with interest retention): choose another queue.stream",
            have.subjects, have.retention
        ))
        .into());
    }
    let differs = have.max_bytes != wanted.max_bytes
        || have.num_replicas != wanted.num_replicas
        || have.duplicate_window != wanted.duplicate_window
        || have.discard != wanted.discard;
    if differs {
        js.update_stream(&wanted)
            .await
            .with_context(|| format!("cannot update stream `{name}` to the config"))?;
        stream.info().await?;
        tracing::info!(stream = %name, replicas = config.replicas, max_bytes, "updated the stream's settings");
    }
    Ok((stream, partitions))
}

/// A new replicated stream takes a moment to elect its leader; publishes meanwhile fail.
/// Waits for it (up to a few seconds; ingest answers 503 until then anyway).
async fn wait_for_leader(mut stream: stream::Stream) {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        if let Ok(info) = stream.info().await {
            if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}
