//! The live view: each happening — a message accepted, a duplicate, a request refused, and
//! per destination delivered, skipped, retried or dead-lettered, and what its insert
//! function made of a message (`inserted`: `before` and `after`) — as an event for whoever
//! watches (`GET /debugger/events`, the `/debugger` page, `fanout tap`).
//!
//! Events are built only while someone watches (a viewer count, one atomic read, is all
//! ingest and delivery pay otherwise). Each is serialized once and kept, shared, in one
//! ring bounded in bytes (`[admin] viewer_buffer_bytes`): publishing appends and never
//! waits, and a viewer that falls further behind than the ring holds loses the oldest and
//! is told how many (a `dropped` event). Viewers are woken by a thread of their own, so a
//! request pays the same whatever the number of viewers (at most `[admin] max_viewers`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::message::MessageType;

/// What an event costs beyond its JSON: the struct, its names and the ring's slot.
const EVENT_OVERHEAD: usize = 128;

/// One happening, serialized once for every viewer.
#[derive(Debug)]
pub struct LiveEvent {
    pub source: Option<String>,
    pub destination: Option<String>,
    pub message_type: Option<&'static str>,
    /// The event as sent to viewers: `{"kind": …, …}`.
    pub json: String,
}

impl LiveEvent {
    /// Bytes this event holds, as the ring counts them.
    pub fn cost(&self) -> usize {
        self.json.len()
            + self.source.as_ref().map_or(0, String::len)
            + self.destination.as_ref().map_or(0, String::len)
            + EVENT_OVERHEAD
    }
}

/// Set at shutdown: every viewer's stream ends.
fn closing() -> &'static watch::Sender<bool> {
    static CLOSING: OnceLock<watch::Sender<bool>> = OnceLock::new();
    CLOSING.get_or_init(|| watch::channel(false).0)
}

pub fn close_viewers() {
    closing().send_replace(true);
}

/// Resolves when the process shuts down.
pub async fn closed() {
    let mut rx = closing().subscribe();
    let _ = rx.wait_for(|&c| c).await;
}

/// How many may watch and how far behind they may fall (`[admin] max_viewers`,
/// `[admin] viewer_buffer_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_viewers: usize,
    pub buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_viewers: 16,
            buffer_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The events viewers have yet to read, oldest first, numbered from `first`.
#[derive(Default)]
struct Ring {
    events: VecDeque<Arc<LiveEvent>>,
    /// The number of `events[0]`.
    first: u64,
    /// What `events` cost, in bytes (`LiveEvent::cost`).
    bytes: usize,
    budget: usize,
}

impl Ring {
    /// The number the next event gets.
    fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }

    /// Appends `event`, dropping the oldest past the budget (the newest always stays).
    fn push(&mut self, event: Arc<LiveEvent>) {
        self.bytes += event.cost();
        self.events.push_back(event);
        while self.bytes > self.budget && self.events.len() > 1 {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.cost();
                self.first += 1;
            }
        }
    }
}

/// The ring, the viewers and what wakes them. One per process (`hub()`); tests make their
/// own.
pub struct Hub {
    ring: Mutex<Ring>,
    max_viewers: AtomicUsize,
    viewers: AtomicUsize,
    /// Events viewers lost by falling behind, summed over viewers.
    lost: AtomicU64,
    /// The ring's end, sent by the waker thread to viewers waiting for more.
    end: watch::Sender<u64>,
    /// Set when events were published since the waker last woke viewers.
    wake_pending: AtomicBool,
    waker: std::thread::Thread,
    /// What events are stamped with (`at`).
    clock: Mutex<Clock>,
}

/// A viewer count over `max_viewers`: refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyViewers {
    pub max_viewers: usize,
}

/// What the hub holds now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub viewers: usize,
    pub buffered_bytes: usize,
    pub lost_total: u64,
}

