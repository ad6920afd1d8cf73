//! store-choice: compares candidate stores for fanout's durable queue on the
//! three things the queue does: durable group-committed appends, sequential
//! reads from a cursor, and reclaiming fully consumed data.

mod fjall_store;
mod redb_store;
mod seglog;
mod sqlite_store;
mod store;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use store::{Result, Store};

const BATCH_EVENTS: usize = 100;
const GROUP_REQUESTS: usize = 16;
const STORES: [&str; 4] = ["seglog", "fjall", "redb", "sqlite"];

struct Args {
    dir: PathBuf,
    seconds: f64,
    pool_events: usize,
    stores: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: PathBuf::from("/tmp/store-choice-data"),
        seconds: 8.0,
        pool_events: 2_500_000,
        stores: STORES.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--seconds" => args.seconds = value()?.parse()?,
            "--pool-events" => args.pool_events = value()?.parse()?,
            "--stores" => args.stores = value()?.split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!(
                    "usage: store-choice [--dir PATH] [--seconds N] [--pool-events N] \
                     [--stores seglog,fjall,redb,sqlite]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

/// All events back to back in one buffer, generated before any timing so
/// that formatting JSON never shows up in the measurements.
struct Pool {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Pool {
    fn generate(n: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(0x5e6_e47);
        let mut data = String::with_capacity(n * 640);
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            // A Segment-style track event; random ids keep it about as
            // compressible as real traffic, `i` makes every event unique.
            let _ = write!(
                data,
                concat!(
                    r#"{{"type":"track","event":"Order Completed","messageId":"{:032x}","#,
                    r#""anonymousId":"{:032x}","userId":"user-{}","#,
                    r#""timestamp":"2024-05-01T12:{:02}:{:02}.{:03}Z","#,
                    r#""properties":{{"orderId":"ord-{:012}","revenue":{}.{:02},"currency":"USD","#,
                    r#""products":[{{"sku":"SKU-{:05}","name":"Widget","price":19.99,"quantity":{}}}]}},"#,
                    r#""context":{{"library":{{"name":"analytics.js","version":"4.1.0"}},"#,
                    r#""ip":"203.0.{}.{}","userAgent":"Mozilla/5.0 (X11; Linux x86_64) Chrome/124.0","#,
                    r#""page":{{"path":"/checkout/complete","url":"https://shop.example.com/checkout"}},"#,
                    r#"}},"sentAt":"2024-05-01T12:00:00.000Z","seq":{}}}"#
                ),
                rng.u128(..),
                rng.u128(..),
                rng.u32(..1_000_000),
                rng.u8(..60),
                rng.u8(..60),
                rng.u16(..1000),
                i,
                rng.u16(1..1000),
                rng.u8(..100),
                rng.u16(..50_000),
                rng.u8(1..10),
                rng.u8(..=255),
                rng.u8(..=255),
                i,
            );
            ends.push(data.len());
        }
        Self {
            data: data.into_bytes(),
            ends,
        }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }
}

/// `write_bytes` from /proc/self/io: bytes this process caused to be sent to
/// the block layer (counted when a page is dirtied, all threads included).
fn io_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Allocated bytes under `path`, like `du -s --block-size=1`.
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            total += du(&entry.path());
        }
    }
    total
}

fn open(name: &str, dir: &Path) -> Result<Box<dyn Store>> {
    Ok(match name {
        "seglog" => Box::new(seglog::SegLog::open(dir)?),
        "fjall" => Box::new(fjall_store::FjallStore::open(dir)?),
        "redb" => Box::new(redb_store::RedbStore::open(dir)?),
        "sqlite" => Box::new(sqlite_store::SqliteStore::open(dir)?),
        other => return Err(format!("unknown store {other}").into()),
    })
}

struct AppendResult {
    commits: usize,
    events: usize,
    payload: u64,
    elapsed: Duration,
    lat_ns: Vec<u64>,
    /// write_bytes / payload at the end of the timed run, and after `settle`.
    amp: Option<(f64, f64)>,
    pool_exhausted: bool,
}

