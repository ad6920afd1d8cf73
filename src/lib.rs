//! fanout: a Segment-compatible event proxy.
//!
//! The modules are the pipeline's stages, in the order a message passes them:
//! `http` (tower stack, routes) → `auth` (write key → source) → `ingest` (parse,
//! validate, enrich) → `dedupe` (drop retried messageIds) → `queue` (durable log) →
//! `delivery` (per-destination cursors and retries), which asks `routing` (sources,
//! filters, `integrations`, field edits) whether and in what shape each message goes →
//! `translate` (a message → a destination's event format) → `destinations` (one file per
//! kind). `config` and `server` hold it together.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dedupe;
pub mod delivery;
pub mod destinations;
pub mod http;
pub mod ingest;
pub mod json;
pub mod message;
pub mod metrics;
pub mod pace;
pub mod queue;
pub mod routing;
pub mod server;
pub mod throttle;
pub mod timestamp;
pub mod translate;
