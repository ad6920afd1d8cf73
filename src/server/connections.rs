//! Accepting connections and bounding what each one may hold.
//!
//! Every connection is in one of three phases: waiting for a request's headers (from
//! connecting, or from the first byte of a later request), serving a request, or idle
//! between requests. Headers must arrive within `header_timeout` and an idle connection
//! is closed after `idle_timeout`; a request's body is the admission layer's business
//! (`http::admission`). Connections are capped at `max_connections`, never more than the
//! open-file limit allows: at the cap the longest-idle (then the slowest-to-send-headers)
//! connections are closed to make room, and new ones wait in the kernel's backlog.
//!
//! When a connection ends after an answer while the client may still be sending (a 413
//! for a declared body over the limit), the socket is not closed at once: what still
//! arrives is read and dropped for a bounded time ("lingering close", as nginx does), so
//! a client that sends its whole body before reading sees the answer, not a reset.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::http::Peer;
use crate::throttle::LogThrottle;

/// Lingering close: how long, and how much, is read and dropped at most.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 64 * 1024 * 1024;
/// File descriptors kept back from connections: queue segments, cursors, the
/// dead-letter store, destinations' outbound connections, logs.
const RESERVED_FDS: u64 = 256;

/// What one listener's connections may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The connections of every listener of the process, for the one cap they share.
pub struct Connections {
    max: usize,
    open: watch::Sender<usize>,
    states: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    epoch: Instant,
    cap_log: LogThrottle,
    accept_log: LogThrottle,
}

impl Connections {
    /// A cap of `configured`, lowered to what the open-file limit allows (after raising
    /// the soft limit to the hard one, as Go's runtime does).
    pub fn new(configured: usize) -> Arc<Connections> {
        let max = match open_file_limit() {
            Some(files) => {
                let room = files.saturating_sub(RESERVED_FDS).max(files / 2).max(1);
                let max = configured.min(usize::try_from(room).unwrap_or(usize::MAX));
                if max < configured {
                    tracing::warn!(
                        configured,
                        open_file_limit = files,
                        max_connections = max,
                        "server.max_connections lowered to fit the open-file limit \
                         (raise it with `ulimit -n` or LimitNOFILE=)"
                    );
                }
                max
            }
            None => configured,
        };
        Arc::new(Connections {
            max,
            open: watch::Sender::new(0),
            states: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
            cap_log: LogThrottle::new(Duration::from_secs(10)),
            accept_log: LogThrottle::new(Duration::from_secs(10)),
        })
    }

    /// The cap in effect.
    pub fn max(&self) -> usize {
        self.max
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn add(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            phase: AtomicU8::new(HEADERS),
            since_ms: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        self.states
            .lock()
            .expect("connections lock poisoned")
            .insert(id, state.clone());
        self.open.send_modify(|n| *n += 1);
        crate::metrics::connections_open(*self.open.borrow());
        Registered {
            connections: self.clone(),
            id,
            state,
        }
    }

    /// At the cap: closes the oldest tenth of the connections that are idle or still
    /// sending headers (idle ones first). None is serving a request.
    fn make_room(&self) {
        let states = self.states.lock().expect("connections lock poisoned");
        let mut waiting: Vec<(u8, u64, &Arc<ConnState>)> = states
            .values()
            .map(|s| {
                (
                    s.phase.load(Ordering::Relaxed),
                    s.since_ms.load(Ordering::Relaxed),
                    s,
                )
            })
            .filter(|&(phase, _, _)| phase != SERVING)
            .collect();
        // IDLE sorts before HEADERS: a kept-alive connection is the cheapest to lose.
        waiting.sort_unstable_by_key(|&(phase, since, _)| (std::cmp::Reverse(phase), since));
        let closing = waiting.len().div_ceil(10);
        for (_, _, state) in waiting.iter().take(closing) {
            state.close.notify_one();
        }
        if self.cap_log.ready() {
            tracing::warn!(
                max_connections = self.max,
                closing,
                "connection cap reached (server.max_connections): closing the longest-idle \
                 connections; new ones wait until there is room"
            );
        }
    }

    /// Accepts connections on `listener` and serves `router` on each until `stop`; then
    /// asks every connection to finish its request and close, and returns once all have.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        router: Router,
        limits: ConnectionLimits,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut open = self.open.subscribe();
        loop {
            if *open.borrow() >= self.max {
                self.make_room();
                tokio::select! {
                    _ = open.wait_for(|&n| n < self.max) => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.wait_for(|&s| s) => break,
                }
                continue;
            }
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|&s| s) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Answers go out as written: each is one write, and a live-view stream's
                    // small chunks must not wait for the client's delayed ACK (Nagle).
                    let _ = stream.set_nodelay(true);
                    let registered = self.add();
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        router.clone(),
                        registered,
                        limits,
                        stop.clone(),
                    ));
                }
                Err(e) => self.accept_failed(e).await,
            }
        }
        drop(listener);
        let _ = open.wait_for(|&n| n == 0).await;
    }

    /// Out of file descriptors (or another failure to accept): say so, make room, and
    /// pause briefly rather than spin.
    async fn accept_failed(&self, e: std::io::Error) {
        let out_of_files = matches!(e.raw_os_error(), Some(24 | 23)); // EMFILE, ENFILE
        if self.accept_log.ready() {
            tracing::error!(error = %e, "cannot accept a connection");
        }
        if out_of_files {
            self.make_room();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The process's open-file limit, raised first from the soft to the hard limit.
fn open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current
}

const HEADERS: u8 = 0;
const SERVING: u8 = 1;
const IDLE: u8 = 2;

/// One connection's phase, since when, and how to close it from outside.
struct ConnState {
    phase: AtomicU8,
    since_ms: AtomicU64,
    close: Notify,
}

/// A connection's place in `Connections`, given up when the connection task ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
    state: Arc<ConnState>,
}