/// Durable commits of `per_commit` events until time runs out.
fn append_run(
    store: &mut dyn Store,
    pool: &Pool,
    per_commit: usize,
    seconds: f64,
) -> Result<AppendResult> {
    let budget = Duration::from_secs_f64(seconds);
    let mut lat_ns = Vec::with_capacity(1 << 20);
    let mut refs: Vec<&[u8]> = Vec::with_capacity(per_commit);
    let (mut next, mut payload) = (0usize, 0u64);
    let io_before = io_write_bytes();
    let start = Instant::now();
    let mut pool_exhausted = false;
    while start.elapsed() < budget {
        if next + per_commit > pool.len() {
            pool_exhausted = true;
            break;
        }
        refs.clear();
        refs.extend((next..next + per_commit).map(|i| pool.get(i)));
        payload += refs.iter().map(|r| r.len() as u64).sum::<u64>();
        let t = Instant::now();
        store.append(next as u64, &refs)?;
        lat_ns.push(t.elapsed().as_nanos() as u64);
        next += per_commit;
    }
    let elapsed = start.elapsed();
    let io_run = io_write_bytes();
    store.settle()?;
    let io_settled = io_write_bytes();
    let amp = match (io_before, io_run, io_settled) {
        (Some(b), Some(r), Some(s)) => Some((
            (r - b) as f64 / payload as f64,
            (s - b) as f64 / payload as f64,
        )),
        _ => None,
    };
    Ok(AppendResult {
        commits: lat_ns.len(),
        events: next,
        payload,
        elapsed,
        lat_ns,
        amp,
        pool_exhausted,
    })
}

struct Row {
    store: String,
    scenario: &'static str,
    commits: String,
    commits_s: String,
    events_s: String,
    mb_s: String,
    mean_us: String,
    p99_us: String,
    amp: String,
    notes: String,
}

