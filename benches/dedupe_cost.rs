//! What the dedupe check adds to the cost of one `/v1/batch` of 100 messages, measured in
//! process (no HTTP, disk or scheduler noise): parse + validate + encode of the batch
//! against reserve + commit of its 100 new keys, with the window already holding 2.5 M
//! keys so lookups miss the caches as they do under load.
//!
//!     cargo bench --bench dedupe_cost
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use fanout::clock::Clock;
use fanout::config::Config;
use fanout::dedupe::Dedupe;
use fanout::ingest::segment;

const EVENTS: usize = 100;

/// A batch shaped like `../shared/bench/wrk/batch.lua`'s (about 630 bytes per event).
fn batch(n: u64) -> Vec<u8> {
    let events: Vec<String> = (0..EVENTS as u64)
        .map(|i| {
            let id = n * EVENTS as u64 + i;
            format!(
                r#"{{"type":"track","userId":"user-{}","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","event":"Order Completed","messageId":"0badc0de-0001-4000-8000-{id:012x}","timestamp":"2024-05-01T12:34:56.789Z","properties":{{"orderId":"ord_{id}","revenue":129.99,"currency":"USD","products":[{{"sku":"SKU-4821","name":"Ceramic Pour-Over Kettle","price":49.99,"quantity":2}}]}},"context":{{"library":{{"name":"analytics-node","version":"2.1.0"}},"ip":"203.0.113.7","locale":"en-US","userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0 Safari/537.36","page":{{"path":"/checkout","title":"Checkout"}}}},"integrations":{{}}}}"#,
                id % 10_000
            )
        })
        .collect();
    format!(
        r#"{{"batch":[{}],"sentAt":"2024-05-01T12:34:57.000Z"}}"#,
        events.join(",")
    )
    .into_bytes()
}

fn main() {
    let config = Config::parse("[[sources]]\nname = \"bench\"\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dedupe = Arc::new(
        Dedupe::open(&config.dedupe, &config.sources, dir.path(), Clock::system()).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let limits = config.limits.clone();
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10_000);
    // 2.5 M keys first; the measured 1 M more stay below the next table growth (3.67 M),
    // as in a window that has reached its steady size.
    let warm: u64 = 2_500_000 / EVENTS as u64;
    let bodies: Vec<Vec<u8>> = (0..64).map(batch).collect();

    // The working set: keys accepted before the measurement.
    let encoded: Vec<_> = (0..warm + rounds)
        .map(|n| {
            let body = if n < 64 {
                bodies[n as usize].clone()
            } else {
                batch(n)
            };
            let request = segment::parse_batch(&body, &limits, chrono::Utc::now()).unwrap();
            request.encode("bench", &limits).unwrap()
        })
        .collect();
    runtime.block_on(async {
        for records in &encoded[..warm as usize] {
            dedupe
                .reserve("bench", records.tags())
                .await
                .unwrap()
                .commit()
                .await;
        }
    });

    // Ingest: the same 64 bodies, parsed, validated and framed again and again.
    let started = Instant::now();
    for n in 0..rounds {
        let body = &bodies[(n % 64) as usize];
        let request = segment::parse_batch(body, &limits, chrono::Utc::now()).unwrap();
        black_box(request.encode("bench", &limits).unwrap());
    }
    let ingest = started.elapsed().as_nanos() as f64 / rounds as f64 / 1e3;

    // Dedupe: reserve and commit 100 keys never seen before.
    let started = Instant::now();
    runtime.block_on(async {
        for records in &encoded[warm as usize..] {
            let reservation = dedupe.reserve("bench", records.tags()).await.unwrap();
            assert_eq!(reservation.duplicates(), 0);
            reservation.commit().await;
        }
    });
    let check = started.elapsed().as_nanos() as f64 / rounds as f64 / 1e3;

    println!(
        "per batch of {EVENTS}: ingest {ingest:.1} µs, dedupe {check:.1} µs ({:.1} %)",
        100.0 * check / ingest
    );
    println!("window: {} keys", dedupe.len());
}
