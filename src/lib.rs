//! fanout: a Segment-compatible event proxy.
//!
//! The modules are the pipeline's stages, in the order a message passes them:
//! `server` (accepting connections, start-up, shutdown, reload) → `http` (the tower stack,
//! admission, routes) → `auth` (write key → source) → `ingest` (parse, validate, enrich) →
//! `dedupe` (drop retried messageIds) → `tracking_plan` (the source's plan: block, omit,
//! flag) → `queue` (the durable log) → `delivery` (each
//! destination's cursor, batches and retries), which asks `routing` (sources, filters,
//! `integrations`, field edits) whether and in what shape each message goes →
//! `destinations` (one file or folder per kind; Klaviyo's translation lives in its folder).
//!
//! Beside them: `config` (the file, read and checked as a whole), `control` (the
//! operator's reload and replay requests, passed from `http` to `server`), `identity`
//! (anonymousId → the user it was identified as: learnt at ingest, filled at delivery),
//! `regulations` (privacy suppressions and deletions: checked at ingest and delivery),
//! `functions` (the JavaScript runtime of Segment Functions), `metrics`,
//! `cli` (what the command line does across stages), and leaves that every stage may use and that use
//! nothing of the crate: `json` (the JSON view), `message` (call type, dedupe key, log
//! tag), `timestamp`, `pace` (token bucket, backoff), `clock`, `throttle`, `key_error` (a
//! config error that names its key).
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod dedupe;
pub mod delivery;
pub mod destinations;
pub mod functions;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod json;
pub mod key_error;
pub mod live;
pub mod message;
pub mod metrics;
pub mod pace;
pub mod queue;
pub mod regulations;
pub mod routing;
pub mod server;
pub mod suppression;
pub mod throttle;
pub mod timestamp;
pub mod tracking_plan;
