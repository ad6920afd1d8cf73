//! Prometheus metrics, rendered by `GET /metrics` (`http::ops::metrics`).
//!
//! One recorder per process (`install`, idempotent). Counters and histograms are
//! recorded where things happen; gauges that describe state (queue lag and depth, dedupe
//! size) are read at scrape time through hooks, so the hot path pays nothing for them.
//! Label values are bounded: route templates, status codes, source and destination names
//! from the config, message types. Never a write key, never a client's value.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::clock::Clock;
use crate::message::MessageType;

mod functions;
mod shared_log;
mod sources;
mod warehouse;
pub use functions::FunctionMetrics;
pub use shared_log::{
    nats_stream_recreated, publish_unknown, publish_unknown_untracked, queue_share, ConsumerGauges,
};
pub use sources::source_throttled;
pub use warehouse::schema_warnings;

const HTTP_REQUESTS: &str = "fanout_http_requests_total";
const HTTP_DURATION: &str = "fanout_http_request_duration_seconds";
const HTTP_IN_FLIGHT: &str = "fanout_http_requests_in_flight";
const HTTP_BODIES_CUT: &str = "fanout_http_bodies_cut_total";
const CONNECTIONS_OPEN: &str = "fanout_connections_open";
const EVENTS: &str = "fanout_events_total";
const QUEUE_HELD: &str = "fanout_queue_held_bytes";
const RETENTION_EVICTED: &str = "fanout_queue_retention_evicted_segments_total";
const QUEUE_LAG: &str = "fanout_queue_lag_bytes";
const QUEUE_DEPTH: &str = "fanout_queue_depth_events";
const QUEUE_AGE: &str = "fanout_queue_oldest_age_seconds";
const DELIVERIES: &str = "fanout_deliveries_total";
const DELIVERY_DURATION: &str = "fanout_delivery_duration_seconds";
const DEDUPE_KEYS: &str = "fanout_dedupe_keys";
const DEDUPE_EVICTIONS: &str = "fanout_dedupe_evictions_total";
const DEAD_LETTERS_DROPPED: &str = "fanout_dead_letters_dropped_total";
const SUPPRESSED: &str = "fanout_suppressed_total";
const LIVE_VIEWERS: &str = "fanout_live_viewers";
const LIVE_BUFFERED: &str = "fanout_live_buffered_bytes";
const LIVE_LOST: &str = "fanout_live_events_lost_total";

/// Requests are answered in well under a millisecond (refusals) to tens of ms (fsync).
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// A send is a local write (ms) or a request to a remote API (up to its timeout).
const DELIVERY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Histogram samples wait in memory until drained: drain them even if nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Called at each scrape; a hook returning false is dropped (what it watched is gone).
type ScrapeHook = Box<dyn Fn() -> bool + Send + Sync>;
static HOOKS: Mutex<Vec<ScrapeHook>> = Mutex::new(Vec::new());

/// Installs the process-wide recorder once; later calls (another server in the same
/// process, the delivery engines) do nothing. Metrics recorded before it are lost.
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(DELIVERY_DURATION.into()), DELIVERY_BUCKETS)
            })
            .and_then(|b| {
                let name = functions::CALL_DURATION.into();
                b.set_buckets_for_metric(Matcher::Full(name), functions::CALL_BUCKETS)
            })
            .expect("bucket lists are not empty");
        match builder.install_recorder() {
            Ok(handle) => {
                describe();
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no metrics upkeep thread: histograms drain only when scraped");
                }
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "another metrics recorder is installed: /metrics stays empty");
                None
            }
        }
    });
}

