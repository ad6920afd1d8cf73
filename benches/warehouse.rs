//! The warehouse destination's per-message work before any SQL: a stored track of about
//! 1 KB → its `tracks` and event-table rows (`postgres::schema::rows`), from the parsed
//! JSON and from the stored bytes. The issue's budget is ≤ 5 µs of CPU per event.
//!
//!     taskset -c 0 cargo bench --bench warehouse
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::hint::black_box;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanout::destinations::postgres::schema::rows;

/// A stored "Order Completed" track as analytics.js sends one, with the fields ingest adds.
const TRACK: &str = r#"{"type":"track","event":"Order Completed","messageId":"ajs-next-1714566896789-5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","userId":"user-48213","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","properties":{"orderId":"ord_48213","checkoutId":"chk_9b3d4e8a","total":129.99,"revenue":119.99,"shipping":5.5,"tax":4.5,"discount":0,"coupon":"SPRING24","currency":"USD","affiliation":"Web Store","paymentMethod":"card","firstOrder":true,"itemCount":2,"shippingAddress":{"city":"Berlin","country":"DE","postalCode":"10115"},"products":[{"product_id":"SKU-4821","name":"Ceramic Pour-Over Kettle","price":49.99,"quantity":2}]},"context":{"library":{"name":"analytics.js","version":"next-1.70.0"},"ip":"203.0.113.7","locale":"en-US","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","page":{"path":"/checkout/complete","referrer":"https://shop.example.com/cart","title":"Thank you","url":"https://shop.example.com/checkout/complete"},"campaign":{"name":"spring","source":"newsletter","medium":"email"}},"integrations":{},"timestamp":"2024-05-01T12:34:56.789Z","originalTimestamp":"2024-05-01T12:34:56.700Z","sentAt":"2024-05-01T12:34:56.750Z","receivedAt":"2024-05-01T12:34:57.000Z"}"#;

fn warehouse(c: &mut Criterion) {
    let message: serde_json::Value = serde_json::from_str(TRACK).unwrap();
    let loaded_at = Utc::now();
    let made = rows(&message, loaded_at).unwrap();
    println!(
        "warehouse: a track of {} bytes → {} rows, {} columns",
        TRACK.len(),
        made.len(),
        made.iter().map(|r| r.columns.len()).sum::<usize>()
    );
    let mut group = c.benchmark_group("warehouse");
    group.throughput(Throughput::Elements(1));
    group.bench_function("rows/track_1KB", |b| {
        b.iter(|| rows(black_box(&message), loaded_at).unwrap())
    });
    group.bench_function("parse+rows/track_1KB", |b| {
        b.iter(|| {
            let message: serde_json::Value = serde_json::from_str(black_box(TRACK)).unwrap();
            rows(&message, loaded_at).unwrap()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = warehouse
}
criterion_main!(benches);
