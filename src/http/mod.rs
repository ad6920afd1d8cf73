//! Stage 1: the HTTP surface. The whole tower stack is assembled in `router`, outermost
//! layer first, so it can be read in one place.

mod admin;
mod admission;
mod browser;
mod config;
mod error;
mod functions;
mod handlers;
mod live;
mod observe;
pub mod ops;
mod query;
mod regulations;

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;

pub use admission::{AdmissionConfig, BodyCut};
pub use config::{BrowserConfig, CorsConfig};
pub use error::ApiError;

use admission::AdmissionLayer;

use crate::auth::Sources;
use crate::control::Control;
use crate::dedupe::Dedupe;
use crate::ingest::LimitsConfig;
use crate::message::MessageType;
use crate::queue::DeadLetters;
use crate::queue::Queue;

/// What request handlers share.
pub struct App {
    /// Replaced whole on config reload; a request sees the old set or the new one.
    pub sources: Arc<arc_swap::ArcSwap<Sources>>,
    pub dedupe: Arc<Dedupe>,
    /// Taught by the identify and alias calls stored.
    pub identity: Arc<crate::identity::Identity>,
    /// Privacy regulations (`/admin/regulations`).
    pub regulations: Arc<crate::regulations::Regulations>,
    /// The subjects whose messages are answered 200 and dropped.
    pub suppression: crate::regulations::Suppression,
    pub queue: Queue,
    pub limits: LimitsConfig,
    /// Seconds clients are told to wait after a 429 or 503.
    pub retry_after: u32,
    pub dead_letters: Arc<DeadLetters>,
    /// Bearer token for `/admin/...`; those routes answer 404 without one.
    pub admin_token: Option<String>,
    /// Asks the server to reload its config (`POST /admin/reload`) or replay a
    /// destination (`POST /admin/replay`).
    pub control: tokio::sync::mpsc::Sender<Control>,
    /// Wall time: what `receivedAt` says.
    pub clock: crate::clock::Clock,
    /// Where the browser settings send the library.
    pub browser: BrowserConfig,
    /// Peers whose `X-Forwarded-Host`/`-Proto` are believed (`server.trusted_proxies`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The address a request's connection comes from, put on each request by the accept
/// loop (`server::connections`): whom `server.trusted_proxies` is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Single-call paths: long names, and the browser library's one-letter ones.
const SINGLE_CALLS: [(&str, &str, MessageType); 6] = [
    ("/v1/identify", "/v1/i", MessageType::Identify),
    ("/v1/track", "/v1/t", MessageType::Track),
    ("/v1/page", "/v1/p", MessageType::Page),
    ("/v1/screen", "/v1/s", MessageType::Screen),
    ("/v1/group", "/v1/g", MessageType::Group),
    ("/v1/alias", "/v1/a", MessageType::Alias),
];

/// The public routes and the middleware stack around them; the operator routes too
/// unless they have a listener of their own (`with_admin` false).
pub fn router(
    app: Arc<App>,
    cors: &CorsConfig,
    admission: AdmissionConfig,
    with_admin: bool,
) -> Router {
    let mut routes = Router::new();
    for (long, short, kind) in SINGLE_CALLS {
        let handler = post(move |state, request| handlers::single(state, kind, request));
        routes = routes.route(long, handler.clone()).route(short, handler);
    }
    let routes = routes
        .route("/v1/batch", post(handlers::batch))
        .route("/v1/import", post(handlers::batch))
        .route("/v1/b", post(handlers::batch))
        .route("/v1/m", post(handlers::client_metrics))
        .route(
            "/v1/functions/{write_key}",
            post(functions::source_function).get(functions::source_function),
        )
        .route("/v1/projects/{write_key}/settings", get(browser::settings))
        .route("/v1/pixel/{call}", get(browser::pixel))
        .route("/event/batch", post(handlers::event_batch))
        .route("/api/v1/event", post(handlers::person_event))
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready));
    ops::watch(&app);
    let routes = if with_admin {
        routes.merge(operator_routes())
    } else {
        routes
    };
    layered(routes, app, cors, admission)
}

/// The operator routes alone, for `[admin] listen`.
pub fn admin_router(app: Arc<App>, cors: &CorsConfig, admission: AdmissionConfig) -> Router {
    let routes = operator_routes()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready));
    layered(routes, app, cors, admission)
}

/// Metrics, and behind the admin token reload and dead letters: on their own listener
/// when `[admin] listen` is set.
fn operator_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/replay", post(admin::replay))
        .route("/admin/dead-letters", get(admin::list_dead_letters))
        .route(
            "/admin/regulations",
            post(regulations::add).get(regulations::list),
        )
        .route("/admin/regulations/{id}", delete(regulations::remove))
        .route("/debugger", get(live::page))
        .route("/debugger/events", get(live::events))
        .route("/debugger/session", post(live::session))
        .route("/debugger/debugger.js", get(live::script))
        .route("/debugger/debugger.css", get(live::style))
        .route(
            "/admin/dead-letters/replay",
            post(admin::replay_dead_letters),
        )
}

/// Wraps routes in the middleware stack, outermost layer first.
fn layered(
    routes: Router<Arc<App>>,
    app: Arc<App>,
    cors_config: &CorsConfig,
    admission: AdmissionConfig,
) -> Router {
    let request_limit = app.limits.max_request_bytes;
    let routes = routes
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(app);

    let stack = ServiceBuilder::new()
        // The request's id, log span, metrics and log lines.
        .layer(observe::ObserveLayer::default())
        // Before admission: preflights and 429s carry CORS headers too.
        .layer(cors(cors_config))
        // In-flight slots: a 429 is sent before the body is read (shed load, never
        // queue); the body is guarded (gap, deadline, and cut when it is the slowest
        // and every slot is wanted), on the wire bytes, before decoding.
        .layer(AdmissionLayer::new(admission))
        .layer(axum::middleware::map_response(move |r| {
            json_errors(r, request_limit)
        }))
        // Wire size first (a declared Content-Length over the limit is refused unread),
        // then decoding; handlers apply the same limit to the decoded bytes.
        .layer(RequestBodyLimitLayer::new(request_limit))
        .layer(RequestDecompressionLayer::new().gzip(true).deflate(true));
    routes.layer(stack)
}

fn cors(config: &CorsConfig) -> CorsLayer {
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        // Echo the origin rather than `*`, so credentialed browser requests work too.
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
        .allow_headers([
            CONTENT_TYPE,
            AUTHORIZATION,
            HeaderName::from_static("authentication"),
            HeaderName::from_static("x-retry-count"),
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(config.max_age)
}

/// tower-http's layers answer 413/415 with plain text; clients get the JSON error body.
async fn json_errors<B>(response: http::Response<B>, request_limit: usize) -> Response
where
    http::Response<B>: IntoResponse,
{
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response.into_response();
    }
    match response.status() {
        http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
            limit: request_limit,
        }
        .into_response(),
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedEncoding.into_response(),
        _ => response.into_response(),
    }
}