fn describe() {
    shared_log::describe();
    functions::describe();
    sources::describe();
    warehouse::describe();
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template (\"unmatched\" for unknown paths) and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time from receiving a request to its answer, by route template."
    );
    describe_gauge!(
        HTTP_IN_FLIGHT,
        "Requests holding one of the server.max_in_flight slots (probes, /metrics and the \
         operator endpoints take none)."
    );
    describe_counter!(
        HTTP_BODIES_CUT,
        "Request bodies cut short with 408, by reason: stalled (server.body_timeout), \
         deadline (server.body_deadline), evicted (still arriving while every slot was wanted)."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open, on every listener (capped by server.max_connections)."
    );
    describe_counter!(
        EVENTS,
        "Messages by source, type and outcome: accepted (stored), duplicate (dropped), \
         blocked (by the source's tracking plan: a dead letter, sent nowhere), \
         rejected (refused as invalid or too large; a batch refused whole counts all its \
         items as type \"unknown\", a request refused before its messages could be counted \
         counts as one). Requests without a valid write key are not counted here."
    );
    describe_counter!(
        DEAD_LETTERS_DROPPED,
        "Dead letters dropped unseen, by destination (\"tracking_plan\" for blocked \
         messages) and reason: max_bytes (the oldest, to stay within dead_letters.max_bytes), \
         retention (older than dead_letters.retention)."
    );
    describe_counter!(
        RETENTION_EVICTED,
        "Queue segments kept for server.retention that were deleted before it ended, to \
         stay within server.max_queue_bytes (the budget wins over retention)."
    );
    describe_gauge!(
        QUEUE_HELD,
        Unit::Bytes,
        "Bytes the queue holds on disk: from the oldest segment a destination still needs to the end."
    );
    describe_gauge!(
        QUEUE_LAG,
        Unit::Bytes,
        "Bytes between a destination's saved cursor and the end of the queue (not yet settled \
         or not yet saved as settled), for every cursor, including unconfigured destinations \
         not yet purged."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Messages a destination has read from the queue and not yet settled (waiting for a \
         batch, sending, or backing off). Messages not read yet are not counted: see \
         fanout_queue_lag_bytes."
    );
    describe_gauge!(
        QUEUE_AGE,
        Unit::Seconds,
        "Time since the oldest message a destination has read and not settled was accepted \
         (whole seconds); 0 when there is none."
    );
    describe_counter!(
        DELIVERIES,
        "Messages by destination and outcome: ok (delivered), retried (one per message per \
         failed attempt that will be retried), dead_lettered, skipped (not for this destination)."
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "Time of one send attempt of a batch to a destination, whatever its answer."
    );
    describe_counter!(
        SUPPRESSED,
        "Messages answered 200 and dropped: their subject is under a privacy suppression."
    );
    describe_gauge!(DEDUPE_KEYS, "messageIds in the dedupe window.");
    describe_counter!(
        DEDUPE_EVICTIONS,
        "messageIds dropped from the dedupe window before their TTL because dedupe.max_entries was reached."
    );
    describe_gauge!(
        LIVE_VIEWERS,
        "Live-view streams open (/debugger, fanout tap), at most admin.max_viewers."
    );
    describe_gauge!(
        LIVE_BUFFERED,
        Unit::Bytes,
        "Bytes of live-view events held for viewers that have not read them, within \
         admin.viewer_buffer_bytes (plus the newest event)."
    );
    describe_counter!(
        LIVE_LOST,
        "Live-view events viewers lost by falling further behind than \
         admin.viewer_buffer_bytes, summed over viewers (each was told its count)."
    );
}

/// Runs `hook` before each render, until it returns false.
pub fn on_scrape(hook: impl Fn() -> bool + Send + Sync + 'static) {
    HOOKS
        .lock()
        .expect("scrape hooks poisoned")
        .push(Box::new(hook));
}

/// The Prometheus text exposition of every metric (empty if no recorder could be installed).
pub fn render() -> String {
    install();
    HOOKS
        .lock()
        .expect("scrape hooks poisoned")
        .retain(|hook| hook());
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// A request holding an in-flight slot, for as long as this lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> InFlight {
        in_flight_gauge().increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight_gauge().decrement(1.0);
    }
}

fn in_flight_gauge() -> &'static Gauge {
    static GAUGE: OnceLock<Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| {
        install();
        gauge!(HTTP_IN_FLIGHT)
    })
}

fn connections_gauge() -> &'static Gauge {
    static GAUGE: OnceLock<Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| {
        install();
        gauge!(CONNECTIONS_OPEN)
    })
}

/// A request body cut short (`reason`: stalled, deadline, evicted).
pub fn body_cut(reason: &'static str) {
    counter!(HTTP_BODIES_CUT, "reason" => reason).increment(1);
}

/// Client connections open now.
pub fn connections_open(open: usize) {
    connections_gauge().set(open as f64);
}

