//! Criterion benchmarks of the per-request hot paths, each through the same public calls
//! the HTTP handlers make (`http::handlers::accept_segment` and `App::store_new`):
//!
//! - `ingest`: `segment::parse_batch` + `SegmentRequest::encode` of one `/v1/batch` body of
//!   100 track events shaped like `../shared/bench/wrk/batch.lua`'s (about 625 bytes each,
//!   unique messageIds, a batch-level `context` and `sentAt`): parse, validate, enrich and
//!   frame for the queue, dedupe keys (xxh3) included.
//! - `dedupe`: `Dedupe::reserve` + `Reservation::commit` of the 100 keys of a batch, once
//!   with 100 keys never seen before and once with 100 duplicates. The window is kept at
//!   its long-run state: full (`max_entries` = `WINDOW_KEYS`, larger than the L3 cache), so
//!   new keys evict the oldest ones, as they do in a server that has run for a while (the
//!   table sweeps expired keys only when a shard is full).
//! - `queue`: `LocalQueue::append` of the framed batch, which returns only after the writer
//!   thread's `fdatasync`: the figure is the disk's sync latency plus a little, and there is
//!   no public way to append without syncing. One append at a time, so no group commit:
//!   this is one request's latency, not the queue's throughput under concurrent requests.
//!   `fdatasync_floor` writes the same bytes to a plain file and syncs it, for comparison.
//!   Both write under `target/tmp`, i.e. on the disk the project is checked out on.
//! - `translate`: `translate::translate` with the default mapping (Klaviyo, current
//!   revision) of one stored message of that batch (an `Order Completed` track → the order
//!   event plus one `Ordered Product`), and of all 100 of them.
//!
//! Each group reports events/s (`Throughput::Elements`).
//!
//!     cargo bench --bench hot_paths                 # about a minute
//!     cargo bench --bench hot_paths -- dedupe       # only the benchmarks matching "dedupe"
//!     cargo bench --bench hot_paths -- --quick
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use serde::Serialize;
use serde_json::{json, Value};

use fanout::clock::Clock;
use fanout::config::Config;
use fanout::dedupe::Dedupe;
use fanout::destinations::klaviyo::translate::{translate, Mapping, Revision, Translation};
use fanout::ingest::segment;
use fanout::message::{DedupeKey, Tag};
use fanout::queue::record::{read_record, ReadOutcome};
use fanout::queue::{LocalQueue, RecordBatch};

const EVENTS: usize = 100;
const SOURCE: &str = "bench";
/// Keys the dedupe window holds: past the 32 MiB L3 cache of the machine this was written
/// on (about 28 bytes a key), yet quick to fill before measuring.
const WINDOW_KEYS: usize = 2_000_000;

/// One track event as `segment.lua` builds it, in its field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Track {
    r#type: &'static str,
    user_id: String,
    anonymous_id: &'static str,
    event: &'static str,
    message_id: String,
    timestamp: &'static str,
    properties: Value,
    context: Value,
    integrations: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Batch {
    batch: Vec<Track>,
    sent_at: &'static str,
    context: Value,
}

/// The messageId `segment.lua` gives its `counter`th event: UUID-shaped, unique per run.
fn message_id(counter: u64) -> String {
    format!("5eed0001-0001-4000-8000-{counter:012x}")
}

