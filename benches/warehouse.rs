//! The warehouse destination's per-message work before any SQL is sent:
//! - `check`: a stored message of about 1 KB (an `Order Completed` track, an identify) →
//!   its rows, values encoded for COPY (`postgres::encoded::Encoded::of`), as `check`
//!   does.
//! - `check+copy`: a batch of 100 such messages (each its own messageId and userId) from
//!   the stored bytes to binary COPY data: `check`, the columns the batch needs, each
//!   table's COPY data (`postgres::assemble`), and dropping what `check` made. Reported
//!   per event.
//!
//! The issue's budget is ≤ 5 µs of CPU per event: the figures are the benchmark thread's
//! CPU time (on a shared machine wall time counts other processes' turns too). mimalloc is
//! the allocator, as in fanout.
//!
//!     taskset -c 1 cargo bench --bench warehouse
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanout::destinations::postgres::assemble::{needs, tables};
use fanout::destinations::postgres::buffers::Buffers;
use fanout::destinations::postgres::catalog::Tables;
use fanout::destinations::postgres::encoded::Encoded;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MESSAGE_ID: &str = "ajs-next-1714566896789-5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13";

/// A stored "Order Completed" track as analytics.js sends one, with the fields ingest adds.
const TRACK: &str = r#"{"type":"track","event":"Order Completed","messageId":"ajs-next-1714566896789-5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","userId":"user-48213","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","properties":{"orderId":"ord_48213","checkoutId":"chk_9b3d4e8a","total":129.99,"revenue":119.99,"shipping":5.5,"tax":4.5,"discount":0,"coupon":"SPRING24","currency":"USD","affiliation":"Web Store","paymentMethod":"card","firstOrder":true,"itemCount":2,"shippingAddress":{"city":"Berlin","country":"DE","postalCode":"10115"},"products":[{"product_id":"SKU-4821","name":"Ceramic Pour-Over Kettle","price":49.99,"quantity":2}]},"context":{"library":{"name":"analytics.js","version":"next-1.70.0"},"ip":"203.0.113.7","locale":"en-US","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","page":{"path":"/checkout/complete","referrer":"https://shop.example.com/cart","title":"Thank you","url":"https://shop.example.com/checkout/complete"},"campaign":{"name":"spring","source":"newsletter","medium":"email"}},"integrations":{},"timestamp":"2024-05-01T12:34:56.789Z","originalTimestamp":"2024-05-01T12:34:56.700Z","sentAt":"2024-05-01T12:34:56.750Z","receivedAt":"2024-05-01T12:34:57.000Z"}"#;

/// A stored identify from analytics.js with a dozen traits (one nested, one timestamp).
const IDENTIFY: &str = r#"{"type":"identify","messageId":"ajs-next-1714566896789-5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","userId":"user-48213","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","traits":{"email":"ada.lovelace@example.com","firstName":"Ada","lastName":"Lovelace","name":"Ada Lovelace","phone":"+44 20 7946 0958","plan":"pro","seats":12,"trialEnds":"2024-06-01T00:00:00.000Z","createdAt":"2023-11-02T09:15:00.000Z","emailVerified":true,"company":{"name":"Analytical Engines Ltd","industry":"Computing","employees":42},"address":{"city":"London","country":"GB","postalCode":"W1J 7NT"}},"context":{"library":{"name":"analytics.js","version":"next-1.70.0"},"ip":"203.0.113.7","locale":"en-GB","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","page":{"path":"/account/settings","referrer":"https://app.example.com/","title":"Settings","url":"https://app.example.com/account/settings"}},"integrations":{},"timestamp":"2024-05-01T12:34:56.789Z","originalTimestamp":"2024-05-01T12:34:56.700Z","sentAt":"2024-05-01T12:34:56.750Z","receivedAt":"2024-05-01T12:34:57.000Z"}"#;

const BATCH: usize = 100;

/// `BATCH` copies of `message`, each with its own messageId and userId.
fn batch(message: &str) -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            message
                .replace(MESSAGE_ID, &format!("{MESSAGE_ID}-{i}"))
                .replace("\"user-48213\"", &format!("\"user-48213-{i}\""))
                .into_bytes()
        })
        .collect()
}

/// What `check` does with one stored message.
fn check(message: &[u8]) -> Encoded {
    Encoded::of(message).unwrap()
}

/// Check, then what `send` does before the first byte goes to Postgres: the bytes of
/// binary COPY data the batch makes (the catalog already knowing every column).
fn check_and_copy(batch: &[Vec<u8>], loaded_at: DateTime<Utc>, buffers: &Buffers) -> usize {
    let made: Vec<Encoded> = batch.iter().map(|m| check(m)).collect();
    let made: Vec<&Encoded> = made.iter().collect();
    let needs = needs(made.iter().copied());
    let catalog: Tables = needs
        .iter()
        .map(|(table, columns)| {
            let columns = columns.iter().map(|(n, ty)| (n.to_string(), *ty));
            (table.clone(), columns.collect())
        })
        .collect();
    let mut mismatches = Vec::new();
    let laid = tables(&made, &needs, &catalog, loaded_at, buffers, &mut mismatches);
    assert!(mismatches.is_empty());
    let bytes = laid.values().map(|load| load.data.len()).sum();
    // As the destination does once a batch is loaded.
    for load in laid.into_values() {
        buffers.keep(load.data);
    }
    bytes
}

/// The calling thread's CPU time, formatted as criterion formats wall time.
struct ThreadCpu(WallTime);

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu() - start
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to; this clock exists on Linux.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(ok, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn warehouse(c: &mut Criterion<ThreadCpu>) {
    let loaded_at = Utc::now();
    let buffers = Buffers::default();
    let mut group = c.benchmark_group("warehouse");
    for (name, message) in [("track_1KB", TRACK), ("identify_1KB", IDENTIFY)] {
        let made = check(message.as_bytes());
        let messages = batch(message);
        println!(
            "warehouse: {name}: {} bytes → {} rows, {} columns; a batch of {BATCH} → {} bytes of COPY data",
            message.len(),
            made.rows().count(),
            made.rows().map(|row| row.columns.len()).sum::<usize>(),
            check_and_copy(&messages, loaded_at, &buffers),
        );
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("check/{name}"), |b| {
            b.iter(|| check(black_box(message.as_bytes())))
        });
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(format!("check+copy/{name}"), |b| {
            b.iter(|| check_and_copy(black_box(&messages), loaded_at, &buffers))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpu(WallTime))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = warehouse
}
criterion_main!(benches);
