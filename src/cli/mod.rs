//! The command line's own work, above every stage: `fanout route` runs a message through
//! ingest, the queue's framing, each destination's routing and translation, and shows
//! the result without sending anything.

pub mod admin;
pub mod fn_test;
pub mod output;
pub mod presets;
pub mod regulations;
pub mod route;
pub mod tap;