/// One answered HTTP request. `path` is the route template, never the raw path.
pub fn http_request(path: &str, status: u16, elapsed: Duration) {
    /// Handles by route template, then status: building a labelled key and finding it in
    /// the registry on every request cost ~5 % of a small request's CPU.
    struct Route {
        duration: Histogram,
        requests: Vec<(u16, Counter)>,
    }
    static ROUTES: Mutex<BTreeMap<Box<str>, Route>> = Mutex::new(BTreeMap::new());
    let mut routes = ROUTES.lock().expect("metrics lock poisoned");
    if !routes.contains_key(path) {
        let route = Route {
            duration: histogram!(HTTP_DURATION, "path" => path.to_owned()),
            requests: Vec::new(),
        };
        routes.insert(path.into(), route);
    }
    let route = routes.get_mut(path).expect("inserted above");
    route.duration.record(elapsed.as_secs_f64());
    match route.requests.iter().find(|(s, _)| *s == status) {
        Some((_, counter)) => counter.increment(1),
        None => {
            let counter =
                counter!(HTTP_REQUESTS, "path" => path.to_owned(), "status" => status.to_string());
            counter.increment(1);
            route.requests.push((status, counter));
        }
    }
}

/// The six types in `MessageType`'s declaration order, so `kind as usize` indexes it.
const TYPES: [MessageType; 6] = [
    MessageType::Identify,
    MessageType::Track,
    MessageType::Page,
    MessageType::Screen,
    MessageType::Group,
    MessageType::Alias,
];

/// One request's stored and duplicate messages by type, counted once they are stored.
#[derive(Default)]
pub struct EventTally {
    /// [accepted, duplicate, blocked] per type.
    counts: [[u64; 3]; 6],
}

impl EventTally {
    pub fn add(&mut self, kind: MessageType, duplicate: bool) {
        self.counts[kind as usize][usize::from(duplicate)] += 1;
    }

    /// An accepted message its source's tracking plan blocked.
    pub fn block(&mut self, kind: MessageType) {
        let counts = &mut self.counts[kind as usize];
        counts[0] -= 1;
        counts[2] += 1;
    }

    pub fn record(&self, source: &str) {
        for (kind, counts) in TYPES.iter().zip(self.counts) {
            for (outcome, n) in ["accepted", "duplicate", "blocked"].into_iter().zip(counts) {
                if n > 0 {
                    events(source, kind.as_str(), outcome, n);
                }
            }
        }
    }
}

/// Messages of `source` refused as invalid; `kind` when it is known.
pub fn rejected(source: &str, kind: Option<MessageType>, messages: u64) {
    events(
        source,
        kind.map_or("unknown", MessageType::as_str),
        "rejected",
        messages,
    );
}

/// Per-item refusals of one request, by type when known; returns how many there were.
pub fn rejected_items(source: &str, kinds: impl Iterator<Item = Option<MessageType>>) -> u64 {
    // Index 6: type unknown.
    let mut counts = [0u64; 7];
    for kind in kinds {
        counts[kind.map_or(6, |k| k as usize)] += 1;
    }
    for (index, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
        rejected(source, TYPES.get(index).copied(), n);
    }
    counts.iter().sum()
}

fn events(source: &str, kind: &'static str, outcome: &'static str, n: u64) {
    /// Handles by source, then (type, outcome); see `http_request`.
    type Counters = Vec<((&'static str, &'static str), Counter)>;
    static SOURCES: Mutex<BTreeMap<Box<str>, Counters>> = Mutex::new(BTreeMap::new());
    let mut sources = SOURCES.lock().expect("metrics lock poisoned");
    if !sources.contains_key(source) {
        sources.insert(source.into(), Vec::new());
    }
    let counters = sources.get_mut(source).expect("inserted above");
    match counters.iter().find(|(k, _)| *k == (kind, outcome)) {
        Some((_, counter)) => counter.increment(n),
        None => {
            let counter = counter!(EVENTS, "source" => source.to_owned(), "type" => kind, "outcome" => outcome);
            counter.increment(n);
            counters.push(((kind, outcome), counter));
        }
    }
}

/// Messages of `source` dropped at ingest for a privacy suppression.
pub fn suppressed(source: &str, messages: u64) {
    if messages > 0 {
        counter!(SUPPRESSED, "source" => source.to_string()).increment(messages);
    }
}

/// Dead letters of `destination` dropped for `reason` ("max_bytes", "retention").
pub fn dead_letters_dropped(destination: &str, reason: &'static str, letters: u64) {
    counter!(DEAD_LETTERS_DROPPED, "destination" => destination.to_string(), "reason" => reason)
        .increment(letters);
}