impl Registered {
    fn enter(&self, phase: u8) {
        self.state
            .since_ms
            .store(self.connections.now_ms(), Ordering::Relaxed);
        self.state.phase.store(phase, Ordering::Relaxed);
    }

    /// When the current phase runs out (none while a request is served).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let limit = match self.state.phase.load(Ordering::Relaxed) {
            HEADERS => limits.header_timeout,
            IDLE => limits.idle_timeout,
            _ => return None,
        };
        let since = self.state.since_ms.load(Ordering::Relaxed);
        Some(self.connections.epoch + Duration::from_millis(since) + limit)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections
            .states
            .lock()
            .expect("connections lock poisoned")
            .remove(&self.id);
        self.connections.open.send_modify(|n| *n -= 1);
        crate::metrics::connections_open(*self.connections.open.borrow());
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    registered: Registered,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let registered = Arc::new(registered);
    let watched = Watched {
        stream,
        registered: registered.clone(),
    };
    let on_request = registered.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        on_request.enter(SERVING);
        request.extensions_mut().insert(Peer(peer));
        let router = router.clone();
        let after = on_request.clone();
        Box::pin(async move {
            let response = router.oneshot(request.map(Body::new)).await;
            after.enter(IDLE);
            response
        })
    });
    let mut conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(watched), service);
    let mut stopping = false;
    let finished = loop {
        let deadline = registered.deadline(&limits);
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
            _ = sleep_until(deadline), if deadline.is_some() => {
                // The phase may have moved on since the deadline was taken.
                if registered.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            // Closing for room: never in the middle of a request.
            _ = registered.state.close.notified() => {
                if registered.state.phase.load(Ordering::Relaxed) != SERVING {
                    return;
                }
            }
            _ = stop.wait_for(|&s| s), if !stopping => {
                stopping = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if finished.is_ok() && !stopping {
        registered.enter(IDLE);
        let stream = conn.into_parts().io.into_inner().stream;
        linger(stream).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends our FIN, then reads and drops what the client still sends, until it closes or
/// the bounds are reached; only then is the socket closed (see the module comment).
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let until = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut dropped = 0u64;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => dropped += n as u64,
            _ => return,
        }
    }
}

/// The connection's socket, noting the first byte of a request that follows an idle
/// spell: from then on the headers' timeout runs, not the idle one.
struct Watched {
    stream: TcpStream,
    registered: Arc<Registered>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.registered.state.phase.load(Ordering::Relaxed) == IDLE
        {
            self.registered.enter(HEADERS);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