/// A `/v1/batch` body of `EVENTS` track events, as `../shared/bench/wrk/batch.lua` sends.
fn batch_body() -> Vec<u8> {
    let batch = (1..=EVENTS as u64)
        .map(|counter| Track {
            r#type: "track",
            user_id: format!("user-{}", counter % 10_000),
            anonymous_id: "5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13",
            event: "Order Completed",
            message_id: message_id(counter),
            timestamp: "2024-05-01T12:34:56.789Z",
            properties: json!({
                "orderId": format!("ord_{}", 8_800_000 + counter),
                "revenue": 129.99,
                "currency": "USD",
                "products": [{
                    "sku": "SKU-4821",
                    "name": "Ceramic Pour-Over Kettle",
                    "price": 49.99,
                    "quantity": 2
                }]
            }),
            context: json!({
                "library": {"name": "analytics-node", "version": "2.1.0"},
                "ip": "203.0.113.7",
                "locale": "en-US",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0 Safari/537.36",
                "page": {"path": "/checkout", "title": "Checkout"}
            }),
            integrations: json!({}),
        })
        .collect();
    serde_json::to_vec(&Batch {
        batch,
        sent_at: "2024-05-01T12:34:57.001Z",
        context: json!({"library": {"name": "analytics-node", "version": "2.1.0"}}),
    })
    .expect("the batch serializes")
}

/// The server's defaults, with the one source the benchmarks send as.
fn config(extra: &str) -> Config {
    Config::parse(&format!("{extra}\n[[sources]]\nname = \"{SOURCE}\"\n"))
        .expect("bench config is valid")
}

