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
    rounds: usize,
    pool_events: usize,
    stores: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        dir: PathBuf::from("/tmp/store-choice-data"),
        seconds: 8.0,
        rounds: 4,
        pool_events: 2_500_000,
        stores: STORES.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--seconds" => args.seconds = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse::<usize>()?.max(1),
            "--pool-events" => args.pool_events = value()?.parse()?,
            "--stores" => args.stores = value()?.split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!(
                    "usage: store-choice [--dir PATH] [--seconds N] [--rounds N] [--pool-events N] \
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

/// One timed slice of appends to one store.
struct Slice {
    commits: usize,
    elapsed: Duration,
    lat_ns: Vec<u64>,
}

impl Slice {
    fn commits_per_s(&self) -> f64 {
        self.commits as f64 / self.elapsed.as_secs_f64()
    }
}

/// A store under an append workload, with everything measured on it so far.
struct Lane {
    name: String,
    dir: PathBuf,
    store: Box<dyn Store>,
    /// Next pool index, which is also the next sequence number.
    next: usize,
    payload: u64,
    slices: Vec<Slice>,
    /// write_bytes during the timed slices (plus background work they left).
    io_run: Option<u64>,
    /// write_bytes of the final `settle`.
    io_settle: Option<u64>,
    pool_exhausted: bool,
}

/// Durable commits of `per_commit` events until the slice's time runs out.
fn append_slice(lane: &mut Lane, pool: &Pool, per_commit: usize, budget: Duration) -> Result<()> {
    let mut lat_ns = Vec::with_capacity(1 << 16);
    let mut refs: Vec<&[u8]> = Vec::with_capacity(per_commit);
    let io_before = io_write_bytes();
    let start = Instant::now();
    while start.elapsed() < budget {
        let next = lane.next;
        if next + per_commit > pool.len() {
            lane.pool_exhausted = true;
            break;
        }
        refs.clear();
        refs.extend((next..next + per_commit).map(|i| pool.get(i)));
        lane.payload += refs.iter().map(|r| r.len() as u64).sum::<u64>();
        let t = Instant::now();
        lane.store.append(next as u64, &refs)?;
        lat_ns.push(t.elapsed().as_nanos() as u64);
        lane.next += per_commit;
    }
    let elapsed = start.elapsed();
    // Untimed: let background work finish so it is counted here and does not
    // slow down the next store's slice.
    lane.store.quiesce()?;
    lane.io_run = add_delta(lane.io_run, io_before, io_write_bytes());
    lane.slices.push(Slice {
        commits: lat_ns.len(),
        elapsed,
        lat_ns,
    });
    Ok(())
}

fn add_delta(acc: Option<u64>, before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(acc? + (after? - before?))
}

/// Runs one append workload on all stores at once, in round-robin slices
/// (rotating who goes first), so that noise from other processes on this
/// shared machine is spread over all stores instead of hitting one.
fn append_phase(args: &Args, pool: &Pool, suffix: &str, per_commit: usize) -> Result<Vec<Lane>> {
    let mut lanes = Vec::new();
    for name in &args.stores {
        let dir = args.dir.join(format!("{name}-{suffix}"));
        lanes.push(Lane {
            name: name.clone(),
            store: open(name, &dir)?,
            dir,
            next: 0,
            payload: 0,
            slices: Vec::new(),
            io_run: Some(0),
            io_settle: Some(0),
            pool_exhausted: false,
        });
    }
    let budget = Duration::from_secs_f64(args.seconds / args.rounds as f64);
    for round in 0..args.rounds {
        let n = lanes.len();
        for k in 0..n {
            let lane = &mut lanes[(round + k) % n];
            eprintln!("[{suffix}] round {round} {}", lane.name);
            append_slice(lane, pool, per_commit, budget)?;
        }
    }
    for lane in &mut lanes {
        let before = io_write_bytes();
        lane.store.settle()?;
        lane.io_settle = add_delta(lane.io_settle, before, io_write_bytes());
    }
    Ok(lanes)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The p99 of already sorted nanosecond latencies, in µs.
fn p99_us(sorted: &[u64]) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() * 99).div_ceil(100) - 1] as f64 / 1e3
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