impl Hub {
    pub fn new(limits: Limits) -> Arc<Hub> {
        Arc::new_cyclic(|weak: &Weak<Hub>| {
            let weak = weak.clone();
            let waker = std::thread::Builder::new()
                .name("live-view".into())
                .spawn(move || wake_viewers(weak))
                .expect("spawn the live view's waker thread");
            Hub {
                ring: Mutex::new(Ring {
                    budget: limits.buffer_bytes,
                    ..Ring::default()
                }),
                max_viewers: AtomicUsize::new(limits.max_viewers),
                viewers: AtomicUsize::new(0),
                lost: AtomicU64::new(0),
                end: watch::channel(0).0,
                wake_pending: AtomicBool::new(false),
                waker: waker.thread().clone(),
                clock: Mutex::new(Clock::system()),
            }
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding it cannot leave the ring inconsistent enough to matter.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_limits(&self, limits: Limits) {
        self.max_viewers
            .store(limits.max_viewers, Ordering::Relaxed);
        self.ring().budget = limits.buffer_bytes;
    }

    pub fn watching(&self) -> bool {
        self.viewers.load(Ordering::Relaxed) > 0
    }

    pub fn set_clock(&self, clock: Clock) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = clock;
    }

    /// The time events are stamped with.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.lock().unwrap_or_else(|e| e.into_inner()).now()
    }

    /// A new viewer, seeing events from now on; refused past `max_viewers`.
    pub fn subscribe(self: &Arc<Self>) -> Result<Viewer, TooManyViewers> {
        let max_viewers = self.max_viewers.load(Ordering::Relaxed);
        self.viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_viewers).then_some(n + 1)
            })
            .map_err(|_| TooManyViewers { max_viewers })?;
        let next = self.ring().end();
        Ok(Viewer {
            hub: self.clone(),
            next,
            end: self.end.subscribe(),
        })
    }

    /// Appends an event; the waker thread, not the caller, wakes the viewers.
    pub fn push(&self, event: LiveEvent) {
        if !self.watching() {
            // The last viewer left after the check: nobody would read it.
            return;
        }
        self.ring().push(Arc::new(event));
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            self.waker.unpark();
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            viewers: self.viewers.load(Ordering::Relaxed),
            buffered_bytes: self.ring().bytes,
            lost_total: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// The waker thread: after each publish (many at once when they come fast) tells waiting
/// viewers where the ring ends, which costs a wake per viewer. Ends with its hub.
fn wake_viewers(hub: Weak<Hub>) {
    loop {
        // The timeout only lets the thread see its hub gone.
        std::thread::park_timeout(Duration::from_secs(1));
        let Some(hub) = hub.upgrade() else {
            return;
        };
        if hub.wake_pending.swap(false, Ordering::AcqRel) {
            let end = hub.ring().end();
            hub.end.send_replace(end);
        }
    }
}

/// Events a viewer reads at once, and how many it lost just before them.
#[derive(Debug, Default)]
pub struct Batch {
    pub lost: u64,
    pub events: Vec<Arc<LiveEvent>>,
}

/// One viewer: where it is in the ring. Counts against `max_viewers` while it lives.
pub struct Viewer {
    hub: Arc<Hub>,
    /// The number of the next event this viewer reads.
    next: u64,
    end: watch::Receiver<u64>,
}

impl Viewer {
    /// The events waiting, about `max_bytes` of them (at least one), or `None` when there
    /// are none and nothing was lost.
    pub fn try_next(&mut self, max_bytes: usize) -> Option<Batch> {
        let ring = self.hub.ring();
        let mut batch = Batch::default();
        if self.next < ring.first {
            batch.lost = ring.first - self.next;
            self.next = ring.first;
        }
        let start = usize::try_from(self.next - ring.first).unwrap_or(usize::MAX);
        let mut bytes = 0;
        for event in ring.events.iter().skip(start) {
            if bytes >= max_bytes {
                break;
            }
            bytes += event.cost();
            batch.events.push(event.clone());
        }
        drop(ring);
        self.next += batch.events.len() as u64;
        if batch.lost > 0 {
            self.hub.lost.fetch_add(batch.lost, Ordering::Relaxed);
        }
        (batch.lost > 0 || !batch.events.is_empty()).then_some(batch)
    }

    /// Waits for events (see `try_next`).
    pub async fn next(&mut self, max_bytes: usize) -> Batch {
        loop {
            // Marked seen before looking, so a wake after the look is not missed.
            self.end.borrow_and_update();
            if let Some(batch) = self.try_next(max_bytes) {
                return batch;
            }
            if self.end.changed().await.is_err() {
                // The hub lives as long as this viewer holds it: never happens.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.hub.viewers.fetch_sub(1, Ordering::AcqRel);
        let mut ring = self.hub.ring();
        // The last one gone: nobody will read what the ring holds.
        if self.hub.viewers.load(Ordering::Acquire) == 0 {
            let end = ring.end();
            ring.events.clear();
            ring.first = end;
            ring.bytes = 0;
        }
    }
}

/// The process's hub.
fn hub() -> &'static Arc<Hub> {
    static HUB: OnceLock<Arc<Hub>> = OnceLock::new();
    HUB.get_or_init(|| Hub::new(Limits::default()))
}

/// Applies `[admin] max_viewers` and `viewer_buffer_bytes` (at start); events are
/// stamped by `clock` from then on.
pub fn configure(limits: Limits, clock: Clock) {
    hub().set_limits(limits);
    hub().set_clock(clock);
}

/// Whether anyone watches: check before building an event.
pub fn watching() -> bool {
    hub().watching()
}

pub fn subscribe() -> Result<Viewer, TooManyViewers> {
    hub().subscribe()
}

pub fn stats() -> Stats {
    hub().stats()
}

/// Sends `fields` (an object) as an event of `kind`, stamped with the time; `raw` is a
/// JSON document (a message as stored) added under its name as it is, unparsed.
pub fn publish(
    kind: &'static str,
    source: Option<&str>,
    destination: Option<&str>,
    message_type: Option<MessageType>,
    mut fields: Value,
    raw: Option<(&'static str, &[u8])>,
) {
    if let Some(object) = fields.as_object_mut() {
        object.insert("kind".into(), json!(kind));
        object.insert(
            "at".into(),
            json!(hub()
                .now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        if let Some(source) = source {
            object.insert("source".into(), json!(source));
        }
        if let Some(destination) = destination {
            object.insert("destination".into(), json!(destination));
        }
        if let Some(t) = message_type {
            object.insert("type".into(), json!(t.as_str()));
        }
    }
    let mut json = fields.to_string();
    if let Some((name, document)) = raw {
        if json.ends_with('}') && std::str::from_utf8(document).is_ok() {
            json.pop();
            if json.len() > 1 {
                json.push(',');
            }
            json.push_str(&format!("\"{name}\":"));
            json.push_str(std::str::from_utf8(document).unwrap_or("null"));
            json.push('}');
        }
    }
    // serde_json leaves the line separators JSON allows in strings raw (a message's event
    // name in the summary), and `fanout tap` prints each event as one line.
    let mut bytes = json.into_bytes();
    crate::json::keep_on_one_line(&mut bytes, 0);
    let json = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let event = LiveEvent {
        source: source.map(str::to_string),
        destination: destination.map(str::to_string),
        message_type: message_type.map(MessageType::as_str),
        json,
    };
    hub().push(event);
}

/// What a viewer asked to see; `None` fields match everything.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    pub source: Option<String>,
    pub destination: Option<String>,
    #[serde(rename = "type")]
    pub message_type: Option<String>,
}

impl Filter {
    pub fn matches(&self, event: &LiveEvent) -> bool {
        let field = |wanted: &Option<String>, have: Option<&str>| {
            wanted.as_deref().is_none_or(|w| have == Some(w))
        };
        field(&self.source, event.source.as_deref())
            && field(&self.destination, event.destination.as_deref())
            && field(&self.message_type, event.message_type)
    }
}

/// The parts of a stored message a viewer's table shows, read without building the
/// whole document: `{"messageId", "event"}` (a track's event, else a page's name).
pub fn summary(json: &[u8]) -> (Value, Option<MessageType>) {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "messageId", borrow)]
        message_id: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        event: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        name: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "type", borrow)]
        message_type: Option<std::borrow::Cow<'a, str>>,
    }
    match serde_json::from_slice::<Peek>(json) {
        Ok(p) => (
            json!({"messageId": p.message_id, "event": p.event.or(p.name)}),
            p.message_type.as_deref().and_then(MessageType::parse),
        ),
        Err(_) => (json!({}), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize, bytes: usize) -> LiveEvent {
        LiveEvent {
            source: Some("web".into()),
            destination: None,
            message_type: None,
            json: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(bytes)),
        }
    }

    #[test]
    fn a_viewer_that_does_not_read_holds_at_most_its_byte_budget_and_is_told_what_it_lost() {
        let budget = 64 * 1024;
        let hub = Hub::new(Limits {
            max_viewers: 4,
            buffer_bytes: budget,
        });
        let mut stalled = hub.subscribe().unwrap();
        for n in 0..10_000 {
            hub.push(event(n, 1000));
            assert!(hub.stats().buffered_bytes <= budget, "{:?}", hub.stats());
        }
        let held = hub.ring().events.len();
        assert!(held > 0 && held < 100, "{held}");
        let batch = stalled.try_next(usize::MAX).expect("events");
        assert_eq!(batch.lost, (10_000 - held) as u64);
        assert_eq!(batch.events.len(), held);
        assert!(batch
            .events
            .last()
            .unwrap()
            .json
            .starts_with("{\"n\":9999,"));
        assert_eq!(hub.stats().lost_total, batch.lost);
        assert!(stalled.try_next(usize::MAX).is_none(), "all read");
    }

    #[test]
    fn an_event_larger_than_the_budget_is_still_shown() {
        let hub = Hub::new(Limits {
            max_viewers: 1,
            buffer_bytes: 100,
        });
        let mut viewer = hub.subscribe().unwrap();
        hub.push(event(0, 500));
        hub.push(event(1, 500));
        let batch = viewer.try_next(usize::MAX).unwrap();
        assert_eq!((batch.lost, batch.events.len()), (1, 1));
    }

    #[test]
    fn viewers_past_max_viewers_are_refused_until_one_leaves() {
        let hub = Hub::new(Limits {
            max_viewers: 2,
            buffer_bytes: 1 << 20,
        });
        let first = hub.subscribe().unwrap();
        let _second = hub.subscribe().unwrap();
        assert_eq!(
            hub.subscribe().err(),
            Some(TooManyViewers { max_viewers: 2 })
        );
        drop(first);
        assert!(hub.subscribe().is_ok());
    }

    #[test]
    fn the_last_viewer_leaving_frees_the_ring() {
        let hub = Hub::new(Limits::default());
        let viewer = hub.subscribe().unwrap();
        hub.push(event(0, 1000));
        assert!(hub.stats().buffered_bytes > 1000);
        drop(viewer);
        assert_eq!(hub.stats().buffered_bytes, 0);
        assert!(!hub.watching());
        hub.push(event(1, 1000));
        assert_eq!(
            hub.stats().buffered_bytes,
            0,
            "nobody watches: nothing kept"
        );
    }

    #[tokio::test]
    async fn a_waiting_viewer_is_woken_by_a_publish_and_reads_in_batches() {
        let hub = Hub::new(Limits::default());
        let mut viewer = hub.subscribe().unwrap();
        let reader = tokio::spawn(async move {
            let batch = viewer.next(usize::MAX).await;
            (viewer, batch)
        });
        tokio::task::yield_now().await;
        hub.push(event(0, 10));
        let (mut viewer, batch) = reader.await.unwrap();
        assert_eq!((batch.lost, batch.events.len()), (0, 1));
        for n in 1..=3 {
            hub.push(event(n, 1000));
        }
        // At least one event a read, then about `max_bytes`.
        let batch = viewer.next(1).await;
        assert_eq!(batch.events.len(), 1);
        let batch = viewer.next(usize::MAX).await;
        assert_eq!(batch.events.len(), 2);
    }

    #[test]
    fn an_event_is_one_line_whatever_its_fields_hold() {
        let mut viewer = subscribe().expect("a viewer");
        let name = "a\u{2028}b\u{85}\u{2029}";
        publish(
            "accepted",
            Some("one-line-test"),
            None,
            None,
            json!({ "event": name }),
            Some(("message", br#"{"p":"\u2028"}"#)),
        );
        // The hub is the process's: other tests' events may come first.
        let event = std::iter::from_fn(|| viewer.try_next(usize::MAX))
            .flat_map(|batch| batch.events)
            .find(|event| event.source.as_deref() == Some("one-line-test"))
            .expect("the event was not published");
        assert!(!crate::json::breaks_lines(&event.json), "{:?}", event.json);
        let parsed: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(parsed["event"], name);
        assert_eq!(parsed["message"]["p"], "\u{2028}");
    }

    #[tokio::test(start_paused = true)]
    async fn events_are_stamped_by_the_configured_clock() {
        let start = chrono::DateTime::from_timestamp(978_307_200, 0).unwrap();
        configure(Limits::default(), Clock::following_tokio(start));
        let mut viewer = subscribe().expect("a viewer");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        publish("accepted", Some("clock-test"), None, None, json!({}), None);
        configure(Limits::default(), Clock::system());
        let event = std::iter::from_fn(|| viewer.try_next(usize::MAX))
            .flat_map(|batch| batch.events)
            .find(|event| event.source.as_deref() == Some("clock-test"))
            .expect("the event was not published");
        let parsed: Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(parsed["at"], "2001-01-01T00:00:01.500Z");
    }
}
