//! Admission: which requests get one of the `max_in_flight` slots, and how long a request
//! may hold one while its body arrives.
//!
//! A request takes a slot before its body is read (so a 429 costs the client no upload)
//! and keeps it until it is answered. Its body is guarded three ways: a gap between two
//! chunks longer than `body_timeout`, or a whole body taking longer than `body_deadline`,
//! ends it with 408. And when every slot is taken, the request that has been receiving
//! its body the longest (for at least `SLOW_BODY`) is cut (408) to make room: clients that
//! trickle their bodies cannot keep normal ones out, however many connections they open.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::Request;
use http_body::{Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service, ServiceExt};

use super::ApiError;
use crate::throttle::LogThrottle;

/// A body must have been arriving this long before it may be cut to free its slot: a
/// burst of ordinary requests fills every slot for moments only, and gets 429s.
const SLOW_BODY: Duration = Duration::from_secs(1);
/// How long a request that cut a slow body waits for that slot to come free.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(1);

/// Why a request body was cut short; the request is answered 408.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCut {
    /// No chunk for `server.body_timeout`.
    Stalled,
    /// Not complete within `server.body_deadline`.
    Deadline,
    /// Still arriving after `SLOW_BODY` while every slot was wanted.
    Evicted,
}

impl std::fmt::Display for BodyCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyCut::Stalled => "the request body stalled (server.body_timeout)",
            BodyCut::Deadline => "the request body took too long (server.body_deadline)",
            BodyCut::Evicted => {
                "the request body arrived too slowly while the server needed its slot"
            }
        })
    }
}

impl std::error::Error for BodyCut {}

/// How requests are admitted; see the module comment.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    pub max_in_flight: usize,
    pub body_timeout: Duration,
    pub body_deadline: Duration,
    /// Seconds a 429 tells the client to wait.
    pub retry_after: u32,
}

#[derive(Clone)]
pub struct AdmissionLayer {
    slots: Arc<Slots>,
}

impl AdmissionLayer {
    pub fn new(config: AdmissionConfig) -> AdmissionLayer {
        AdmissionLayer {
            slots: Arc::new(Slots {
                permits: Arc::new(Semaphore::new(config.max_in_flight)),
                receiving: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(0),
                config,
                cut: Default::default(),
                cut_log: LogThrottle::new(Duration::from_secs(10)),
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            slots: self.slots.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    slots: Arc<Slots>,
}

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per request, in `call`: a refusal is an answer (429).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let slots = self.slots.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            // A load balancer's probes and the operator's endpoints must answer under
            // the very load that fills the slots; they have no body to guard.
            if is_operational(request.uri().path()) {
                return inner.oneshot(request).await;
            }
            let Some(permit) = slots.admit().await else {
                return Ok(ApiError::Overloaded {
                    retry_after: slots.config.retry_after,
                }
                .into_response());
            };
            let in_flight = crate::metrics::InFlight::start();
            let request = Slots::guard(&slots, request);
            let response = inner.oneshot(request).await;
            drop((permit, in_flight));
            response
        })
    }
}

/// Probes, metrics and the operator endpoints: never refused for load.
fn is_operational(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics") || path.starts_with("/admin/")
}

/// The slots and the bodies being received in them.
struct Slots {
    permits: Arc<Semaphore>,
    /// Requests whose bodies are still arriving, oldest first.
    receiving: Mutex<BTreeMap<(Instant, u64), Arc<Receiving>>>,
    next_id: AtomicU64,
    config: AdmissionConfig,
    /// Bodies cut since the last log line, by reason (stalled, deadline, evicted).
    cut: [AtomicU64; 3],
    cut_log: LogThrottle,
}

/// One body being received: how to cut it short.
struct Receiving {
    evicted: AtomicBool,
    notify: Arc<Notify>,
}

