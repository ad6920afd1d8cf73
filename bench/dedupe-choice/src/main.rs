//! `dedupe-choice table|moka [KEYS]`: inserts KEYS distinct dedupe keys (default 10 M) with a
//! 24 h window and capacity KEYS, then looks up 1 M of them, and prints the process's RSS
//! growth and the time per operation. One store per process, so RSS is its own.

use std::time::{Duration, Instant};

use fanout::dedupe::{DedupeKey, KeyTable};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A UUID-shaped messageId made on the stack: no heap churn to blur the RSS figure.
fn key(i: u64) -> DedupeKey {
    use std::io::Write;
    let mut buf = [0u8; 36];
    let mut w = &mut buf[..];
    write!(w, "{:08x}-0000-4000-8000-{:012x}", i >> 48, i & 0xffff_ffff_ffff).unwrap();
    DedupeKey::of("web", std::str::from_utf8(&buf).unwrap())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let store = args.next().unwrap_or_else(|| "table".into());
    let n: u64 = args.next().map_or(10_000_000, |s| s.parse().expect("KEYS is a number"));
    let ttl = 24 * 3600;
    // Keys are made up front so that only the store's work is timed and measured.
    let keys: Vec<DedupeKey> = (0..n).map(key).collect();
    let base = rss_kib();
    // RSS is read while the store is still alive.
    let (insert, lookup, hits, rss) = match store.as_str() {
        "table" => {
            let table = KeyTable::new(n as usize, ttl);
            let now = 1_800_000_000;
            let t = Instant::now();
            for k in &keys {
                table.insert(*k, now, now);
            }
            let insert = t.elapsed();
            let t = Instant::now();
            let hits = keys.iter().take(1_000_000).filter(|k| table.contains(k, now)).count();
            assert_eq!(table.len() as u64, n, "every key is held");
            (insert, t.elapsed(), hits, rss_kib())
        }
        "moka" => {
            let cache: moka::sync::Cache<[u32; 3], ()> = moka::sync::Cache::builder()
                .max_capacity(n)
                .time_to_live(Duration::from_secs(u64::from(ttl)))
                .build();
            let t = Instant::now();
            for k in &keys {
                cache.insert(k.0, ());
            }
            cache.run_pending_tasks();
            let insert = t.elapsed();
            let t = Instant::now();
            let hits = keys.iter().take(1_000_000).filter(|k| cache.contains_key(&k.0)).count();
            (insert, t.elapsed(), hits, rss_kib())
        }
        other => panic!("unknown store {other}: table or moka"),
    };
    let grown = rss.saturating_sub(base);
    println!(
        "| {store} | {n} | {:.0} MB | {:.1} B | {:.0} ns | {:.0} ns | {hits} |",
        grown as f64 / 1024.0,
        grown as f64 * 1024.0 / n as f64,
        insert.as_nanos() as f64 / n as f64,
        lookup.as_nanos() as f64 / 1e6,
    );
}
