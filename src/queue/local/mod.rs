//! The local backend: an append-only segment log with group commit in `server.data_dir`.
//!
//! Requests hand their framed messages to one writer thread, which writes whatever has
//! arrived since its last sync and then fsyncs once for all of them: the disk decides the
//! pace, not a timer. A request is answered only after the sync that covers it. Each
//! destination reads the log from its own persisted cursor; segments behind every cursor
//! are deleted, on a thread of their own (`reclaim_loop`). Why a plain log and not an
//! embedded database: `bench/store-choice/`.

mod cursor;
mod reader;
mod segments;

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::thread;

use anyhow::Context;
use tokio::sync::{oneshot, watch};

pub use cursor::{Checkpoint, Cursor};
pub use reader::QueueReader;

use super::failing::Failing;
use super::record::{Body, RecordBatch};
use super::QueueError;
use crate::clock::Clock;
use crate::message::Tag;

/// Upper bound on the bytes one group commit writes, so one sync cannot grow without end.
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;

struct AppendRequest {
    bytes: Vec<u8>,
    done: oneshot::Sender<Result<(), QueueError>>,
}

/// State shared by the writer, the readers and the cursors.
struct Shared {
    queue_dir: PathBuf,
    cursor_dir: PathBuf,
    /// End of durable data; readers never read past it.
    committed: watch::Sender<u64>,
    /// Every known cursor's position, including destinations no longer configured:
    /// their data is kept until they are purged.
    cursors: Mutex<HashMap<String, u64>>,
    /// False after a write failed and could not be undone.
    healthy: AtomicBool,
    /// Why writes are failing now (a full disk, say), until one succeeds again: the
    /// writer probes the disk while this is set, so it clears without traffic too.
    failing: Failing,
    /// Size of the last append refused for the disk budget (0: none since a success).
    refused_bytes: AtomicU64,
    /// Base of the oldest retained segment: the log holds `committed - oldest` bytes.
    oldest: AtomicU64,
    /// Where the oldest segment ends (the next one's base; `u64::MAX` while there is
    /// one): until every cursor passes it there is nothing to delete, so a cursor save
    /// need not list the directory.
    oldest_end: AtomicU64,
    /// Disk budget; appends past it are refused.
    max_bytes: u64,
    /// `server.retention` in seconds: segments every cursor has passed are kept until
    /// their last write is this old (0: deleted at once).
    retention_secs: AtomicU64,
    /// When the newest deleted segment was last written (unix seconds; 0: none since
    /// start): messages accepted up to then may be gone, so a replay from before is refused.
    deleted_through: AtomicU64,
    /// What segments' ages are measured with, for `retention_secs`.
    clock: Clock,
    /// Sees the records of each segment before it is deleted (dedupe saves their keys).
    reclaim_hook: OnceLock<ReclaimHook>,
    /// Asks the reclaim thread for a pass; a full slot means one is pending already.
    reclaim_wanted: OnceLock<mpsc::SyncSender<()>>,
    /// Bounded replays waiting for their destination's next start: (until, stop_at).
    windows: Mutex<HashMap<String, (u32, u64)>>,
}

/// How often a failing disk is probed.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The probe writes what the last failed group needed, within these bounds.
const MIN_PROBE_BYTES: u64 = 64 * 1024;
const MAX_PROBE_BYTES: u64 = 1024 * 1024;

/// Called with a segment's (source, tag) pairs before the segment is deleted.
pub type ReclaimHook = Box<dyn Fn(&[(Arc<str>, Tag)]) -> std::io::Result<()> + Send + Sync>;

impl Shared {
    /// Writes, syncs and deletes a file of `bytes` next to the segments: whether an
    /// append of that size would find room. Clears the failing state when it does.
    fn probe(&self, bytes: u64) -> std::io::Result<()> {
        let path = self.queue_dir.join("write-probe");
        let result = (|| {
            let mut file = File::create(&path)?;
            std::io::Write::write_all(&mut file, &vec![0u8; bytes as usize])?;
            file.sync_data()
        })();
        let _ = fs::remove_file(&path);
        match &result {
            Ok(()) => self.failing.set(None),
            Err(e) => self
                .failing
                .set(Some(format!("{}: {e}", self.queue_dir.display()))),
        }
        result
    }