/// Throughput and p99 are medians over the rounds; the mean is pooled.
fn append_row(lane: &mut Lane, scenario: &'static str, per_commit: usize) -> Row {
    let mut rates: Vec<f64> = lane.slices.iter().map(Slice::commits_per_s).collect();
    let mut p99s: Vec<f64> = lane
        .slices
        .iter_mut()
        .map(|s| {
            s.lat_ns.sort_unstable();
            p99_us(&s.lat_ns)
        })
        .collect();
    let mut all: Vec<u64> = lane
        .slices
        .iter()
        .flat_map(|s| s.lat_ns.iter().copied())
        .collect();
    all.sort_unstable();
    let commits = all.len();
    let mean = all.iter().sum::<u64>() as f64 / commits.max(1) as f64 / 1e3;
    let max = all.last().copied().unwrap_or(0) as f64 / 1e3;
    let rate = median(&mut rates);
    let event_bytes = lane.payload as f64 / lane.next.max(1) as f64;
    let secs: f64 = lane.slices.iter().map(|s| s.elapsed.as_secs_f64()).sum();

    let mut row = Row::new(&lane.name, scenario);
    row.commits = commits.to_string();
    row.commits_s = format!("{rate:.0}");
    row.events_s = format!("{:.0}", rate * per_commit as f64);
    row.mb_s = format!("{:.1}", rate * per_commit as f64 * event_bytes / 1e6);
    row.mean_us = format!("{mean:.0}");
    row.p99_us = format!("{:.0}", median(&mut p99s));
    if let (Some(run), Some(settle)) = (lane.io_run, lane.io_settle) {
        let payload = lane.payload as f64;
        row.amp = format!(
            "{:.2} / {:.2}",
            run as f64 / payload,
            (run + settle) as f64 / payload
        );
    }
    row.notes = format!(
        "rounds {:.0}–{:.0} commits/s; pooled p99 {:.0} µs, max {max:.0} µs; \
         {} events, {:.0} MB in {secs:.1} s",
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
        p99_us(&all),
        lane.next,
        mb(lane.payload)
    );
    if lane.pool_exhausted {
        row.notes.push_str("; stopped early: event pool exhausted");
    }
    row
}

/// Scenarios 3 and 4 on a store that holds the batch workload's events.
fn read_and_reclaim(lane: &mut Lane) -> Result<(Row, Row)> {
    let (name, dir) = (lane.name.clone(), lane.dir.clone());
    let store = lane.store.as_mut();
    let (written, written_bytes) = (lane.next as u64, lane.payload);

    // Scenario 3: one consumer reads everything back from cursor 0.
    eprintln!("[read] {name}");
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
    let mut read_row = Row::new(&name, "3 sequential read");
    read_row.events_s = format!("{:.0}", visited as f64 / secs);
    read_row.mb_s = format!("{:.1}", mb(bytes) / secs);
    read_row.notes = format!("{visited} events in {secs:.2} s, warm page cache");

    // Scenario 4: consumers are past the midpoint, drop everything below it.
    eprintln!("[reclaim] {name}");
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
    let mut reclaim_row = Row::new(&name, "4 reclaim below midpoint");
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
    Ok((read_row, reclaim_row))
}

/// Closes the stores, reports what is left on disk, and deletes it.
fn close(lanes: Vec<Lane>) -> Result<Vec<u64>> {
    let mut left = Vec::new();
    for lane in lanes {
        // Some stores unlink files only at a later flush or on close.
        drop(lane.store);
        left.push(du(&lane.dir));
        std::fs::remove_dir_all(&lane.dir)?;
    }
    Ok(left)
}

fn run(args: &Args, pool: &Pool) -> Result<Vec<Row>> {
    let mut lanes = append_phase(args, pool, "batch", BATCH_EVENTS)?;
    let mut batch_rows = Vec::new();
    for lane in &mut lanes {
        let append = append_row(lane, "1 append batch (100 ev/commit)", BATCH_EVENTS);
        let (read, reclaim) = read_and_reclaim(lane)?;
        batch_rows.push((append, read, reclaim));
    }
    for (rows, left) in batch_rows.iter_mut().zip(close(lanes)?) {
        let _ = write!(rows.2.notes, "; after close {:.0} MB", mb(left));
    }

    let mut lanes = append_phase(args, pool, "group", GROUP_REQUESTS)?;
    let group_rows: Vec<Row> = lanes
        .iter_mut()
        .map(|lane| append_row(lane, "2 append group (16×1 ev/commit)", GROUP_REQUESTS))
        .collect();
    close(lanes)?;

    let mut rows = Vec::new();
    for ((append, read, reclaim), group) in batch_rows.into_iter().zip(group_rows) {
        rows.extend([append, group, read, reclaim]);
    }
    Ok(rows)
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

    let result = run(&args, &pool);
    let _ = std::fs::remove_dir_all(&args.dir);
    let rows = result?;

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