impl Slots {
    /// A slot: a free one, or the one of the slowest body (cut to make room).
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        if !self.evict_slowest() {
            return None;
        }
        tokio::time::timeout(TAKE_OVER_WAIT, self.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Cuts the body that has been arriving longest, if it has for `SLOW_BODY`.
    fn evict_slowest(&self) -> bool {
        let receiving = self.receiving.lock().expect("admission lock poisoned");
        let slow = receiving.iter().find(|((since, _), r)| {
            since.elapsed() >= SLOW_BODY && !r.evicted.load(Ordering::Relaxed)
        });
        let Some((_, victim)) = slow else {
            return false;
        };
        victim.evicted.store(true, Ordering::Relaxed);
        victim.notify.notify_one();
        true
    }

    /// Wraps a request's body in the guard, unless it has none.
    fn guard(slots: &Arc<Slots>, request: Request<Body>) -> Request<Body> {
        if http_body::Body::is_end_stream(request.body()) {
            return request;
        }
        let started = Instant::now();
        request.map(|inner| {
            Body::new(GuardedBody {
                inner,
                slots: slots.clone(),
                started,
                waiting: None,
                done: false,
            })
        })
    }

    fn count(&self, cut: BodyCut) {
        crate::metrics::body_cut(match cut {
            BodyCut::Stalled => "stalled",
            BodyCut::Deadline => "deadline",
            BodyCut::Evicted => "evicted",
        });
        self.cut[cut as usize].fetch_add(1, Ordering::Relaxed);
        if self.cut_log.ready() {
            let [stalled, deadline, evicted] =
                self.cut.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
            tracing::warn!(
                stalled,
                over_deadline = deadline,
                cut_for_a_slot = evicted,
                "request bodies cut short (408) since the last report"
            );
        }
    }
}

/// A request body under the guard; see the module comment.
struct GuardedBody {
    inner: Body,
    slots: Arc<Slots>,
    started: Instant,
    /// Set up the first time the body has to wait for the client: one that arrives with
    /// its headers (most) never registers, nor arms a timer.
    waiting: Option<Waiting>,
    done: bool,
}

/// A body that has had to wait: its place among the bodies being received, and its timers.
struct Waiting {
    key: (Instant, u64),
    receiving: Arc<Receiving>,
    evicted_wait: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    gap: Pin<Box<Sleep>>,
    deadline: Pin<Box<Sleep>>,
}

impl GuardedBody {
    /// Registers the body as being received (from when it started), so it can be cut.
    fn start_waiting(&mut self) -> &mut Waiting {
        let slots = &self.slots;
        self.waiting.get_or_insert_with(|| {
            let key = (self.started, slots.next_id.fetch_add(1, Ordering::Relaxed));
            let receiving = Arc::new(Receiving {
                evicted: AtomicBool::new(false),
                notify: Arc::new(Notify::new()),
            });
            slots
                .receiving
                .lock()
                .expect("admission lock poisoned")
                .insert(key, receiving.clone());
            Waiting {
                key,
                evicted_wait: Box::pin(receiving.notify.clone().notified_owned()),
                receiving,
                gap: Box::pin(tokio::time::sleep(slots.config.body_timeout)),
                deadline: Box::pin(tokio::time::sleep_until(
                    self.started + slots.config.body_deadline,
                )),
            }
        })
    }

    /// No longer receiving: the body ended, failed or was cut.
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            if let Some(waiting) = &self.waiting {
                self.slots
                    .receiving
                    .lock()
                    .expect("admission lock poisoned")
                    .remove(&waiting.key);
            }
        }
    }

    fn cut(&mut self, why: BodyCut) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finish();
        self.slots.count(why);
        Poll::Ready(Some(Err(Box::new(why))))
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let evicted = this.waiting.as_ref();
        if evicted.is_some_and(|w| w.receiving.evicted.load(Ordering::Relaxed)) {
            return this.cut(BodyCut::Evicted);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(waiting) = &mut this.waiting {
                    let next_gap = Instant::now() + this.slots.config.body_timeout;
                    waiting.gap.as_mut().reset(next_gap);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let waiting = this.start_waiting();
                if waiting.evicted_wait.as_mut().poll(cx).is_ready() {
                    return this.cut(BodyCut::Evicted);
                }
                if waiting.deadline.as_mut().poll(cx).is_ready() {
                    return this.cut(BodyCut::Deadline);
                }
                if waiting.gap.as_mut().poll(cx).is_ready() {
                    return this.cut(BodyCut::Stalled);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        self.finish();
    }
}
