//! Translation throughput on one core: stored Segment messages (shaped like
//! `../shared/bench/wrk/batch.lua`'s "Order Completed" tracks, one product each, plus
//! identify and page calls) → Klaviyo events and profile upserts → request bodies
//! (bulk-job items and profile-import bodies), the work the Klaviyo destination does per
//! message before any request, with the default keys (`Order Completed` → `Placed Order`).
//!
//!     taskset -c 0 cargo bench --bench translate
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::hint::black_box;
use std::time::Instant;

use chrono::Utc;
use fanout::destinations::klaviyo::translate::body::{write_bulk_item, write_profile_import};
use fanout::destinations::klaviyo::translate::{names, translate, Mapping, Revision, Translation};

fn stored(i: u64) -> Vec<u8> {
    let message = match i % 10 {
        0 => format!(
            r#"{{"type":"identify","userId":"user-{i}","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","messageId":"m-{i}","traits":{{"email":"user{i}@example.com","firstName":"Ada","lastName":"Lovelace","plan":"pro","address":{{"city":"Berlin","country":"DE"}}}},"timestamp":"2024-05-01T12:34:56.789Z","receivedAt":"2024-05-01T12:34:57.000Z"}}"#
        ),
        1 => format!(
            r#"{{"type":"page","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","messageId":"m-{i}","name":"Checkout","properties":{{"path":"/checkout","title":"Checkout","url":"https://shop.example.com/checkout"}},"timestamp":"2024-05-01T12:34:56.789Z","receivedAt":"2024-05-01T12:34:57.000Z"}}"#
        ),
        _ => format!(
            r#"{{"type":"track","userId":"user-{i}","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","event":"Order Completed","messageId":"m-{i}","timestamp":"2024-05-01T12:34:56.789Z","receivedAt":"2024-05-01T12:34:57.000Z","properties":{{"orderId":"ord_{i}","revenue":129.99,"currency":"USD","products":[{{"sku":"SKU-4821","name":"Ceramic Pour-Over Kettle","price":49.99,"quantity":2}}]}},"context":{{"library":{{"name":"analytics-node","version":"2.1.0"}},"ip":"203.0.113.7","locale":"en-US","traits":{{"email":"user{i}@example.com"}}}}}}"#
        ),
    };
    message.into_bytes()
}

fn main() {
    let messages: Vec<Vec<u8>> = (0..10_000).map(stored).collect();
    // As a destination with the default keys builds it: standard ecommerce names on.
    let mapping = names::with_names(Mapping::default(), true, &Default::default());
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let now = Utc::now();
    let mut out = Vec::with_capacity(1 << 20);
    for label in ["warm-up", "run 1", "run 2", "run 3"] {
        let started = Instant::now();
        let mut events = 0usize;
        let mut profiles = 0usize;
        for _ in 0..rounds {
            for message in &messages {
                out.clear();
                match translate(message, &mapping, Revision::Current, now) {
                    Translation::Events(list) => {
                        for event in &list {
                            write_bulk_item(&mut out, event);
                        }
                        events += list.len();
                    }
                    Translation::Profile(upsert) => {
                        write_profile_import(&mut out, &upsert);
                        profiles += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
                black_box(&out);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let n = rounds * messages.len();
        println!(
            "{label}: {n} messages ({events} events, {profiles} profiles) in {secs:.2} s: \
             {:.0} messages/s, {:.2} µs per message",
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
    }
}