    /// `pause`: see `segments::scan_segment`.
    fn before_delete(
        &self,
        segment: &Path,
        pause: Option<std::time::Duration>,
    ) -> std::io::Result<()> {
        // Its last write is no earlier than its last record's acceptance.
        if let Ok(written) = fs::metadata(segment).and_then(|m| m.modified()) {
            let secs = written
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.deleted_through.fetch_max(secs, Ordering::Relaxed);
        }
        let Some(hook) = self.reclaim_hook.get() else {
            return Ok(());
        };
        hook(&segments::segment_tags(segment, pause)?)
    }

    /// Asks for a reclaim pass on the reclaim thread, without waiting for it.
    fn want_reclaim(&self) {
        if let Some(wanted) = self.reclaim_wanted.get() {
            // Full: a pass is pending, and it will see this cursor too.
            let _ = wanted.try_send(());
        }
    }
}

/// The pause after each MB of a segment scanned for its dedupe keys before the reclaim
/// thread deletes it: in one go, the 64 MB scan held the core answering requests for
/// several ms (BENCHMARKS.md, issue 19, third pass). Paced, it takes about 0.1 s.
pub(super) const SCAN_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Deletes what every cursor has passed, whenever a cursor save or a segment roll asks.
/// On its own thread so that a destination's delivery never waits for a segment's scan
/// and removal. Ends when the queue is dropped.
fn reclaim_loop(shared: Weak<Shared>, wants: mpsc::Receiver<()>) {
    let errors = crate::throttle::LogThrottle::new(std::time::Duration::from_secs(10));
    while wants.recv().is_ok() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = shared.reclaim() {
            if errors.ready() {
                tracing::warn!(
                    error = %e,
                    "cannot delete consumed queue segments; trying again at the next cursor save or roll"
                );
            }
        }
    }
}

/// Handle for appending to the log and attaching readers. Cheap to clone.
#[derive(Clone)]
pub struct LocalQueue {
    shared: Arc<Shared>,
    tx: mpsc::Sender<AppendRequest>,
}

/// The writer thread; join it after every `LocalQueue` handle is dropped to flush the last group.
pub struct QueueWriter {
    thread: thread::JoinHandle<()>,
}

