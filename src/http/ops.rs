//! `GET /metrics`: the Prometheus text format, mounted on the main router or, with
//! `admin.listen`, on the admin listener instead.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;

use super::App;

/// Renders every metric of the process.
pub async fn metrics() -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

/// Installs the recorder, and has each scrape read the queue's and the dedupe window's
/// state from `app` while it lives (a weak reference: the metrics never keep the queue
/// open at shutdown).
pub(super) fn watch(app: &Arc<App>) {
    crate::metrics::install();
    let app = Arc::downgrade(app);
    crate::metrics::on_scrape(move || {
        let Some(app) = app.upgrade() else {
            return false;
        };
        let (held, lags) = app.queue.state();
        crate::metrics::queue_state(held, lags);
        crate::metrics::dedupe_state(app.dedupe.len(), app.dedupe.evicted());
        let live = crate::live::stats();
        crate::metrics::live_state(live.viewers, live.buffered_bytes, live.lost_total);
        true
    });
}
