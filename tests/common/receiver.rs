//! A programmable downstream HTTP server on 127.0.0.1, standing in for a webhook endpoint or
//! Segment: it records every request and answers from a script (queued replies, then an
//! optional content-dependent responder, then a default), and can be stopped and restarted
//! on the same port to play a destination that is down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One answer: status, headers, body, and how long to wait before sending it.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Overrides the receiver's delay for this answer.
    pub delay: Option<Duration>,
}

impl Reply {
    /// `status` with the body `{}`.
    pub fn status(status: u16) -> Reply {
        Reply::json(status, "{}")
    }

    /// `status` with a JSON `body`.
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
            delay: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }
}

/// What the receiver saw of one request, and what it answered.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    /// When the request head had arrived.
    pub at: Instant,
    /// When the answer was handed to the connection; `None` while pending or when the
    /// receiver was stopped before answering.
    pub answered_at: Option<Instant>,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The body as sent on the wire.
    pub raw_body: Vec<u8>,
    /// The body, gunzipped when `Content-Encoding: gzip`.
    pub body: Vec<u8>,
    /// The status answered; 0 when no answer was sent.
    pub status: u16,
}

/// Bodies of every request to `path` answered 2xx, in the order they arrived.
pub fn bodies(requests: &[ReceivedRequest], path: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.path == path && r.ok())
        .map(|r| r.json().unwrap())
        .collect()
}

/// The items of the `array` of every 2xx body to `path`, by their `id` field: what a
/// vendor's batch endpoint took, one entry per event.
pub fn items_by(
    requests: &[ReceivedRequest],
    path: &str,
    array: &str,
    id: &str,
) -> std::collections::BTreeMap<String, Value> {
    bodies(requests, path)
        .iter()
        .flat_map(|b| b[array].as_array().unwrap().clone())
        .map(|e| (e[id].as_str().unwrap().to_string(), e))
        .collect()
}

impl ReceivedRequest {
    /// A header as text (the first, when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The (decoded) body as JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Answered with a 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The messages in the body, whichever shape it has: a JSON array of messages
    /// (webhook `payload = "array"`), `{"batch":[...]}` (Segment relay), or one message
    /// object (webhook `payload = "message"`).
    pub fn messages(&self) -> Vec<Value> {
        match self.json() {
            Some(Value::Array(items)) => items,
            Some(Value::Object(mut object)) => match object.remove("batch") {
                Some(Value::Array(items)) => items,
                Some(other) => {
                    object.insert("batch".into(), other);
                    vec![Value::Object(object)]
                }
                None => vec![Value::Object(object)],
            },
            _ => Vec::new(),
        }
    }

    /// The `messageId`s of `messages()`, in order.
    pub fn message_ids(&self) -> Vec<String> {
        ids(&self.messages())
    }

    pub fn contains_message(&self, id: &str) -> bool {
        self.messages()
            .iter()
            .any(|m| m["messageId"].as_str() == Some(id))
    }
}

/// The `messageId` of each message (empty when missing).
pub fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Chooses the answer from the request's content; `None` falls back to the default.
pub type Responder = Arc<dyn Fn(&ReceivedRequest) -> Option<Reply> + Send + Sync>;

struct Script {
    queue: VecDeque<Reply>,
    responder: Option<Responder>,
    default: Reply,
    delay: Duration,
}

struct Shared {
    requests: Mutex<Vec<ReceivedRequest>>,
    script: Mutex<Script>,
    /// A duplicate of each open connection's socket, so `stop` can shut them down.
    connections: Mutex<HashMap<u64, std::net::TcpStream>>,
    next_connection: AtomicU64,
    /// Bumped by `stop`: a request that arrived before it is not answered.
    generation: AtomicU64,
}

/// The downstream server. Dropping it stops it.
pub struct Receiver {
    port: u16,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Receiver {
    /// Starts on a free port, answering `200 {}` until told otherwise.
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let receiver = Receiver {
            port,
            shared: Arc::new(Shared {
                requests: Mutex::new(Vec::new()),
                script: Mutex::new(Script {
                    queue: VecDeque::new(),
                    responder: None,
                    default: Reply::status(200),
                    delay: Duration::ZERO,
                }),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(0),
                generation: AtomicU64::new(0),
            }),
            server: Mutex::new(None),
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&self, listener: TcpListener) {
        let router = Router::new()
            .fallback(handle)
            .with_state(self.shared.clone());
        let listener = TrackingListener {
            listener,
            shared: self.shared.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Queues replies, used one per request (in arrival order) before anything else.
    pub fn push_reply(&self, reply: Reply) {
        self.shared.script.lock().unwrap().queue.push_back(reply);
    }

    /// The answer once the queue is empty and the responder (if any) declines.
    pub fn set_default(&self, reply: Reply) {
        self.shared.script.lock().unwrap().default = reply;
    }

    /// Answers from the request's content once the queue is empty.
    pub fn respond_with(
        &self,
        responder: impl Fn(&ReceivedRequest) -> Option<Reply> + Send + Sync + 'static,
    ) {
        self.shared.script.lock().unwrap().responder = Some(Arc::new(responder));
    }

    /// Back to queue + default only.
    pub fn clear_responder(&self) {
        self.shared.script.lock().unwrap().responder = None;
    }

    /// Waits this long before each answer (unless the reply sets its own delay).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.script.lock().unwrap().delay = delay;
    }

    /// Closes the listener and every open connection: the port refuses connections until
    /// `restart`. Requests being handled are not answered.
    pub async fn stop(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let task = self.server.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let connections: Vec<_> = self
            .shared
            .connections
            .lock()
            .unwrap()
            .drain()
            .map(|(_, c)| c)
            .collect();
        for connection in connections {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port (retrying a few seconds if it is briefly taken).
    pub async fn restart(&self) {
        assert!(self.server.lock().unwrap().is_none(), "stop it first");
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("[receiver] rebinding port {}: {e}", self.port);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot listen on port {} again: {e}", self.port),
            }
        };
        self.serve(listener);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests answered so far whose body holds message `id`.
    pub fn requests_with(&self, id: &str) -> Vec<ReceivedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.status != 0 && r.contains_message(id))
            .collect()
    }

    /// The messages of the requests answered with a 2xx, in arrival order (repeats kept).
    pub fn messages(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.ok())
            .flat_map(|r| r.messages())
            .collect()
    }