impl QueueWriter {
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// The checkpoint a destination has saved in `data_dir`, read without opening the queue
/// (for inspection; a running fanout may move it at any time).
pub fn saved_checkpoint(data_dir: &Path, name: &str) -> std::io::Result<Option<Checkpoint>> {
    cursor::load(&data_dir.join("cursors"), name)
}

impl LocalQueue {
    /// Opens (or creates) the queue under `data_dir`, recovering from a crash if needed.
    /// Appends are refused once the retained log reaches `max_bytes`; retention is
    /// measured with `clock`.
    pub fn open(
        data_dir: &Path,
        segment_bytes: u64,
        max_bytes: u64,
        clock: Clock,
    ) -> anyhow::Result<(LocalQueue, QueueWriter)> {
        let named = |path: &Path| format!("cannot open the queue at {}", path.display());
        fs::create_dir_all(data_dir).with_context(|| named(data_dir))?;
        let lock_path = data_dir.join("LOCK");
        let lock = File::create(&lock_path).with_context(|| named(&lock_path))?;
        if lock.try_lock().is_err() {
            anyhow::bail!("{} is in use by another fanout process", data_dir.display());
        }
        let queue_dir = data_dir.join("queue");
        let cursor_dir = data_dir.join("cursors");
        fs::create_dir_all(&cursor_dir).with_context(|| named(&cursor_dir))?;
        let (active, recovered) = segments::ActiveSegment::open(&queue_dir, segment_bytes)
            .with_context(|| named(&queue_dir))?;
        if recovered.truncated > 0 {
            tracing::warn!(
                bytes = recovered.truncated,
                "cut a torn write off the queue tail (it was never acknowledged)"
            );
        }
        let cursors = cursor::load_all(&cursor_dir)?;
        tracing::info!(
            start = recovered.start,
            end = recovered.end,
            cursors = cursors.len(),
            "queue opened"
        );
        let shared = Arc::new(Shared {
            queue_dir,
            cursor_dir,
            committed: watch::Sender::new(recovered.end),
            cursors: Mutex::new(cursors),
            healthy: AtomicBool::new(true),
            failing: Failing::new(
                "queue writes fail; ingest answers 503 and /ready 503 until they succeed",
                "queue writes succeed again; /ready answers 200",
            ),
            refused_bytes: AtomicU64::new(0),
            oldest: AtomicU64::new(recovered.start),
            oldest_end: AtomicU64::new(recovered.oldest_end),
            max_bytes,
            retention_secs: AtomicU64::new(0),
            deleted_through: AtomicU64::new(0),
            clock,
            reclaim_hook: OnceLock::new(),
            reclaim_wanted: OnceLock::new(),
            windows: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let (wanted, wants) = mpsc::sync_channel(1);
        let _ = shared.reclaim_wanted.set(wanted);
        let reclaimer = Arc::downgrade(&shared);
        thread::Builder::new()
            .name("queue-reclaim".into())
            .spawn(move || reclaim_loop(reclaimer, wants))?;
        let thread = thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || write_loop(active, rx, writer_shared, lock))?;
        Ok((LocalQueue { shared, tx }, QueueWriter { thread }))
    }

    /// Keeps segments every destination has passed for `retention` after their last
    /// write (within the disk budget), so destinations can replay them.
    pub fn set_retention(&self, retention: std::time::Duration) {
        self.shared
            .retention_secs
            .store(retention.as_secs(), Ordering::Relaxed);
    }

    /// Appends a batch durably: returns once it is fsynced.
    pub async fn append(&self, batch: RecordBatch) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut held = self.held_bytes();
        let size = batch.bytes().len() as u64;
        if held + size > self.shared.max_bytes
            && self.shared.retention_secs.load(Ordering::Relaxed) > 0
        {
            // The budget wins over retention: give up the oldest retained segments.
            let shared = self.shared.clone();
            match tokio::task::spawn_blocking(move || shared.evict_retained(size)).await {
                Ok(Err(e)) => tracing::error!(error = %e, "cannot delete retained segments"),
                Err(e) => tracing::error!(error = %e, "retained-segment eviction failed"),
                Ok(Ok(_)) => {}
            }
            held = self.held_bytes();
        }
        if held + size > self.shared.max_bytes {
            self.shared
                .refused_bytes
                .store(batch.bytes().len() as u64, Ordering::Relaxed);
            return Err(QueueError::Full(format!(
                "{held} bytes held for destinations, budget {}; server.max_queue_bytes",
                self.shared.max_bytes
            )));
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(AppendRequest {
                bytes: batch.into_bytes(),
                done,
            })
            .map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Attaches a destination: its reader starts at its saved checkpoint (returned too),
    /// or at the current end of the log if it has none: a new destination gets what
    /// is accepted from now on. A new destination must save its first checkpoint at
    /// once (`Cursor::commit` at `QueueReader::position`), or a restart before its first
    /// delivery would start it at the end again, skipping what arrived in between.
    pub fn subscribe(
        &self,
        name: &str,
    ) -> anyhow::Result<(QueueReader, Cursor, Option<Checkpoint>)> {
        let saved = cursor::load(&self.shared.cursor_dir, name)?;
        let position = {
            let mut cursors = self.shared.cursors.lock().expect("cursor map poisoned");
            let position = saved.map_or_else(|| *self.shared.committed.borrow(), |c| c.position);
            cursors.insert(name.to_string(), position);
            position
        };
        let reader = QueueReader::new(
            self.shared.queue_dir.clone(),
            position,
            self.shared.committed.subscribe(),
        );
        let cursor = Cursor::new(name, self.shared.clone());
        Ok((reader, cursor, saved))
    }

    /// Where a replay of `name` since `since` (unix seconds) would start, and how many
    /// messages accepted up to `until` it would deliver again before reaching the
    /// destination's current position. Blocking file I/O.
    pub fn replay_range(
        &self,
        name: &str,
        since: u32,
        until: Option<u32>,
    ) -> std::io::Result<Result<ReplayRange, NotRetained>> {
        let stop_at = {
            let cursors = self.shared.cursors.lock().expect("cursor map poisoned");
            cursors.get(name).copied().unwrap_or_else(|| self.end())
        };
        let deleted_through = self.shared.deleted_through.load(Ordering::Relaxed);
        if deleted_through > 0 && u64::from(since) <= deleted_through {
            let oldest = u32::try_from(deleted_through + 1).ok();
            return Ok(Err(NotRetained { oldest }));
        }
        let bases = segments::list_segments(&self.shared.queue_dir)?;
        // Older records were deleted when the log no longer starts at 0 (before this
        // start too): a replay from before its first record would miss some.
        if let Some(&oldest_base) = bases.first().filter(|&&base| base > 0) {
            let mut first = None;
            let path = segments::segment_path(&self.shared.queue_dir, oldest_base);
            segments::scan_positions(&path, oldest_base, |_, tag| {
                first = Some(tag.accepted_at);
                false
            })?;
            if first.is_none_or(|first| first > since) {
                return Ok(Err(NotRetained { oldest: first }));
            }
        }
        let mut range = ReplayRange {
            start: stop_at,
            stop_at,
            messages: 0,
        };
        for &base in &bases {
            if base >= stop_at {
                break;
            }
            let path = segments::segment_path(&self.shared.queue_dir, base);
            segments::scan_positions(&path, base, |position, tag| {
                if position >= stop_at {
                    return false;
                }
                if tag.accepted_at >= since {
                    range.start = range.start.min(position);
                    if until.is_none_or(|until| tag.accepted_at <= until) {
                        range.messages += 1;
                    }
                }
                true
            })?;
        }
        Ok(Ok(range))
    }

    /// Moves `name`'s saved cursor to `position` (its output mark stays); returns where
    /// it was. Only while its engine is stopped. Blocking file I/O.
    pub fn rewind(&self, name: &str, position: u64) -> std::io::Result<u64> {
        let saved = cursor::load(&self.shared.cursor_dir, name)?.unwrap_or(Checkpoint {
            position: self.end(),
            sink_offset: 0,
            sink_id: 0,
        });
        Cursor::new(name, self.shared.clone()).commit(Checkpoint { position, ..saved })?;
        Ok(saved.position)
    }

    /// Has `name`'s next reader pass over what was accepted after `until` until it
    /// reaches `stop_at` (a bounded replay).
    pub fn set_window(&self, name: &str, window: (u32, u64)) {
        let mut windows = self.shared.windows.lock().expect("windows poisoned");
        windows.insert(name.to_string(), window);
    }

    /// The bounded replay waiting for `name`'s next start, if any.
    pub fn take_window(&self, name: &str) -> Option<(u32, u64)> {
        self.shared
            .windows
            .lock()
            .expect("windows poisoned")
            .remove(name)
    }

    /// Names of every destination holding a cursor, configured or not.
    pub fn cursor_names(&self) -> Vec<String> {
        let cursors = self.shared.cursors.lock().expect("cursor map poisoned");
        let mut names: Vec<String> = cursors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Bytes of the log a destination's cursor still holds (from its position to the end).
    pub fn lag_bytes(&self, name: &str) -> Option<u64> {
        let cursors = self.shared.cursors.lock().expect("cursor map poisoned");
        cursors.get(name).map(|&p| self.end().saturating_sub(p))
    }

    /// Drops a destination's cursor and deletes the segments only it was holding.
    /// Only for destinations no longer running. Blocking file I/O.
    pub fn purge(&self, name: &str) -> std::io::Result<bool> {
        let existed = cursor::remove(&self.shared, name)?;
        self.shared.reclaim()?;
        Ok(existed)
    }

    /// Installs the hook that sees each segment's records before it is deleted.
    /// Set it before any destination starts, or early segments go unseen.
    pub fn on_reclaim(&self, hook: ReclaimHook) {
        if self.shared.reclaim_hook.set(hook).is_err() {
            tracing::warn!("queue reclaim hook set twice; keeping the first");
        }
    }

    /// Calls `each(source, tag)` for every record still in the log, oldest first.
    /// Blocking file I/O; meant for start-up.
    pub fn scan(&self, mut each: impl FnMut(&str, Tag)) -> std::io::Result<usize> {
        let mut count = 0;
        for base in segments::list_segments(&self.shared.queue_dir)? {
            let path = segments::segment_path(&self.shared.queue_dir, base);
            segments::scan_segment(&path, None, Body::Checked, |source, tag| {
                each(source, tag);
                count += 1;
            })?;
        }
        Ok(count)
    }

    /// Bytes the log holds: everything from the oldest segment some destination
    /// still needs to the durable end.
    pub fn held_bytes(&self) -> u64 {
        self.end()
            .saturating_sub(self.shared.oldest.load(Ordering::Relaxed))
    }

    /// End of durable data.
    pub fn end(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    /// Whether ingest can store now, and if not, why (for `/ready`): not after a write
    /// that could not be undone, not while writes fail (until one succeeds or the
    /// writer's probe does), and not while the last append the disk budget refused
    /// would still be refused.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.shared.healthy.load(Ordering::Relaxed) {
            return Err("a failed queue write could not be undone; restart fanout".into());
        }
        if let Some(why) = self.shared.failing.why() {
            return Err(format!("queue writes fail: {why}"));
        }
        let refused = self.shared.refused_bytes.load(Ordering::Relaxed);
        let held = self.held_bytes();
        if refused > 0 && held + refused > self.shared.max_bytes {
            return Err(format!(
                "the queue is full ({held} bytes held for destinations, budget {}; \
                 server.max_queue_bytes)",
                self.shared.max_bytes
            ));
        }
        Ok(())
    }
}

/// Where a destination's replay starts (the first record accepted at or after `since`),
/// where its cursor stood, and how many messages it delivers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRange {
    pub start: u64,
    pub stop_at: u64,
    pub messages: u64,
}

/// A replay asked for data the log no longer holds: the oldest record it has was
/// accepted at `oldest` (unix seconds), if it holds any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRetained {
    pub oldest: Option<u32>,
}

/// Group commit: block for one request, take every other one already waiting, write them
/// all, sync once, answer all. Exits when every `LocalQueue` handle is gone. While writes fail,
/// it probes the disk every `PROBE_INTERVAL`, so readiness comes back without traffic.
fn write_loop(
    mut active: segments::ActiveSegment,
    rx: mpsc::Receiver<AppendRequest>,
    shared: Arc<Shared>,
    _lock: File,
) {
    let mut group: Vec<AppendRequest> = Vec::new();
    // Starting on a full disk is allowed; knowing it at once keeps `/ready` honest.
    let mut probe_bytes = MIN_PROBE_BYTES;
    let mut failing = shared.probe(probe_bytes).is_err();
    loop {
        let first = if failing {
            match rx.recv_timeout(PROBE_INTERVAL) {
                Ok(request) => request,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    failing = shared.probe(probe_bytes).is_err();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(request) => request,
                Err(_) => break,
            }
        };
        let mut bytes = first.bytes.len();
        group.push(first);
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.bytes.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let chunks: Vec<&[u8]> = group.iter().map(|r| r.bytes.as_slice()).collect();
        let base_before = active.base();
        let result = active.append(&chunks);
        drop(chunks);
        match result {
            Ok(end) => {
                // After a roll the segment that was the only one has an end.
                shared
                    .oldest_end
                    .fetch_min(active.base(), Ordering::Relaxed);
                shared.committed.send_replace(end);
                if active.base() != base_before {
                    // With no destination no cursor save ever asks for a reclaim; without
                    // this, the log would keep what nobody reads until the budget is full.
                    shared.want_reclaim();
                }
                shared.failing.set(None);
                shared.refused_bytes.store(0, Ordering::Relaxed);
                failing = false;
                for request in group.drain(..) {
                    let _ = request.done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = group.len(), "queue append failed");
                shared
                    .healthy
                    .store(!active.is_poisoned(), Ordering::Relaxed);
                shared.failing.set(Some(e.to_string()));
                failing = true;
                probe_bytes = (bytes as u64).clamp(MIN_PROBE_BYTES, MAX_PROBE_BYTES);
                for request in group.drain(..) {
                    let _ = request.done.send(Err(QueueError::Io(e.to_string())));
                }
            }
        }
    }
    tracing::debug!("queue writer stopped");
}