/// What the handler hands to dedupe and the queue for `body`.
fn encode(body: &[u8], config: &Config, received_at: DateTime<Utc>) -> RecordBatch {
    segment::parse_batch(body, &config.limits, received_at)
        .and_then(|request| request.encode(SOURCE, &config.limits))
        .expect("the bench batch is valid")
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn ingest(c: &mut Criterion) {
    let config = config("");
    let body = batch_body();
    println!(
        "ingest: body of {} events, {} bytes ({} per event)",
        EVENTS,
        body.len(),
        body.len() / EVENTS
    );
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("parse_batch+encode/100", |b| {
        b.iter(|| {
            // As `accept_segment`: the clock is read per request.
            let request =
                segment::parse_batch(black_box(&body), &config.limits, Utc::now()).unwrap();
            request.encode(SOURCE, &config.limits).unwrap()
        })
    });
    group.finish();
}

/// Dedupe tags of messageIds never used before (as `encode` computes them).
struct FreshKeys {
    next: u64,
    accepted_at: u32,
}

impl FreshKeys {
    fn batch(&mut self) -> Vec<Tag> {
        (0..EVENTS)
            .map(|_| {
                self.next += 1;
                Tag {
                    key: DedupeKey::of(SOURCE, &message_id(self.next)).0,
                    accepted_at: self.accepted_at,
                }
            })
            .collect()
    }
}

fn dedupe(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let config = config(&format!("[dedupe]\nmax_entries = {WINDOW_KEYS}\n"));
    let dir = tempfile::tempdir().expect("temp dir");
    let dedupe = Arc::new(
        Dedupe::open(&config.dedupe, &config.sources, dir.path(), Clock::system()).unwrap(),
    );
    let mut keys = FreshKeys {
        next: 0,
        accepted_at: Utc::now().timestamp() as u32,
    };
    let started = Instant::now();
    let duplicates = runtime.block_on(async {
        for _ in 0..WINDOW_KEYS / EVENTS {
            let tags = keys.batch();
            dedupe
                .reserve(SOURCE, tags.into_iter())
                .await
                .unwrap()
                .commit()
                .await;
        }
        // The last batch accepted: its keys are in the window.
        let tags = keys.batch();
        let reservation = dedupe.reserve(SOURCE, tags.iter().copied()).await.unwrap();
        reservation.commit().await;
        tags
    });
    println!(
        "dedupe: window filled with {} keys in {:.1} s",
        dedupe.len(),
        started.elapsed().as_secs_f64()
    );

    let mut group = c.benchmark_group("dedupe");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("reserve+commit/100_new", |b| {
        let dedupe = &dedupe;
        b.to_async(&runtime).iter_batched(
            || keys.batch(),
            |tags| async move {
                let reservation = dedupe.reserve(SOURCE, tags.into_iter()).await.unwrap();
                debug_assert_eq!(reservation.duplicates(), 0);
                reservation.commit().await
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("reserve+commit/100_duplicates", |b| {
        b.to_async(&runtime).iter(|| async {
            let reservation = dedupe
                .reserve(SOURCE, duplicates.iter().copied())
                .await
                .unwrap();
            debug_assert_eq!(reservation.duplicates(), EVENTS);
            // `store_new` commits even when nothing was new.
            reservation.commit().await
        })
    });
    group.finish();
    println!(
        "dedupe: window holds {} keys, {} evicted early to stay within max_entries",
        dedupe.len(),
        dedupe.evicted()
    );
}

/// A queue in a directory of its own, removed with it.
struct ScratchQueue {
    queue: LocalQueue,
    writer: fanout::queue::QueueWriter,
    _dir: tempfile::TempDir,
}

impl ScratchQueue {
    fn open(parent: &Path, config: &Config) -> ScratchQueue {
        let dir = tempfile::tempdir_in(parent).expect("temp dir");
        let (queue, writer) = LocalQueue::open(
            dir.path(),
            config.server.segment_bytes,
            config.server.max_queue_bytes,
            fanout::clock::Clock::system(),
        )
        .expect("queue opens");
        ScratchQueue {
            queue,
            writer,
            _dir: dir,
        }
    }

    fn close(self) {
        drop(self.queue);
        self.writer.join();
    }
}

fn queue(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let config = config("");
    let body = batch_body();
    let bytes = encode(&body, &config, Utc::now()).bytes().len();
    println!("queue: one append is {bytes} bytes ({EVENTS} framed records)");
    // On the project's disk, not a tmpfs: a sync there would cost nothing.
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(parent).expect("target/tmp");

    let mut group = c.benchmark_group("queue");
    group.throughput(Throughput::Elements(EVENTS as u64));
    // Milliseconds per iteration: flat sampling and fewer samples keep this to seconds.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(30);
    group.bench_function("append+fdatasync/100", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (config, body) = (&config, &body);
            async move {
                // A fresh log per sample, so the files do not grow over the whole run.
                let scratch = ScratchQueue::open(parent, config);
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let records = encode(body, config, Utc::now());
                    let started = Instant::now();
                    scratch.queue.append(records).await.unwrap();
                    measured += started.elapsed();
                }
                scratch.close();
                measured
            }
        })
    });
    let framed = encode(&body, &config, Utc::now()).bytes().to_vec();
    group.bench_function("fdatasync_floor/100", |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir_in(parent).expect("temp dir");
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join("log"))
                .expect("scratch file");
            let started = Instant::now();
            for _ in 0..iters {
                file.write_all(&framed).unwrap();
                file.sync_data().unwrap();
            }
            started.elapsed()
        })
    });
    group.finish();
}

fn translation(c: &mut Criterion) {
    let config = config("");
    let records = encode(&batch_body(), &config, Utc::now());
    // The messages as stored, which is what a destination reads back from the log.
    let mut log = records.bytes();
    let mut stored = Vec::with_capacity(EVENTS);
    while let ReadOutcome::Record { json, .. } = read_record(&mut log).unwrap() {
        stored.push(json);
    }
    assert_eq!(stored.len(), EVENTS);
    let mapping = Mapping::default();
    let now = Utc::now();
    match translate(&stored[0], &mapping, Revision::Current, now) {
        Translation::Events(events) => assert_eq!(events.len(), 2, "order + one product"),
        other => panic!("unexpected translation {other:?}"),
    }

    let mut group = c.benchmark_group("translate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("track/1", |b| {
        b.iter(|| translate(black_box(&stored[0]), &mapping, Revision::Current, now))
    });
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("track/100", |b| {
        b.iter(|| {
            for message in &stored {
                black_box(translate(
                    black_box(message),
                    &mapping,
                    Revision::Current,
                    now,
                ));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = hot_paths;
    // About a minute for the whole run; `--measurement-time` / `--warm-up-time` override.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = ingest, dedupe, queue, translation
}
criterion_main!(hot_paths);