    /// `messageId`s of `messages()`.
    pub fn message_ids(&self) -> Vec<String> {
        ids(&self.messages())
    }

    /// Waits until the 2xx-answered requests hold at least `n` distinct messageIds (or the
    /// timeout passes); returns `messages()`.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            let distinct: HashSet<&str> = messages
                .iter()
                .filter_map(|m| m["messageId"].as_str())
                .collect();
            if distinct.len() >= n || Instant::now() > deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every id in `wanted` arrived in a 2xx-answered request (or the timeout
    /// passes); returns the ids still missing.
    pub async fn wait_for_ids(&self, wanted: &HashSet<String>, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: HashSet<String> = self.message_ids().into_iter().collect();
            let mut missing: Vec<String> = wanted.difference(&got).cloned().collect();
            if missing.is_empty() || Instant::now() > deadline {
                missing.sort();
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `done(requests())` holds (or the timeout passes); returns `requests()`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedRequest]) -> bool,
    ) -> Vec<ReceivedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if done(&requests) || Instant::now() > deadline {
                return requests;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
        for (_, connection) in self.shared.connections.lock().unwrap().drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let at = Instant::now();
    let generation = shared.generation.load(Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let raw_body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let gzipped = parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let body = if gzipped {
        let mut decoded = Vec::new();
        match flate2::read::GzDecoder::new(raw_body.as_slice()).read_to_end(&mut decoded) {
            Ok(_) => decoded,
            Err(e) => {
                eprintln!("[receiver] gzip body does not decode: {e}");
                raw_body.clone()
            }
        }
    } else {
        raw_body.clone()
    };
    let mut received = ReceivedRequest {
        at,
        answered_at: None,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        raw_body,
        body,
        status: 0,
    };

    // Queued replies are taken in arrival order (taken and recorded under one lock); the
    // responder runs without a lock held.
    let queued = {
        let mut script = shared.script.lock().unwrap();
        let reply = script.queue.pop_front();
        reply.map(|reply| (reply, record(&shared, &received)))
    };
    let (reply, index) = match queued {
        Some(queued) => queued,
        None => {
            let (responder, default) = {
                let script = shared.script.lock().unwrap();
                (script.responder.clone(), script.default.clone())
            };
            let reply = responder.and_then(|r| r(&received)).unwrap_or(default);
            (reply, record(&shared, &received))
        }
    };

    let delay = reply
        .delay
        .unwrap_or_else(|| shared.script.lock().unwrap().delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if shared.generation.load(Ordering::SeqCst) != generation {
        // Stopped meanwhile: the connection is gone, nothing is answered.
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::empty())
            .unwrap();
    }
    received.status = reply.status;
    received.answered_at = Some(Instant::now());
    {
        let mut requests = shared.requests.lock().unwrap();
        requests[index].status = received.status;
        requests[index].answered_at = received.answered_at;
    }

    let mut response = Response::builder()
        .status(StatusCode::from_u16(reply.status).expect("valid status"))
        .body(Body::from(reply.body))
        .unwrap();
    for (name, value) in &reply.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    response
}

/// Appends `received` to the log; returns its index.
fn record(shared: &Shared, received: &ReceivedRequest) -> usize {
    let mut requests = shared.requests.lock().unwrap();
    requests.push(received.clone());
    requests.len() - 1
}

/// Accepts like a `TcpListener`, keeping a duplicate of each connection's socket for `stop`.
struct TrackingListener {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for TrackingListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("[receiver] accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(duplicate) = stream.as_fd().try_clone_to_owned() else {
                continue;
            };
            let id = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
            self.shared
                .connections
                .lock()
                .unwrap()
                .insert(id, std::net::TcpStream::from(duplicate));
            let tracked = TrackedStream {
                stream,
                id,
                shared: self.shared.clone(),
            };
            return (tracked, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection whose socket duplicate is released when the connection ends.
struct TrackedStream {
    stream: TcpStream,
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.shared.connections.lock().unwrap().remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
}
