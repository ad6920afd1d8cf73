//! `kind = "http"`: the per-message work of its `check` — parse the stored message,
//! pick the action, render the URL, a header and a 10-field body (typed expressions,
//! filters, text) — for one `Order Completed` track shaped like
//! `../shared/bench/wrk/batch.lua`'s (about 600 bytes). Target: ≤ 3 µs per message.
//!
//!     cargo bench --bench http_kind -- --quick
#![allow(clippy::disallowed_methods)] // benchmarks read the system clock freely

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanout::clock::Clock;
use fanout::destinations::{Check, DestinationConfig};

const CONFIG: &str = r#"
name = "bench"
kind = "http"
url = "http://127.0.0.1:9/v1/events/{{ userId }}"
headers = { X-Source = "fanout {{ context.library.name }}" }
when = { types = ["track"] }
[body]
event = "{{ event }}"
user_id = "{{ userId }}"
insert_id = "{{ messageId }}"
time = "{{ timestamp | unix_ms }}"
email = "{{ context.traits.email | sha256 }}"
revenue = "{{ properties.revenue }}"
currency = "{{ properties.currency | default('USD') | lower }}"
order = "order {{ properties.orderId }}"
products = "{{ properties.products }}"
ip = "{{ context.ip }}"
"#;

const MESSAGE: &str = r#"{"type":"track","userId":"user-1","anonymousId":"5f1c2a7e-9b3d-4e8a-a1c6-0d2b7e9f4a13","event":"Order Completed","messageId":"m-1","timestamp":"2024-05-01T12:34:56.789Z","receivedAt":"2024-05-01T12:34:57.000Z","properties":{"orderId":"ord_1","revenue":129.99,"currency":"USD","products":[{"sku":"SKU-4821","name":"Ceramic Pour-Over Kettle","price":49.99,"quantity":2}]},"context":{"library":{"name":"analytics-node","version":"2.1.0"},"ip":"203.0.113.7","locale":"en-US","traits":{"email":"user1@example.com"}}}"#;

fn render(c: &mut Criterion) {
    let config: DestinationConfig = toml::from_str(CONFIG).unwrap();
    config.validate().unwrap();
    let destination = config.build(None, Clock::system()).unwrap();
    assert!(matches!(
        destination.check(MESSAGE.as_bytes()),
        Check::Send(Some(_))
    ));
    let mut group = c.benchmark_group("http_kind");
    group.throughput(Throughput::Elements(1));
    group.bench_function("check/10_field_body", |b| {
        b.iter(|| black_box(destination.check(black_box(MESSAGE.as_bytes()))))
    });
    group.finish();
}

criterion_group!(http_kind, render);
criterion_main!(http_kind);