/// Retained queue segments deleted early to stay within `server.max_queue_bytes`.
pub fn retention_evicted(segments: u64) {
    counter!(RETENTION_EVICTED).increment(segments);
}

/// One destination's delivery counters; looked up once per batch.
pub struct DeliveryMetrics {
    pub ok: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub skipped: Counter,
    /// Per send attempt.
    pub duration: Histogram,
}

impl DeliveryMetrics {
    pub fn new(destination: &str) -> DeliveryMetrics {
        let outcome = |outcome: &'static str| counter!(DELIVERIES, "destination" => destination.to_owned(), "outcome" => outcome);
        DeliveryMetrics {
            ok: outcome("ok"),
            retried: outcome("retried"),
            dead_lettered: outcome("dead_lettered"),
            skipped: outcome("skipped"),
            duration: histogram!(DELIVERY_DURATION, "destination" => destination.to_owned()),
        }
    }
}

/// What a destination's delivery engine reports about its backlog, read at scrape time.
pub struct DestinationGauges {
    state: Arc<DestinationState>,
}

#[derive(Default)]
struct DestinationState {
    unsettled: AtomicU64,
    /// Unix seconds; 0 when nothing is unsettled.
    oldest_accepted_at: AtomicU64,
}

impl DestinationGauges {
    /// Reports for `destination` until dropped, the age as `clock` tells it; then its
    /// depth and age read 0.
    pub fn register(destination: &str, clock: Clock) -> DestinationGauges {
        let state = Arc::new(DestinationState::default());
        let watched: Weak<DestinationState> = Arc::downgrade(&state);
        let name = destination.to_owned();
        on_scrape(move || {
            let state = watched.upgrade();
            let (depth, oldest) = state.as_ref().map_or((0, 0), |s| {
                (
                    s.unsettled.load(Ordering::Relaxed),
                    s.oldest_accepted_at.load(Ordering::Relaxed),
                )
            });
            let age = if oldest == 0 {
                0
            } else {
                u64::from(clock.unix_secs()).saturating_sub(oldest)
            };
            gauge!(QUEUE_DEPTH, "destination" => name.clone()).set(depth as f64);
            gauge!(QUEUE_AGE, "destination" => name.clone()).set(age as f64);
            state.is_some()
        });
        DestinationGauges { state }
    }

    /// Messages read and not settled, and when the oldest of them was accepted.
    pub fn set(&self, unsettled: usize, oldest_accepted_at: Option<u32>) {
        self.state
            .unsettled
            .store(unsettled as u64, Ordering::Relaxed);
        self.state
            .oldest_accepted_at
            .store(oldest_accepted_at.map_or(0, u64::from), Ordering::Relaxed);
    }
}

/// The queue's size on disk and each cursor's distance from its end.
/// A purged cursor's series drops to 0 (the exporter cannot delete a series).
pub fn queue_state(held_bytes: u64, lags: impl IntoIterator<Item = (String, u64)>) {
    static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    gauge!(QUEUE_HELD).set(held_bytes as f64);
    let mut reported = REPORTED.lock().expect("metrics lock poisoned");
    let mut gone = std::mem::take(&mut *reported);
    for (destination, lag) in lags {
        gone.remove(&destination);
        gauge!(QUEUE_LAG, "destination" => destination.clone()).set(lag as f64);
        reported.insert(destination);
    }
    for destination in gone {
        gauge!(QUEUE_LAG, "destination" => destination).set(0.0);
    }
}

/// The dedupe window's size and its evictions so far (a running total kept by the table).
pub fn dedupe_state(keys: usize, evicted: u64) {
    gauge!(DEDUPE_KEYS).set(keys as f64);
    counter!(DEDUPE_EVICTIONS).absolute(evicted);
}

/// The live view's viewers, what it holds for them, and what they lost (a running total).
pub fn live_state(viewers: usize, buffered_bytes: usize, lost_total: u64) {
    gauge!(LIVE_VIEWERS).set(viewers as f64);
    gauge!(LIVE_BUFFERED).set(buffered_bytes as f64);
    counter!(LIVE_LOST).absolute(lost_total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_in_declaration_order() {
        for kind in TYPES {
            assert_eq!(TYPES[kind as usize], kind);
        }
    }
}