impl Row {
    fn new(store: &str, scenario: &'static str) -> Self {
        let dash = || "–".to_string();
        Row {
            store: store.to_string(),
            scenario,
            commits: dash(),
            commits_s: dash(),
            events_s: dash(),
            mb_s: dash(),
            mean_us: dash(),
            p99_us: dash(),
            amp: dash(),
            notes: String::new(),
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn append_row(store: &str, scenario: &'static str, mut r: AppendResult) -> Row {
    let secs = r.elapsed.as_secs_f64();
    r.lat_ns.sort_unstable();
    let n = r.lat_ns.len().max(1);
    let mean = r.lat_ns.iter().sum::<u64>() as f64 / n as f64 / 1e3;
    let p99 = r.lat_ns[(n * 99).div_ceil(100).max(1) - 1] as f64 / 1e3;
    let max = r.lat_ns.last().copied().unwrap_or(0) as f64 / 1e3;
    let mut row = Row::new(store, scenario);
    row.commits = r.commits.to_string();
    row.commits_s = format!("{:.0}", r.commits as f64 / secs);
    row.events_s = format!("{:.0}", r.events as f64 / secs);
    row.mb_s = format!("{:.1}", mb(r.payload) / secs);
    row.mean_us = format!("{mean:.0}");
    row.p99_us = format!("{p99:.0}");
    if let Some((run, settled)) = r.amp {
        row.amp = format!("{run:.2} / {settled:.2}");
    }
    row.notes = format!(
        "{} events, {:.0} MB payload in {secs:.1} s; max {max:.0} µs",
        r.events,
        mb(r.payload)
    );
    if r.pool_exhausted {
        row.notes.push_str("; stopped early: event pool exhausted");
    }
    row
}

fn run_store(name: &str, args: &Args, pool: &Pool, rows: &mut Vec<Row>) -> Result<()> {
    // Scenario 1: 100-event requests, one durable commit each.
    let dir = args.dir.join(format!("{name}-batch"));
    let mut store = open(name, &dir)?;
    eprintln!("[{name}] batch append for {} s", args.seconds);
    let batch = append_run(store.as_mut(), pool, BATCH_EVENTS, args.seconds)?;
    let written = batch.events as u64;
    let written_bytes = batch.payload;
    let batch_row = append_row(name, "1 append batch (100 ev/commit)", batch);

    // Scenario 3: one consumer reads everything back from cursor 0.
    eprintln!("[{name}] sequential read");
    let start = Instant::now();
    let (mut expect, mut bytes) = (0u64, 0u64);
    let visited = store.read_from(0, &mut |seq, body| {
        assert_eq!(seq, expect, "out of order read");
        expect += 1;
        bytes += body.len() as u64;
    })?;
    let secs = start.elapsed().as_secs_f64();
    if visited != written || bytes != written_bytes {
        return Err(format!("{name}: read {visited} events / {bytes} B, wrote {written}").into());
    }
    let mut read_row = Row::new(name, "3 sequential read");
    read_row.events_s = format!("{:.0}", visited as f64 / secs);
    read_row.mb_s = format!("{:.1}", mb(bytes) / secs);
    read_row.notes = format!("{visited} events in {:.2} s, warm page cache", secs);

    // Scenario 4: consumers are past the midpoint, drop everything below it.
    eprintln!("[{name}] reclaim");
    let mid = written / 2;
    let du_before = du(&dir);
    let start = Instant::now();
    store.reclaim_below(mid)?;
    let reclaim_ms = start.elapsed().as_secs_f64() * 1e3;
    let du_after = du(&dir);
    let left = store.read_from(mid, &mut |_, _| {})?;
    if left != written - mid {
        return Err(format!("{name}: {left} events left above midpoint").into());
    }
    let mut reclaim_row = Row::new(name, "4 reclaim below midpoint");
    reclaim_row.notes = format!(
        "{reclaim_ms:.0} ms; du {:.0} → {:.0} MB (payload {:.0} MB)",
        mb(du_before),
        mb(du_after),
        mb(written_bytes)
    );
    let start = Instant::now();
    if let Some(label) = store.compact()? {
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let _ = write!(
            reclaim_row.notes,
            "; then {label}: {ms:.0} ms → {:.0} MB",
            mb(du(&dir))
        );
    }
    // Some stores free files only at a later flush or on close.
    drop(store);
    let _ = write!(reclaim_row.notes, "; after close {:.0} MB", mb(du(&dir)));
    std::fs::remove_dir_all(&dir)?;

    // Scenario 2: 16 single-event requests share one durable commit.
    let dir = args.dir.join(format!("{name}-group"));
    let mut store = open(name, &dir)?;
    eprintln!("[{name}] group-commit append for {} s", args.seconds);
    let group = append_run(store.as_mut(), pool, GROUP_REQUESTS, args.seconds)?;
    drop(store);
    std::fs::remove_dir_all(&dir)?;

    rows.push(batch_row);
    rows.push(append_row(name, "2 append group (16×1 ev/commit)", group));
    rows.push(read_row);
    rows.push(reclaim_row);
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    std::fs::create_dir_all(&args.dir)?;

    let start = Instant::now();
    let pool = Pool::generate(args.pool_events);
    eprintln!(
        "generated {} events, mean {:.0} B, in {:.1} s",
        pool.len(),
        pool.data.len() as f64 / pool.len() as f64,
        start.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let result = args
        .stores
        .iter()
        .try_for_each(|name| run_store(name, &args, &pool, &mut rows));
    let _ = std::fs::remove_dir_all(&args.dir);
    result?;

    println!(
        "| store | scenario | commits | commits/s | events/s | MB/s | mean µs | p99 µs \
         | write amp (run / settled) | notes |"
    );
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.store,
            r.scenario,
            r.commits,
            r.commits_s,
            r.events_s,
            r.mb_s,
            r.mean_us,
            r.p99_us,
            r.amp,
            r.notes
        );
    }
    Ok(())
}
